"""The server's interceptor chain, and the one place where domain errors become gRPC status codes.

Every Metering RPC passes through `StatusInterceptor`: a `MeteringError` becomes its status code with
google.rpc details; a request that is not even valid protobuf becomes INVALID_ARGUMENT; anything else
is a bug, logged with its traceback and answered INTERNAL without internals. Authentication
(`metering.auth.AuthInterceptor`) goes in front of it in `interceptor_chain`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from metering import errors
from metering.auth import METERING_ACCESS, AuthInterceptor, TokenTable
from metering.decoding import RefuseUndecodable
from metering.logs import request_id, request_id_from

log = logging.getLogger("metering.rpc")

METERING_SERVICE = "exportapi.metering.v1.Metering"
ERROR_DOMAIN = "metering.exportapi"


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(error: errors.MeteringError) -> status_pb2.Status:
    """google.rpc.Status (code, message, details) of a domain error."""
    details: list[Any] = []
    if isinstance(error, errors.InvalidArgument):
        code = code_pb2.INVALID_ARGUMENT
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.reason)
                ]
            )
        )
    elif isinstance(error, errors.NotFound):
        code = code_pb2.NOT_FOUND
    elif isinstance(error, errors.AlreadyExists):
        code = code_pb2.ALREADY_EXISTS
    elif isinstance(error, errors.QuotaExceeded):
        code = code_pb2.RESOURCE_EXHAUSTED
        details.extend(_quota_details(error))
    elif isinstance(error, errors.FailedPrecondition):
        code = code_pb2.FAILED_PRECONDITION
        if error.violations:
            details.append(
                error_details_pb2.PreconditionFailure(
                    violations=[
                        error_details_pb2.PreconditionFailure.Violation(
                            type=violation.type, subject=violation.subject, description=violation.description
                        )
                        for violation in error.violations
                    ]
                )
            )
    elif isinstance(error, errors.Unavailable):
        code = code_pb2.UNAVAILABLE
    else:
        code = code_pb2.INTERNAL
    return status_pb2.Status(code=code, message=error.message, details=[_packed(item) for item in details])


def _quota_details(error: errors.QuotaExceeded) -> list[Any]:
    metric = "exports_per_project_per_day" if error.scope == "project" else "exports_per_user_per_day"
    retry = duration_pb2.Duration()
    retry.FromNanoseconds(int(error.retry_after_seconds * 1e9))
    return [
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=f"{error.scope}:{error.subject_id}",
                    description=error.message,
                    api_service=METERING_SERVICE,
                    quota_metric=metric,
                    quota_id=f"{metric}/{error.tier}",
                    quota_dimensions={"tier": error.tier},
                    quota_value=error.limit,
                )
            ]
        ),
        error_details_pb2.RetryInfo(retry_delay=retry),
        error_details_pb2.ErrorInfo(
            reason="PROJECT_DAILY_EXPORT_LIMIT" if error.scope == "project" else "DAILY_EXPORT_LIMIT",
            domain=ERROR_DOMAIN,
            metadata={
                "tier": error.tier,
                "limit": str(error.limit),
                "used": str(error.used),
                "resets_at": error.resets_at.isoformat(),
            },
        ),
    ]


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors of every unary Metering RPC to status codes, and logs one line per call."""

    def __init__(self, service: str = METERING_SERVICE) -> None:
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(self._prefix):
            return handler
        behaviour = handler.unary_unary
        rpc = method.removeprefix(self._prefix)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            request_id.set(request_id_from(context.invocation_metadata()))  # this call's task only
            try:
                response = await behaviour(request, context)
            except errors.MeteringError as error:
                status = status_for(error)
                _log_call(rpc, code_pb2.Code.Name(status.code), started, error.message)
                grpc_status = rpc_status.to_status(status)
                await context.abort(grpc_status.code, grpc_status.details, grpc_status.trailing_metadata)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception:
                reference = uuid.uuid4().hex[:12]
                log.exception("unexpected error", extra={"rpc": rpc, "reference": reference})
                await context.abort(
                    grpc.StatusCode.INTERNAL, f"internal error in metering (log reference {reference})"
                )
            _log_call(rpc, "OK", started)
            return response

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _log_call(rpc: str, code: str, started: float, detail: str = "") -> None:
    fields = {"rpc": rpc, "code": code, "ms": round((time.perf_counter() - started) * 1000, 2)}
    if detail:
        fields["detail"] = detail
    log.info("rpc", extra=fields)


def interceptor_chain(tokens: TokenTable | None = None) -> list[grpc.aio.ServerInterceptor]:
    """Outermost first. Authentication (METERING_AUTH_TOKENS; None: none) goes before the status mapping
    so that its refusals are not rewritten, and so that nothing runs for a caller it refuses."""
    chain: list[grpc.aio.ServerInterceptor] = []
    if tokens is not None:
        chain.append(AuthInterceptor(tokens, METERING_ACCESS))
    chain.append(RefuseUndecodable())
    chain.append(StatusInterceptor())
    return chain
