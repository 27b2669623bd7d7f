"""The Metering gRPC servicer: protobuf in, domain values to the core, protobuf out.

Errors are not handled here: `metering.interceptors` maps them for every method (`_unary_pipeline`).
"""

from __future__ import annotations

import grpc

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc
from metering import converters
from metering.core import MeteringCore


class MeteringServicer(metering_pb2_grpc.MeteringServicer):
    def __init__(self, core: MeteringCore) -> None:
        self._core = core

    async def CheckAndReserve(
        self, request: pb.CheckAndReserveRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckAndReserveResponse:
        result = await self._core.check_and_reserve(converters.reserve_request(request))
        return converters.reserve_response(result)

    async def Complete(self, request: pb.CompleteRequest, context: grpc.aio.ServicerContext) -> pb.CompleteResponse:
        export = await self._core.complete(converters.complete_request(request))
        return pb.CompleteResponse(export=converters.export(export))

    async def ExtendReservation(
        self, request: pb.ExtendReservationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtendReservationResponse:
        lease_expires_at = await self._core.extend_reservation(request.export_id)
        return pb.ExtendReservationResponse(lease_expires_at=converters.timestamp(lease_expires_at))

    async def GetUsage(self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext) -> pb.GetUsageResponse:
        usage = await self._core.get_usage(request.user_id)
        return pb.GetUsageResponse(usage=converters.usage(usage))

    async def ListExports(
        self, request: pb.ListExportsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExportsResponse:
        page = await self._core.list_exports(converters.list_exports_request(request))
        return converters.list_exports_response(page)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        stats = await self._core.get_stats(converters.stats_request(request))
        return converters.stats_response(stats)

    async def SetAccountTier(
        self, request: pb.SetAccountTierRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAccountTierResponse:
        account = await self._core.set_account_tier(request.user_id, request.tier)
        return pb.SetAccountTierResponse(account=converters.account(account))
