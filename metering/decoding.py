"""Request bytes that are not a valid message get INVALID_ARGUMENT naming `request`, on every service of a
server (health included), instead of gRPC's own UNKNOWN from a deserializer that raised."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    """Stands in for request bytes that did not parse, so the call is refused by name."""


UNDECODABLE = _Undecodable()


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return UNDECODABLE

    return parse


def undecodable_message(full_method: str) -> str:
    return f"request: is not a valid {full_method.rsplit('/', 1)[-1]} request message"


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Put it after authentication (a refused caller's bytes are never parsed) and before the error mapping."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        message = undecodable_message(handler_call_details.method)
        parse, serializer = tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if request is UNDECODABLE:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                return await behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=parse, response_serializer=serializer
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream
            if inspect.isasyncgenfunction(streaming):

                async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    if request is UNDECODABLE:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                    async for item in streaming(request, context):
                        yield item

                wrapped: Callable[..., Any] = generator
            else:  # a coroutine that answers with context.write() (grpc's health Watch)

                async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    if request is UNDECODABLE:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                    return await streaming(request, context)

                wrapped = writer
            return grpc.unary_stream_rpc_method_handler(
                wrapped, request_deserializer=parse, response_serializer=serializer
            )
        return handler  # client streaming: no such RPCs on these servers
