"""`python -m renderer.cli render FILE.json --user U --project P --format mp4`: render through a running renderer.

Credentials: RENDERER_TOKEN (or --token) is sent as `authorization: Bearer <token>`; RENDERER_TLS_CA_FILE
switches to TLS, RENDERER_TLS_CLIENT_CERT_FILE / RENDERER_TLS_CLIENT_KEY_FILE add a client certificate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from exportapi.metering.v1 import metering_pb2
from exportapi.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from metering.auth import AuthConfigError, ClientTls, sync_channel

_MODES = {"": metering_pb2.RENDER_MODE_UNSPECIFIED, "local": metering_pb2.RENDER_MODE_LOCAL,
          "lambda": metering_pb2.RENDER_MODE_LAMBDA}
_TERMINAL = {renderer_pb2.RenderJob.SUCCEEDED, renderer_pb2.RenderJob.FAILED, renderer_pb2.RenderJob.CANCELLED}
BAR_WIDTH = 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m renderer.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="render a composition file and wait for the result")
    render.add_argument("file", type=Path, help="composition as JSON (fields of renderer.v1.Composition)")
    render.add_argument("--user", required=True)
    render.add_argument("--project", required=True)
    render.add_argument("--format", default="mp4", choices=["mp4", "webm", "gif"])
    render.add_argument("--mode", default="", choices=["", "local", "lambda"], help="default: the renderer's")
    render.add_argument("--key", default="", help="idempotency key (default: a new one)")
    render.add_argument("--target", default=os.environ.get("RENDERER_TARGET", "127.0.0.1:50052"))
    render.add_argument("--no-wait", action="store_true", help="print the queued job and return")
    render.add_argument("--token", default=None, help="bearer token (default: RENDERER_TOKEN; keeps it out of ps)")
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("RENDERER_TOKEN") or ""
    try:
        tls = ClientTls.from_env(
            os.environ, "RENDERER_TLS_CA_FILE", "RENDERER_TLS_CLIENT_CERT_FILE", "RENDERER_TLS_CLIENT_KEY_FILE"
        )
    except AuthConfigError as error:
        print(f"renderer: {error}", file=sys.stderr)
        return 2

    try:
        composition = json_format.ParseDict(json.loads(args.file.read_text()), renderer_pb2.Composition())
    except (OSError, ValueError, json_format.ParseError) as error:
        print(f"cannot read {args.file}: {error}", file=sys.stderr)
        return 2
    request = renderer_pb2.StartRenderRequest(
        idempotency_key=args.key or uuid.uuid4().hex,
        user_id=args.user,
        project_id=args.project,
        composition=composition,
        format=args.format,
        mode=_MODES[args.mode],
    )
    with sync_channel(args.target, tls, token) as channel:
        stub = renderer_pb2_grpc.RendererStub(channel)
        try:
            job = stub.StartRender(request, timeout=30)
            print(f"job {job.job_id} (export {job.export_id}) queued", file=sys.stderr)
            if not args.no_wait:
                for update in stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id=job.job_id)):
                    _draw_progress(update)
                    job = update
                print(file=sys.stderr)
        except grpc.RpcError as error:
            print(_describe(error), file=sys.stderr)
            return 1
    print(json_format.MessageToJson(job, preserving_proto_field_name=True))
    state = renderer_pb2.RenderJob.State.Name(job.state)
    if job.state == renderer_pb2.RenderJob.SUCCEEDED:
        summary = f"{job.output_uri} ({job.file_size_bytes:,} bytes, {job.duration_seconds:.2f} s)"
        print(f"{state}: {summary}", file=sys.stderr)
    elif job.state in _TERMINAL:
        print(f"{state}: {job.error}", file=sys.stderr)
        return 1
    return 0


def _draw_progress(job: renderer_pb2.RenderJob) -> None:
    filled = round(job.progress * BAR_WIDTH)
    state = renderer_pb2.RenderJob.State.Name(job.state).lower()
    frames = f"{job.frames_rendered}/{job.frames_total} frames"
    if job.chunks_total:
        frames += f", {job.chunks_done}/{job.chunks_total} chunks"
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    print(f"\r[{bar}] {job.progress:6.1%} {state:<9} {frames}", end="", file=sys.stderr, flush=True)


def _describe(error: grpc.RpcError) -> str:
    lines = [f"{error.code().name}: {error.details()}"]  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            lines.append(f"  retry in {info.retry_delay.seconds} s")
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            lines.extend(f"  quota {v.subject}: {v.description}" for v in quota.violations)
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            lines.extend(f"  {v.subject}: {v.description}" for v in failure.violations)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
