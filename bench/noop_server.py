"""`python -m bench.noop_server`: a Metering server of the same proto that does nothing (the gRPC ceiling).

It answers CheckAndReserve and Complete with fixed, realistic-sized responses, on the same kind of event loop
`python -m metering` uses, and prints `noop listening on HOST:PORT`. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid

import grpc
from google.protobuf import timestamp_pb2

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc


def _timestamp(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def _export(status: int) -> pb.Export:
    export_id = str(uuid.uuid4())
    return pb.Export(
        export_id=export_id,
        user_id="user-1",
        project_id="user-1-p0",
        idempotency_key="key",
        status=status,
        render_mode=pb.RENDER_MODE_LOCAL,
        format="mp4",
        resolution="1280x720",
        requested_duration_seconds=10.0,
        duration_seconds=10.0 if status == pb.EXPORT_STATUS_COMPLETED else 0.0,
        file_size_bytes=1_000_000 if status == pb.EXPORT_STATUS_COMPLETED else 0,
        output_uri=f"file:///renders/{export_id}.mp4" if status == pb.EXPORT_STATUS_COMPLETED else "",
        created_at=_timestamp(1_700_000_000),
        lease_expires_at=_timestamp(1_700_000_120),
    )


class NoopMetering(metering_pb2_grpc.MeteringServicer):
    def __init__(self) -> None:
        export = _export(pb.EXPORT_STATUS_RESERVED)
        self._reserved = pb.CheckAndReserveResponse(
            export_id=export.export_id,
            lease_expires_at=export.lease_expires_at,
            usage=pb.Usage(
                user_id="user-1", tier="free", used=1, limit=1_000_000, in_flight=1,
                resets_at=_timestamp(1_700_086_400), max_duration_seconds=3600.0, remaining=999_999,
            ),
            export=export,
        )
        self._completed = pb.CompleteResponse(export=_export(pb.EXPORT_STATUS_COMPLETED))

    async def CheckAndReserve(self, request: pb.CheckAndReserveRequest, context: object) -> pb.CheckAndReserveResponse:
        return self._reserved

    async def Complete(self, request: pb.CompleteRequest, context: object) -> pb.CompleteResponse:
        return self._completed


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    metering_pb2_grpc.add_MeteringServicer_to_server(NoopMetering(), server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"noop listening on {listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> int:
    listen = os.environ.get("BENCH_NOOP_LISTEN", "127.0.0.1:0")
    if os.environ.get("BENCH_NOOP_LOOP", "uvloop") == "uvloop":
        import uvloop

        uvloop.run(serve(listen))
    else:
        asyncio.run(serve(listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
