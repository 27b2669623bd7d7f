"""The renderer's gRPC servicer: thin methods over the job runner; errors map to codes in one place."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from exportapi.renderer.v1 import renderer_pb2_grpc
from metering.logs import request_id, request_id_from
from renderer import converters, metrics
from renderer.errors import InvalidArgument
from renderer.jobs import BackendUnavailable, IdempotencyConflict, JobNotFound, JobRunner, StartRefused
from renderer.metering_port import MeteringRejected, MeteringUnavailable

log = logging.getLogger(__name__)

# Only these trailers of metering's answer travel on: its rich error details (QuotaFailure, RetryInfo...).
_FORWARDED_TRAILERS = {"grpc-status-details-bin"}


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
    """The one mapping from domain errors to status codes."""
    match error:
        case InvalidArgument():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        case JobNotFound():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no render job {error.args[0]!r}")
        case IdempotencyConflict():
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(error))
        case BackendUnavailable():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        case StartRefused():
            metrics.record_start_refused(error.reason)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{error}; nothing was reserved")
        case MeteringUnavailable():
            metrics.record_metering_unavailable()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{error}; nothing was rendered")
        case MeteringRejected(status=grpc.aio.AioRpcError() as upstream):
            trailers = tuple((k, v) for k, v in (upstream.trailing_metadata() or ()) if k in _FORWARDED_TRAILERS)
            await context.abort(upstream.code(), upstream.details() or "", trailing_metadata=trailers)
        case _:
            log.exception("unexpected error", exc_info=error)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the renderer's log")
    raise AssertionError("unreachable")


def _mapped(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a unary or server-streaming method: request id in context, domain errors to status codes."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            token = request_id.set(request_id_from(context.invocation_metadata()))
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as error:
                await _abort(context, error)
            finally:
                request_id.reset(token)

        return streaming

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = request_id.set(request_id_from(context.invocation_metadata()))
        try:
            return await method(self, request, context)
        except Exception as error:
            await _abort(context, error)
        finally:
            request_id.reset(token)

    return unary


def map_errors(cls: type) -> type:
    """Applies `_mapped` to every RPC of the servicer, so no method can leak UNKNOWN."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and callable(member):
            setattr(cls, name, _mapped(member))
    return cls


@map_errors
class RendererServicer(renderer_pb2_grpc.RendererServicer):
    def __init__(self, runner: JobRunner) -> None:
        self._runner = runner

    async def StartRender(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._runner.start(converters.render_request(request))
        return converters.render_job(job)

    async def GetRender(self, request, context):  # type: ignore[no-untyped-def]
        return converters.render_job(self._runner.get(converters.job_id(request.job_id)))

    async def WatchRender(self, request, context):  # type: ignore[no-untyped-def]
        async for job in self._runner.watch(converters.job_id(request.job_id)):
            yield converters.render_job(job)

    async def CancelRender(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._runner.cancel(converters.job_id(request.job_id))
        return converters.render_job(job)

