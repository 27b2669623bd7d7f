"""Who may call what: bearer tokens with roles on both services, through real servers (PostgreSQL, ffmpeg).

Tables over every RPC x caller (no token, a wrong one, and each role), the per-user rule of GetStats,
rotation, health and reflection without credentials, the renderer presenting METERING_TOKEN to metering,
the command lines, start-up checks, and that no token ever reaches a log line or an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc
from exportapi.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from metering import cli as metering_cli
from metering.auth import (
    METERING_ACCESS,
    METERING_ROLES,
    RENDERER_ACCESS,
    RENDERER_ROLES,
    TokenTable,
)
from metering.config import Config, ConfigError
from metering.logs import JsonFormatter
from renderer import cli as renderer_cli
from renderer.config import ConfigError as RendererConfigError
from renderer.config import RendererConfig
from renderer.metering_client import GrpcMeteringClient
from renderer.metering_port import Completion, MeteringUnavailable, Outcome
from tests.support.metering import REPO_ROOT, reserve_request, start_metering, wait_health
from tests.support.renderer import start_renderer, tiny_composition

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED

RENDERER_TOKEN = "renderer-token-5b0d9c1e7a"  # metering's `renderer` role
BACKEND_TOKEN = "backend-token-one-8f3a2c"  # metering's `backend` role
BACKEND_TOKEN_NEXT = "backend-token-two-41e9d7"  # the same role, mid-rotation
OPS_TOKEN = "ops-token-c2f7a9e04b1d"
WRONG_TOKEN = "not-a-configured-token-77aa"
METERING_TOKENS = (
    f"renderer:{RENDERER_TOKEN},backend:{BACKEND_TOKEN},backend:{BACKEND_TOKEN_NEXT},ops:{OPS_TOKEN}"
)
# The renderer's own callers: different tokens from metering's, so a metering token is no good here.
RENDERER_BACKEND_TOKEN = "renderer-backend-token-19cd"
RENDERER_OPS_TOKEN = "renderer-ops-token-6e02ab"
RENDERER_TOKENS = f"backend:{RENDERER_BACKEND_TOKEN},ops:{RENDERER_OPS_TOKEN}"
EVERY_TOKEN = (
    RENDERER_TOKEN, BACKEND_TOKEN, BACKEND_TOKEN_NEXT, OPS_TOKEN, WRONG_TOKEN, RENDERER_BACKEND_TOKEN,
    RENDERER_OPS_TOKEN,
)

CALLERS = ("none", "wrong", "renderer", "backend", "ops")
METERING_CREDENTIALS = {
    "none": None, "wrong": WRONG_TOKEN, "renderer": RENDERER_TOKEN, "backend": BACKEND_TOKEN, "ops": OPS_TOKEN,
}
# At the renderer, "renderer" presents metering's renderer token: unknown there.
RENDERER_CREDENTIALS = {
    "none": None, "wrong": WRONG_TOKEN, "renderer": RENDERER_TOKEN, "backend": RENDERER_BACKEND_TOKEN,
    "ops": RENDERER_OPS_TOKEN,
}


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


async def code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return OK


async def drain(stream: Any) -> None:
    async for _ in stream:
        pass


def expected_codes(allowed: dict[str, set[str]]) -> dict[tuple[str, str], grpc.StatusCode]:
    """rpc -> roles allowed  =>  (rpc, caller) -> code. No or a wrong token: UNAUTHENTICATED; a valid token
    of another role: PERMISSION_DENIED."""
    table = {}
    for rpc, roles in allowed.items():
        for caller in CALLERS:
            if caller in ("none", "wrong"):
                table[rpc, caller] = UNAUTHENTICATED
            else:
                table[rpc, caller] = OK if caller in roles else DENIED
    return table


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as the JSON line the services write (message and all `extra=` fields)."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


def assert_no_token_in(text: str) -> None:
    for token in EVERY_TOKEN:
        assert token not in text, "a token reached the logs or an error message"


@contextlib.asynccontextmanager
async def metering_with_auth(database_url: str, tokens: str = METERING_TOKENS) -> AsyncIterator[str]:
    async with start_metering(database_url, env={"METERING_AUTH_TOKENS": tokens}) as metering:
        yield metering.target


@contextlib.asynccontextmanager
async def metering_client(target: str) -> AsyncIterator[metering_pb2_grpc.MeteringStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield metering_pb2_grpc.MeteringStub(channel)


# --- the tables ---------------------------------------------------------------------------------------

METERING_ALLOWED = {
    "CheckAndReserve": {"renderer", "ops"},
    "Complete": {"renderer", "ops"},
    "ExtendReservation": {"renderer", "ops"},
    "GetUsage": {"backend", "ops"},
    "ListExports": {"backend", "ops"},
    "GetStats (one user)": {"backend", "ops"},
    "GetStats (system-wide)": {"ops"},
    "SetAccountTier": {"ops"},
}


async def test_metering_rpc_by_caller_table(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with metering_with_auth(database_url) as target, metering_client(target) as stub:
        ops = bearer(OPS_TOKEN)
        completed = await stub.CheckAndReserve(reserve_request("done", user="setup"), metadata=ops)
        await stub.Complete(
            pb.CompleteRequest(export_id=completed.export_id, outcome=pb.EXPORT_STATUS_COMPLETED), metadata=ops
        )
        reserved = await stub.CheckAndReserve(reserve_request("open", user="setup"), metadata=ops)

        calls: dict[str, Callable[[tuple], Awaitable[Any]]] = {
            # A fresh user per call, so no quota gets in the way of the table.
            "CheckAndReserve": lambda md: stub.CheckAndReserve(
                reserve_request(uuid.uuid4().hex, user=uuid.uuid4().hex), metadata=md
            ),
            # Complete again with the same outcome is OK (unchanged); extending an open lease is OK.
            "Complete": lambda md: stub.Complete(
                pb.CompleteRequest(export_id=completed.export_id, outcome=pb.EXPORT_STATUS_COMPLETED), metadata=md
            ),
            "ExtendReservation": lambda md: stub.ExtendReservation(
                pb.ExtendReservationRequest(export_id=reserved.export_id), metadata=md
            ),
            "GetUsage": lambda md: stub.GetUsage(pb.GetUsageRequest(user_id="setup"), metadata=md),
            "ListExports": lambda md: stub.ListExports(pb.ListExportsRequest(user_id="setup"), metadata=md),
            "GetStats (one user)": lambda md: stub.GetStats(pb.GetStatsRequest(user_id="setup"), metadata=md),
            "GetStats (system-wide)": lambda md: stub.GetStats(pb.GetStatsRequest(), metadata=md),
            "SetAccountTier": lambda md: stub.SetAccountTier(
                pb.SetAccountTierRequest(user_id="setup", tier="pro"), metadata=md
            ),
        }
        observed = {
            (rpc, caller): await code_of(call(bearer(METERING_CREDENTIALS[caller])))
            for rpc, call in calls.items()
            for caller in CALLERS
        }
        # Refused reservations never reached the ledger: only the setup's two and the two allowed ones.
        stats = await stub.GetStats(pb.GetStatsRequest(), metadata=ops)

    assert observed == expected_codes(METERING_ALLOWED)
    assert stats.total_exports == 2 + 2
    assert_no_token_in(logged_text(caplog))
    refusals = [r for r in caplog.records if r.getMessage() == "call refused"]
    assert {r.code for r in refusals} == {"UNAUTHENTICATED", "PERMISSION_DENIED"}  # type: ignore[attr-defined]
    assert all(r.rpc.startswith("/exportapi.metering.v1.Metering/") for r in refusals)  # type: ignore[attr-defined]


async def test_renderer_rpc_by_caller_table(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        metering_with_auth(database_url) as metering_target,
        start_renderer(
            metering_target, tmp_path, METERING_TOKEN=RENDERER_TOKEN, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        stub = renderer_pb2_grpc.RendererStub(channel)
        started: list[str] = []

        async def start(md: tuple) -> None:
            job = await stub.StartRender(
                renderer_pb2.StartRenderRequest(
                    idempotency_key=uuid.uuid4().hex, user_id=uuid.uuid4().hex, project_id="p", format="gif",
                    composition=tiny_composition(0.5),
                ),
                metadata=md,
            )
            started.append(job.job_id)

        await start(bearer(RENDERER_OPS_TOKEN))
        (job_id,) = started
        await wait_terminal_with(stub, job_id, bearer(RENDERER_OPS_TOKEN))
        calls: dict[str, Callable[[tuple], Awaitable[Any]]] = {
            "StartRender": start,
            "GetRender": lambda md: stub.GetRender(renderer_pb2.GetRenderRequest(job_id=job_id), metadata=md),
            "WatchRender": lambda md: drain(
                stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id=job_id), metadata=md)
            ),
            "CancelRender": lambda md: stub.CancelRender(
                renderer_pb2.CancelRenderRequest(job_id=job_id), metadata=md
            ),
        }
        observed = {
            (rpc, caller): await code_of(call(bearer(RENDERER_CREDENTIALS[caller])))
            for rpc, call in calls.items()
            for caller in CALLERS
        }
        for job_id in started:
            await wait_terminal_with(stub, job_id, bearer(RENDERER_OPS_TOKEN))
        async with metering_client(metering_target) as metering:
            ledger = await metering.GetStats(pb.GetStatsRequest(), metadata=bearer(OPS_TOKEN))

    # Metering's renderer token means nothing to the renderer: UNAUTHENTICATED, not a role.
    expected = {
        (rpc, caller): UNAUTHENTICATED if caller in ("none", "wrong", "renderer") else OK
        for rpc in calls
        for caller in CALLERS
    }
    assert observed == expected
    # The setup's render and one each for backend and ops; the refused ones never reached metering.
    assert len(started) == 3 and ledger.total_exports == 3
    assert_no_token_in(logged_text(caplog))


async def wait_terminal_with(stub: renderer_pb2_grpc.RendererStub, job_id: str, metadata: tuple) -> None:
    last = None
    async for update in stub.WatchRender(
        renderer_pb2.WatchRenderRequest(job_id=job_id), metadata=metadata, timeout=60
    ):
        last = update
    assert last is not None and last.state == renderer_pb2.RenderJob.SUCCEEDED, last


# --- GetStats: backend sees named users only ------------------------------------------------------------


async def test_backend_reads_any_named_users_stats_but_not_system_wide_ones(database_url: str) -> None:
    async with metering_with_auth(database_url) as target, metering_client(target) as stub:
        for user in ("alice", "bob"):
            await stub.CheckAndReserve(reserve_request(f"k-{user}", user=user), metadata=bearer(RENDERER_TOKEN))
        backend = bearer(BACKEND_TOKEN)
        alice = await stub.GetStats(pb.GetStatsRequest(user_id="alice"), metadata=backend)
        bob = await stub.GetStats(pb.GetStatsRequest(user_id="bob", days=7), metadata=backend)
        refusals = {}
        for name, request in {
            "system-wide": pb.GetStatsRequest(),
            "one project of every user": pb.GetStatsRequest(project_id="project-1"),
        }.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetStats(request, metadata=backend)
            refusals[name] = (refused.value.code(), refused.value.details())
        everyone = await stub.GetStats(pb.GetStatsRequest(), metadata=bearer(OPS_TOKEN))

    # Backend tokens are not tied to one user (the product backend serves them all): any named user is fine.
    assert (alice.total_exports, bob.total_exports) == (1, 1)
    assert {user.user_id for user in alice.users} == {"alice"}
    for code, message in refusals.values():
        assert code == DENIED
        assert "user_id" in message and "ops" in message
    assert everyone.total_exports == 2


# --- rotation, malformed credentials, what needs none ----------------------------------------------------


async def test_two_tokens_of_one_role_both_work_during_a_rotation(database_url: str) -> None:
    async with metering_with_auth(database_url) as target, metering_client(target) as stub:
        for token in (BACKEND_TOKEN, BACKEND_TOKEN_NEXT):
            usage = await stub.GetUsage(pb.GetUsageRequest(user_id="alice"), metadata=bearer(token))
            assert usage.usage.tier == "free"
    # After the rotation the old token is gone from the list: it stops working, the new one goes on.
    async with (
        metering_with_auth(database_url, f"backend:{BACKEND_TOKEN_NEXT},ops:{OPS_TOKEN}") as target,
        metering_client(target) as stub,
    ):
        request = pb.GetUsageRequest(user_id="alice")
        assert await code_of(stub.GetUsage(request, metadata=bearer(BACKEND_TOKEN))) == UNAUTHENTICATED
        assert await code_of(stub.GetUsage(request, metadata=bearer(BACKEND_TOKEN_NEXT))) == OK


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((("authorization", f"bearer {BACKEND_TOKEN}"),), OK),  # the scheme is case-insensitive
        ((("authorization", f"Bearer   {BACKEND_TOKEN}  "),), OK),
        ((("authorization", f"Basic {BACKEND_TOKEN}"),), UNAUTHENTICATED),
        ((("authorization", BACKEND_TOKEN),), UNAUTHENTICATED),
        ((("authorization", "Bearer"),), UNAUTHENTICATED),
        ((("authorization", "Bearer "),), UNAUTHENTICATED),
        ((("authorization", f"Bearer {BACKEND_TOKEN[:-1]}"),), UNAUTHENTICATED),
        ((("authorization", f"Bearer {BACKEND_TOKEN}x"),), UNAUTHENTICATED),
        ((("authorization", f"Bearer {BACKEND_TOKEN.upper()}"),), UNAUTHENTICATED),
        ((("authorization", f"Bearer {BACKEND_TOKEN}"), ("authorization", f"Bearer {BACKEND_TOKEN}")), UNAUTHENTICATED),
        ((("x-token", BACKEND_TOKEN),), UNAUTHENTICATED),
        ((("authorization", "Bearer " + "x" * 4000),), UNAUTHENTICATED),
    ],
)
async def test_malformed_credentials_are_unauthenticated(
    database_url: str, metadata: tuple, code: grpc.StatusCode
) -> None:
    async with metering_with_auth(database_url) as target, metering_client(target) as stub:
        try:
            await stub.GetUsage(pb.GetUsageRequest(user_id="alice"), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            assert error.code() == code
            assert_no_token_in(error.details() or "")
        else:
            assert code == OK


async def test_health_and_reflection_need_no_credentials(database_url: str, tmp_path: Path) -> None:
    async with (
        metering_with_auth(database_url) as metering_target,
        start_renderer(
            metering_target, tmp_path, METERING_TOKEN=RENDERER_TOKEN, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running,
    ):
        for target, service in ((metering_target, "exportapi.metering.v1.Metering"),
                                (running.target, "exportapi.renderer.v1.Renderer")):
            await wait_health(target, health_pb2.HealthCheckResponse.SERVING)  # no metadata at all
            async with grpc.aio.insecure_channel(target) as channel:
                reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
                listed = []
                async for reply in reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                ):
                    listed = [s.name for s in reply.list_services_response.service]
                assert service in listed


async def test_credentials_sent_to_health_must_be_valid(database_url: str, tmp_path: Path) -> None:
    async def health_with(target: str, token: str | None) -> grpc.StatusCode | int:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), metadata=bearer(token), timeout=5
                )
            except grpc.aio.AioRpcError as error:
                return error.code()
        return answer.status

    serving = health_pb2.HealthCheckResponse.SERVING
    async with (
        metering_with_auth(database_url) as metering_target,
        start_renderer(
            metering_target, tmp_path, METERING_TOKEN=RENDERER_TOKEN, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running,
    ):
        await wait_health(running.target, serving)
        for target, valid in ((metering_target, RENDERER_TOKEN), (running.target, RENDERER_BACKEND_TOKEN)):
            assert await health_with(target, None) == serving
            assert await health_with(target, valid) == serving
            assert await health_with(target, WRONG_TOKEN) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("token", "said"),
    [
        (WRONG_TOKEN, ("UNAUTHENTICATED", "check METERING_TOKEN")),
        # a valid token, of another role
        (BACKEND_TOKEN, ("PERMISSION_DENIED", "METERING_TOKEN must be a token of the renderer role")),
        ("", ("UNAUTHENTICATED", "check METERING_TOKEN")),  # none, where metering asks for one
    ],
    ids=["wrong-token", "backend-role", "no-token"],
)
async def test_a_renderer_whose_metering_token_cannot_reserve_is_not_serving_and_says_why(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, token: str, said: tuple[str, str]
) -> None:
    caplog.set_level(logging.INFO)
    async with metering_with_auth(database_url) as metering_target:
        async with start_renderer(
            metering_target, tmp_path / "wrong", METERING_TOKEN=token, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running:
            await wait_health(running.target, health_pb2.HealthCheckResponse.NOT_SERVING)
        async with start_renderer(
            metering_target, tmp_path / "right", METERING_TOKEN=RENDERER_TOKEN, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running:
            await wait_health(running.target, health_pb2.HealthCheckResponse.SERVING)
    (warning,) = {record.reason for record in caplog.records if record.getMessage() == "metering unusable: NOT_SERVING"}  # type: ignore[attr-defined]
    assert all(words in warning for words in said)
    assert_no_token_in(logged_text(caplog))


async def test_without_auth_configured_everyone_on_loopback_may_call(metering_target: str) -> None:
    # The development setup (make run): no tokens, loopback only, nothing asked for.
    async with metering_client(metering_target) as stub:
        assert await code_of(stub.GetStats(pb.GetStatsRequest())) == OK
        assert await code_of(stub.SetAccountTier(pb.SetAccountTierRequest(user_id="a", tier="pro"))) == OK


# --- renderer -> metering ---------------------------------------------------------------------------------


async def test_a_render_with_auth_on_both_sides_lands_in_the_ledger(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        metering_with_auth(database_url) as metering_target,
        start_renderer(
            metering_target, tmp_path, METERING_TOKEN=RENDERER_TOKEN, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running,
        grpc.aio.insecure_channel(running.target) as channel,
        metering_client(metering_target) as metering,
    ):
        stub = renderer_pb2_grpc.RendererStub(channel)
        backend = bearer(RENDERER_BACKEND_TOKEN)
        job = await stub.StartRender(
            renderer_pb2.StartRenderRequest(
                idempotency_key="k1", user_id="alice", project_id="p", format="mp4", composition=tiny_composition(1)
            ),
            metadata=backend,
        )
        await wait_terminal_with(stub, job.job_id, backend)
        for _ in range(100):  # the completion goes through the outbox
            exports = (await metering.ListExports(
                pb.ListExportsRequest(user_id="alice"), metadata=bearer(BACKEND_TOKEN)
            )).exports
            if exports and exports[0].status == pb.EXPORT_STATUS_COMPLETED:
                break
            await asyncio.sleep(0.05)

    assert [(e.export_id, e.status) for e in exports] == [(job.export_id, pb.EXPORT_STATUS_COMPLETED)]
    assert_no_token_in(logged_text(caplog))


@pytest.mark.parametrize(
    "metering_token",
    [WRONG_TOKEN, BACKEND_TOKEN],  # unknown to metering; known, but a role that may not reserve
    ids=["wrong-token", "wrong-role"],
)
async def test_a_renderer_metering_refuses_answers_unavailable_and_renders_nothing(
    database_url: str, tmp_path: Path, metering_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The renderer's caller did nothing wrong; the operator did. The caller sees UNAVAILABLE (as if
    metering were unreachable: nothing renders, the render does not count), never UNAUTHENTICATED or
    PERMISSION_DENIED about credentials it did not send, and never UNKNOWN."""
    caplog.set_level(logging.DEBUG)
    async with (
        metering_with_auth(database_url) as metering_target,
        start_renderer(
            metering_target, tmp_path, METERING_TOKEN=metering_token, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running,
        grpc.aio.insecure_channel(running.target) as channel,
        metering_client(metering_target) as metering,
    ):
        stub = renderer_pb2_grpc.RendererStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartRender(
                renderer_pb2.StartRenderRequest(
                    idempotency_key="k1", user_id="alice", project_id="p", format="mp4",
                    composition=tiny_composition(1),
                ),
                metadata=bearer(RENDERER_BACKEND_TOKEN),
            )
        ledger = await metering.ListExports(pb.ListExportsRequest(user_id="alice"), metadata=bearer(OPS_TOKEN))
        # A completion refused for credentials is kept for retry (not dead-lettered): the token gets fixed.
        client = GrpcMeteringClient(metering_target, token=metering_token)
        try:
            with pytest.raises(MeteringUnavailable):
                await client.complete(Completion(export_id=str(uuid.uuid4()), outcome=Outcome.COMPLETED))
        finally:
            await client.close()

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "METERING_TOKEN" in refused.value.details() and "nothing was rendered" in refused.value.details()
    assert list(ledger.exports) == []
    assert_no_token_in(refused.value.details() + logged_text(caplog))


# --- command lines ---------------------------------------------------------------------------------------


async def test_metering_cli_sends_metering_token(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with metering_with_auth(database_url) as target:

        async def run(*argv: str) -> tuple[int, str]:
            out = io.StringIO()
            code = await asyncio.to_thread(metering_cli.main, ["--target", target, *argv], out)
            return code, out.getvalue()

        monkeypatch.delenv("METERING_TOKEN", raising=False)
        without = await run("--json", "usage", "alice")
        monkeypatch.setenv("METERING_TOKEN", BACKEND_TOKEN)
        with_backend = await run("--json", "usage", "alice")
        backend_sets_tier = await run("set-tier", "alice", "pro")
        with_flag = await run("--token", OPS_TOKEN, "set-tier", "alice", "pro")

    assert without[0] == 1
    assert with_backend[0] == 0 and json.loads(with_backend[1])["tier"] == "free"
    assert backend_sets_tier[0] == 1
    assert with_flag == (0, "alice is now on the pro tier.\n")


async def test_renderer_cli_sends_renderer_token(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    composition = tmp_path / "tiny.json"
    composition.write_text(json.dumps({
        "width": 160, "height": 120, "fps": 10, "duration_seconds": 0.5, "clips": [{"source": "testsrc:"}],
    }))
    async with (
        metering_with_auth(database_url) as metering_target,
        start_renderer(
            metering_target, tmp_path, METERING_TOKEN=RENDERER_TOKEN, RENDERER_AUTH_TOKENS=RENDERER_TOKENS
        ) as running,
    ):
        argv = ["render", str(composition), "--user", "u", "--project", "p", "--format", "gif",
                "--target", running.target]
        monkeypatch.delenv("RENDERER_TOKEN", raising=False)
        without = await asyncio.to_thread(renderer_cli.main, argv)
        refused = capsys.readouterr().err
        monkeypatch.setenv("RENDERER_TOKEN", RENDERER_BACKEND_TOKEN)
        with_token = await asyncio.to_thread(renderer_cli.main, argv)

    assert without == 1 and "UNAUTHENTICATED" in refused
    assert with_token == 0


# --- configuration ---------------------------------------------------------------------------------------


def test_token_table_finds_each_role_and_nothing_else() -> None:
    table = TokenTable.parse("METERING_AUTH_TOKENS", METERING_TOKENS, METERING_ROLES)
    assert table.role_of(RENDERER_TOKEN) == "renderer"
    assert table.role_of(BACKEND_TOKEN) == table.role_of(BACKEND_TOKEN_NEXT) == "backend"
    assert table.role_of(OPS_TOKEN) == "ops"
    for presented in (WRONG_TOKEN, "", OPS_TOKEN + " ", OPS_TOKEN[:-1], "\udcff" * 20):
        assert table.role_of(presented) is None
    assert table.roles == {"renderer", "backend", "ops"}
    assert_no_token_in(repr(table))
    spaced = TokenTable.parse("X", f" ops : {OPS_TOKEN} ,backend:{BACKEND_TOKEN}", METERING_ROLES)
    assert spaced.role_of(OPS_TOKEN) == "ops"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (f"admin:{OPS_TOKEN}", "unknown role 'admin'"),
        (f"{OPS_TOKEN}:ops", "unknown role (not shown; is the pair reversed?)"),
        ("ops:", "empty token"),
        ("ops:short-token", "shorter than 16 characters"),
        (OPS_TOKEN, "is not role:token"),
        (f"ops:{OPS_TOKEN},", "entry 2 is empty"),
        (f"ops:{OPS_TOKEN[:8]} {OPS_TOKEN[8:]}", "visible ASCII"),
        (f"ops:{OPS_TOKEN}é", "visible ASCII"),
        (f"ops:{OPS_TOKEN},backend:{OPS_TOKEN}", "the same token is listed for roles ops and backend"),
    ],
)
def test_bad_token_settings_stop_start_up_naming_the_variable_and_not_the_token(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Config.from_env({"METERING_AUTH_TOKENS": text})
    message = str(refused.value)
    assert message.startswith("METERING_AUTH_TOKENS: entry ")
    assert complaint in message
    assert_no_token_in(message)
    assert OPS_TOKEN[:8] not in message


def test_renderer_tokens_know_only_the_renderers_roles() -> None:
    with pytest.raises(RendererConfigError, match=r"RENDERER_AUTH_TOKENS: entry 1 has an unknown role 'renderer'"):
        RendererConfig.from_env({"RENDERER_AUTH_TOKENS": f"renderer:{RENDERER_TOKEN}"})
    with pytest.raises(RendererConfigError, match=r"RENDERER_AUTH_TOKENS: .*shorter than 16"):
        RendererConfig.from_env({"RENDERER_AUTH_TOKENS": "ops:0123456789"})
    assert RENDERER_ROLES == {"backend", "ops"}


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:0", "10.1.2.3:50051", "metering.example:50051"])
def test_a_non_loopback_address_needs_tokens(listen: str) -> None:
    with pytest.raises(ConfigError, match="is not a loopback address; without authentication"):
        Config.from_env({"METERING_LISTEN": listen})
    config = Config.from_env({"METERING_LISTEN": listen, "METERING_AUTH_TOKENS": f"ops:{OPS_TOKEN}"})
    assert config.auth is not None and config.auth.roles == {"ops"}
    renderer_listen = listen.replace("50051", "50052")
    with pytest.raises(RendererConfigError, match="is not a loopback address; without authentication"):
        RendererConfig.from_env({"RENDERER_LISTEN": renderer_listen})
    assert RendererConfig.from_env(
        {"RENDERER_LISTEN": renderer_listen, "RENDERER_AUTH_TOKENS": RENDERER_TOKENS}
    ).auth is not None


def test_loopback_means_an_address_not_a_name_that_starts_like_one() -> None:
    with pytest.raises(RendererConfigError, match="not a loopback address"):
        RendererConfig.from_env({"RENDERER_LISTEN": "127.attacker.example:50052"})
    for listen in ("127.0.0.1:0", "127.0.0.2:0", "[::1]:0", "localhost:0"):
        assert RendererConfig.from_env({"RENDERER_LISTEN": listen}).auth is None


def test_the_metering_token_stays_out_of_the_renderers_config_repr() -> None:
    config = RendererConfig.from_env({"METERING_TOKEN": RENDERER_TOKEN, "RENDERER_AUTH_TOKENS": RENDERER_TOKENS})
    assert config.metering_token == RENDERER_TOKEN
    assert_no_token_in(repr(config))
    with pytest.raises(RendererConfigError) as refused:
        RendererConfig.from_env({"METERING_TOKEN": "token with spaces in it"})
    assert "METERING_TOKEN" in str(refused.value) and "spaces" not in str(refused.value)


def test_every_rpc_has_an_access_rule_and_nothing_else_does() -> None:
    for access, proto, service in (
        (METERING_ACCESS, pb, "Metering"),
        (RENDERER_ACCESS, renderer_pb2, "Renderer"),
    ):
        descriptor = proto.DESCRIPTOR.services_by_name[service]
        assert set(access.rules) == {f"/{descriptor.full_name}/{method.name}" for method in descriptor.methods}


@pytest.mark.parametrize(
    ("service", "env", "complaint"),
    [
        ("metering", {"METERING_AUTH_TOKENS": f"ops:{OPS_TOKEN[:10]}"}, "METERING_AUTH_TOKENS: entry 1 (role ops)"),
        ("metering", {"METERING_AUTH_TOKENS": f"root:{OPS_TOKEN}"}, "METERING_AUTH_TOKENS: entry 1 has an unknown"),
        ("renderer", {"RENDERER_AUTH_TOKENS": f"ops:{OPS_TOKEN[:10]}"}, "RENDERER_AUTH_TOKENS: entry 1 (role ops)"),
        ("renderer", {"RENDERER_LISTEN": "0.0.0.0:0"}, "RENDERER_LISTEN=0.0.0.0:0 is not a loopback address"),
    ],
)
def test_the_servers_refuse_to_start_with_bad_auth_settings(service: str, env: dict[str, str], complaint: str) -> None:
    child_env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("METERING_", "RENDERER_", "RENDER_")) and key != "DATABASE_URL"
    }
    child_env.update({"DATABASE_URL": "postgresql://unused/x", **env})
    result = subprocess.run(
        [sys.executable, "-m", service], cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{service}: configuration error: {complaint}" in result.stderr
    assert "Traceback" not in result.stderr
    assert OPS_TOKEN[:10] not in result.stderr + result.stdout
