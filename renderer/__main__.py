"""`python -m renderer`: one renderer server."""

from __future__ import annotations

import os

# ffmpeg is started with fork+exec while gRPC threads run; gRPC's fork handlers only get in the way
# (and log a warning per render). Must be set before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import sys

from metering.logs import configure_logging
from renderer.config import ConfigError, RendererConfig
from renderer.server import serve_forever


def main() -> int:
    configure_logging(service="renderer")
    try:
        config = RendererConfig.from_env()
    except ConfigError as error:
        print(f"renderer: configuration error: {error}", file=sys.stderr)
        return 2
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # optional: asyncio's own loop works the same, slower
        run = asyncio.run
    try:
        run(serve_forever(config))
    except ConfigError as error:  # found only when starting: a port taken, an output directory not writable
        print(f"renderer: configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
