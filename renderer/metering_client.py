"""The gRPC adapter of `MeteringPort`: the only place the renderer talks to metering."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exportapi.metering.v1 import metering_pb2, metering_pb2_grpc
from metering.auth import ClientTls, bearer_metadata, channel
from metering.logs import REQUEST_ID_HEADER, request_id
from renderer.domain import RESERVATION_SEAL, RenderMode, Reservation
from renderer.metering_port import (
    ClosedExport,
    Completion,
    ExportAlreadyClosed,
    MeteringRejected,
    MeteringUnavailable,
    Outcome,
    ReserveRequest,
)

_MODES = {RenderMode.LOCAL: metering_pb2.RENDER_MODE_LOCAL, RenderMode.LAMBDA: metering_pb2.RENDER_MODE_LAMBDA}
_OUTCOMES = {
    Outcome.COMPLETED: metering_pb2.EXPORT_STATUS_COMPLETED,
    Outcome.FAILED: metering_pb2.EXPORT_STATUS_FAILED,
    Outcome.CANCELLED: metering_pb2.EXPORT_STATUS_CANCELLED,
}
# Codes after which the same call may succeed later: the outbox keeps retrying these.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}

# A reservation refused by a metering replica that is stopping (UNAVAILABLE, or CANCELLED: grpc/grpc#41785) is
# tried once more after this pause, on a new connection that reaches another replica: a rolling update of
# metering must not fail users' exports. Safe because CheckAndReserve is idempotent by key: if the first call
# did reserve and only its answer was lost, the second replays the same export.
RESERVE_RETRY_DELAY_SECONDS = 0.1
_RETRY_RESERVE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class GrpcMeteringClient:
    def __init__(
        self, target: str, *, timeout_seconds: float = 5.0, token: str | None = None, tls: ClientTls | None = None
    ) -> None:
        self._channel = channel(target, tls)
        self._stub = metering_pb2_grpc.MeteringStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout_seconds
        self._token = token
        self._calls_taken = False  # whether metering took this renderer's calls since it last was unhealthy

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        metadata: list[tuple[str, str]] = []
        if self._token:
            metadata.append(bearer_metadata(self._token))
        current = request_id.get()  # set by the renderer's servicer: metering logs the same id
        if current:
            metadata.append((REQUEST_ID_HEADER, current))
        return tuple(metadata)

    async def _call(self, method, request, *, once_more_if_stopping: bool = False):  # type: ignore[no-untyped-def]
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata())
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if once_more_if_stopping and code in _RETRY_RESERVE_ON:
                await asyncio.sleep(RESERVE_RETRY_DELAY_SECONDS)
                return await self._call(method, request)
            # CANCELLED too: this client cancels nothing, but a metering server that is stopping cancels the
            # calls it received and had not started yet (grpc/grpc#41785); to the caller it is unavailable.
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                raise MeteringUnavailable(f"metering is unavailable: {error.details()}") from error
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                # The operator's misconfiguration (METERING_TOKEN), not the caller's: to the caller metering is
                # unusable, like unreachable (UNAVAILABLE, nothing renders), and the outbox keeps retrying
                # completions instead of dead-lettering them until the token is fixed.
                raise MeteringUnavailable(
                    f"metering refused this renderer's credentials ({code.name}: {error.details()}); "
                    "check the renderer's METERING_TOKEN"
                ) from error
            raise MeteringRejected(
                error.details() or code.name, status=error, code_name=code.name, permanent=code not in _TRANSIENT
            ) from error

    async def reserve(self, request: ReserveRequest) -> Reservation:
        composition = request.composition
        answer = await self._call(
            self._stub.CheckAndReserve,
            metering_pb2.CheckAndReserveRequest(
                idempotency_key=request.idempotency_key,
                user_id=request.user_id,
                project_id=request.project_id,
                render_mode=_MODES[request.mode],
                format=request.format.value,
                duration_seconds=composition.duration_seconds,
                resolution=composition.resolution,
                request_digest=request.digest(),
            ),
            once_more_if_stopping=True,
        )
        if answer.replayed and answer.export.status != metering_pb2.EXPORT_STATUS_RESERVED:
            export = answer.export
            raise ExportAlreadyClosed(
                ClosedExport(
                    export_id=export.export_id,
                    status=metering_pb2.ExportStatus.Name(export.status).removeprefix("EXPORT_STATUS_").lower(),
                    error=export.error,
                    file_size_bytes=export.file_size_bytes,
                    duration_seconds=export.duration_seconds,
                    output_uri=export.output_uri,
                )
            )
        return Reservation(
            export_id=answer.export_id,
            lease_expires_at=answer.lease_expires_at.ToDatetime(tzinfo=UTC),
            seal=RESERVATION_SEAL,
        )

    async def complete(self, completion: Completion) -> None:
        await self._call(
            self._stub.Complete,
            metering_pb2.CompleteRequest(
                export_id=completion.export_id,
                outcome=_OUTCOMES[completion.outcome],
                error=completion.error,
                file_size_bytes=completion.file_size_bytes,
                duration_seconds=completion.duration_seconds,
                output_uri=completion.output_uri,
                render_seconds=completion.render_seconds,
            ),
        )

    async def extend(self, export_id: str) -> datetime:
        answer = await self._call(
            self._stub.ExtendReservation, metering_pb2.ExtendReservationRequest(export_id=export_id)
        )
        return answer.lease_expires_at.ToDatetime(tzinfo=UTC)

    async def unhealthy_because(self) -> str | None:
        """None when metering is SERVING and takes this renderer's calls, else why not. Its credentials are sent
        with the health check (metering refuses wrong ones even there); whether its role may call metering's
        renderer methods is checked once per stretch of health (a token of another role, such as backend's,
        is a valid token all the same)."""
        reason = await self._health_refused()
        if reason is None and not self._calls_taken:
            reason = await self._calls_refused()
        self._calls_taken = reason is None
        return reason

    async def _health_refused(self) -> str | None:
        try:
            answer = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeout, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return f"metering refused this renderer's credentials ({error.code().name}): check METERING_TOKEN"
            return f"metering did not answer its health check ({error.code().name}: {error.details()})"
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            return f"metering is {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
        return None

    async def _calls_refused(self) -> str | None:
        # An ExtendReservation without an export id: metering refuses it before reading it when the caller may
        # not extend (the rule of all three renderer methods), and answers INVALID_ARGUMENT after, touching nothing.
        try:
            await self._stub.ExtendReservation(
                metering_pb2.ExtendReservationRequest(), timeout=self._timeout, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return None
            if code == grpc.StatusCode.PERMISSION_DENIED:
                return (
                    f"metering refuses this renderer's calls ({code.name}: {error.details()}): "
                    "METERING_TOKEN must be a token of the renderer role"
                )
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return f"metering refused this renderer's credentials ({code.name}): check METERING_TOKEN"
            return f"metering did not answer ({code.name}: {error.details()})"
        return None
