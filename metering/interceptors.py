"""The server's interceptors, and the one place where domain errors become gRPC status codes.

Every unary Metering RPC passes through `_unary_pipeline`: a `MeteringError` becomes its status code with
google.rpc details; a request that is not even valid protobuf becomes INVALID_ARGUMENT; anything else
is a bug, logged with its traceback and answered INTERNAL without internals; and each call gets one log
line (`rpc`, `code`, `ms`, the request id, and the user_id / export_id it concerns when known).

The server installs one interceptor, `MeteringInterceptor`: for a unary Metering method it builds, on the
method's first call, a single wrapper that does, in this order, what four stacked interceptors did (metrics
with the final code, authentication before the request bytes are parsed, refusal of undecodable bytes,
status mapping and the log line), and reuses it for every later call. Other services (health, reflection)
go through the separate interceptors, in the same order.
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

from exportapi.metering.v1 import metering_pb2
from metering import errors
from metering.auth import METERING_ACCESS, AuthInterceptor, Refusal, RequestCheck, TokenTable, log_refusal, refusal_of
from metering.decoding import UNDECODABLE, RefuseUndecodable, tolerant, undecodable_message
from metering.grpc_metrics import MethodRecorder, MetricsInterceptor, _final_code
from metering.logs import info_writer, request_id, request_id_from

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


# The fields of a call's log line that say what it was about, when the request or the response names them.
_CALL_FIELDS = ("user_id", "export_id")
_MAX_LOGGED_ID = 256  # identifiers are validated later; a hostile one must not make a huge log line
_METHODS = metering_pb2.DESCRIPTOR.services_by_name["Metering"].methods_by_name


def _describer(rpc: str) -> Callable[[Any, Any], dict[str, Any]]:
    """(request, response or None) -> the user_id / export_id of a call of `rpc`, from the request, else from the
    response (CheckAndReserve's export_id, Complete's export.user_id)."""
    method = _METHODS.get(rpc)
    if method is None:
        return lambda request, response: {}
    in_request = tuple(name for name in _CALL_FIELDS if name in method.input_type.fields_by_name)
    output = method.output_type.fields_by_name
    nested = output["export"].message_type.fields_by_name if "export" in output else {}
    in_response = tuple(
        (name, name in output) for name in _CALL_FIELDS if name not in in_request and (name in output or name in nested)
    )

    def describe(request: Any, response: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if request is UNDECODABLE or isinstance(request, bytes):
            return fields
        for name in in_request:
            value = getattr(request, name)
            if value:
                fields[name] = value[:_MAX_LOGGED_ID]
        if response is not None:
            for name, top_level in in_response:
                value = getattr(response if top_level else response.export, name)
                if value:
                    fields[name] = value
        return fields

    return describe


def _log_call(rpc: str, code: str, started: float, fields: dict[str, Any], detail: str = "") -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fields["rpc"] = rpc
    fields["code"] = code
    fields["ms"] = round((time.perf_counter() - started) * 1000, 2)
    if detail:
        fields["detail"] = detail
    write = info_writer(log)
    if write is not None:
        write("rpc", fields)
    else:
        log.info("rpc", extra=fields)


def _unary_pipeline(
    handler: grpc.RpcMethodHandler,
    method: str,
    *,
    recorder: MethodRecorder | None = None,
    auth: AuthInterceptor | None = None,
    parse_here: bool = False,
) -> grpc.RpcMethodHandler:
    """One unary Metering method's handler wrapped in everything a call passes through. With `parse_here`,
    gRPC hands over the raw bytes and they are parsed after authentication (never for a refused caller)."""
    behaviour = handler.unary_unary
    rpc = method.rpartition("/")[2]
    describe = _describer(rpc)
    deserializer = handler.request_deserializer
    parse = tolerant(deserializer) if parse_here and deserializer is not None else None
    undecodable = undecodable_message(method)
    perf_counter = time.perf_counter

    async def pipeline(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = perf_counter()
        metadata = context.invocation_metadata()
        request_id.set(request_id_from(metadata))  # this call's task only
        try:
            fields: dict[str, Any] = {}
            try:
                check: RequestCheck | None = None
                role: str | None = None
                if auth is not None:
                    role, decision = auth.authorize(method, metadata)
                    if isinstance(decision, Refusal):
                        log_refusal(context, decision, method, role)
                        await context.abort(decision.code, decision.message)
                    check = decision
                if parse is not None:
                    request = parse(request)
                if check is not None and not check.allows(request):
                    refusal = refusal_of(check)
                    log_refusal(context, refusal, method, role)
                    await context.abort(refusal.code, refusal.message)
                if request is UNDECODABLE:
                    _log_call(rpc, "INVALID_ARGUMENT", started, fields, undecodable)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable)
                fields = describe(request, None)
                response = await behaviour(request, context)
            except errors.MeteringError as error:
                status = status_for(error)
                _log_call(rpc, code_pb2.Code.Name(status.code), started, fields, error.message)
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
        except BaseException as error:
            if recorder is not None:
                recorder.record(perf_counter() - started, _final_code(context, error))
            raise
        _log_call(rpc, "OK", started, describe(request, response))
        if recorder is not None:
            recorder.record(perf_counter() - started, _final_code(context, None))
        return response

    return grpc.unary_unary_rpc_method_handler(
        pipeline,
        request_deserializer=None if parse is not None else deserializer,
        response_serializer=handler.response_serializer,
    )


async def _given(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    return handler


class _Cache:
    """Wrapped handlers by method name, valid while the server hands out the same inner handler."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        known = self._wrapped.get(method)
        return known[1] if known is not None and known[0] is handler else None

    def put(self, method: str, handler: grpc.RpcMethodHandler, wrapped: grpc.RpcMethodHandler) -> None:
        self._wrapped[method] = (handler, wrapped)


class MeteringInterceptor(grpc.aio.ServerInterceptor):
    """The metering server's only interceptor (see the module's docstring): metrics, authentication
    (`tokens`; None: none), undecodable refusal, status mapping and the log line, one wrapper per call."""

    def __init__(self, tokens: TokenTable | None = None, *, metrics: MetricsInterceptor) -> None:
        self._prefix = f"/{METERING_SERVICE}/"
        self._metrics = metrics
        self._auth = AuthInterceptor(tokens, METERING_ACCESS) if tokens is not None else None
        # For every other call: the separate interceptors, innermost first.
        self._others: list[grpc.aio.ServerInterceptor] = [RefuseUndecodable()]
        if self._auth is not None:
            self._others.append(self._auth)
        self._others.append(metrics)
        self._cache = _Cache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        wrapped = self._cache.get(method, handler)
        if wrapped is not None:
            return wrapped
        if handler.unary_unary is not None and method.startswith(self._prefix):
            wrapped = _unary_pipeline(
                handler, method, recorder=self._metrics.recorder(method), auth=self._auth, parse_here=True
            )
            self._cache.put(method, handler, wrapped)
            return wrapped
        for interceptor in self._others:
            handler = await interceptor.intercept_service(lambda _, inner=handler: _given(inner), handler_call_details)
            if handler is None:
                return None
        return handler
