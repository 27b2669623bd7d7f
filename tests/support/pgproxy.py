"""A TCP proxy in front of PostgreSQL that a test can cut, to make the database unreachable on demand.

    async with PgProxy(database_url) as proxy:
        ... server uses proxy.dsn ...
        await proxy.cut()        # drops every connection and refuses new ones
        proxy.restore()          # accepts again
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.postgres import upstream_address, via_tcp


class PgProxy:
    def __init__(self, dsn: str) -> None:
        self._upstream = upstream_address(dsn)
        self._dsn = dsn
        self._server: asyncio.Server | None = None
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def dsn(self) -> str:
        return via_tcp(self._dsn, "127.0.0.1", self.port)

    async def __aenter__(self) -> PgProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def cut(self) -> None:
        self._open = False
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        await asyncio.sleep(0)

    def restore(self) -> None:
        self._open = True

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if not self._open:
            client_writer.close()
            return
        try:
            if isinstance(self._upstream, str):
                server_reader, server_writer = await asyncio.open_unix_connection(self._upstream)
            else:
                server_reader, server_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_writer.close()
            return
        if not self._open:  # cut while this connection was being made: it must not survive the cut
            server_writer.close()
            client_writer.close()
            return
        self._writers.update((client_writer, server_writer))
        await asyncio.gather(
            self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
