"""TLS and mutual TLS on both servers and on the renderer's channel to metering, with a throwaway CA made
at test time (tests/support/tls.py): plaintext and certificate-less clients are refused, the right
certificate works, and a render goes through end to end over mTLS with tokens on both sides."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exportapi.metering.v1 import metering_pb2 as pb
from exportapi.metering.v1 import metering_pb2_grpc
from exportapi.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from metering import cli as metering_cli
from metering.config import Config, ConfigError
from renderer.config import ConfigError as RendererConfigError
from renderer.config import RendererConfig
from tests.support.metering import start_metering
from tests.support.renderer import start_renderer, tiny_composition
from tests.support.tls import Pki, make_pki

OPS_TOKEN = "ops-token-for-the-tls-tests"
RENDERER_TOKEN = "renderer-token-for-the-tls-tests"
BACKEND_TOKEN = "backend-token-for-the-tls-tests"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def credentials(pki: Pki, *, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


async def health(channel: grpc.aio.Channel) -> grpc.StatusCode | int:
    """The health answer, or the code of the failed call."""
    try:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return answer.status


async def usage_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await metering_pb2_grpc.MeteringStub(channel).GetUsage(pb.GetUsageRequest(user_id="alice"), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def tls_metering(database_url: str, pki: Pki, **options: object) -> AsyncIterator[str]:
    env = pki.server_env("METERING", mutual=bool(options.get("mutual")))
    if options.get("tokens"):
        env["METERING_AUTH_TOKENS"] = f"renderer:{RENDERER_TOKEN},backend:{BACKEND_TOKEN},ops:{OPS_TOKEN}"
    async with start_metering(database_url, env=env) as metering:
        yield metering.target


async def test_tls_server_refuses_a_plaintext_client_and_serves_a_tls_one(database_url: str, pki: Pki) -> None:
    async with tls_metering(database_url, pki) as target:
        async with grpc.aio.insecure_channel(target) as plaintext:
            plaintext_answer = await usage_code(plaintext)
            plaintext_health = await health(plaintext)
        async with grpc.aio.secure_channel(target, credentials(pki)) as secure:
            secure_answer = await usage_code(secure)
            secure_health = await health(secure)
        # A client that trusts another CA does not accept the server either.
        rogue = grpc.ssl_channel_credentials(root_certificates=pki.rogue_ca.read_bytes())
        async with grpc.aio.secure_channel(target, rogue) as wrong_ca:
            wrong_ca_answer = await usage_code(wrong_ca)

    assert plaintext_answer == plaintext_health == grpc.StatusCode.UNAVAILABLE
    assert (secure_answer, secure_health) == (grpc.StatusCode.OK, SERVING)
    assert wrong_ca_answer == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(database_url: str, pki: Pki) -> None:
    async with tls_metering(database_url, pki, mutual=True) as target:
        answers = {}
        for name, creds in {
            "no certificate": credentials(pki),
            "certificate of another CA": credentials(pki, cert=pki.rogue_client_cert, key=pki.rogue_client_key),
            "certificate of the CA": credentials(pki, cert=pki.client_cert, key=pki.client_key),
        }.items():
            async with grpc.aio.secure_channel(target, creds) as channel:
                answers[name] = (await usage_code(channel), await health(channel))

    assert answers == {
        "no certificate": (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        "certificate of another CA": (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        "certificate of the CA": (grpc.StatusCode.OK, SERVING),
    }


async def test_a_render_over_mutual_tls_with_tokens_on_both_sides(
    database_url: str, pki: Pki, tmp_path: Path
) -> None:
    async with (
        tls_metering(database_url, pki, mutual=True, tokens=True) as metering_target,
        start_renderer(
            metering_target,
            tmp_path,
            METERING_TOKEN=RENDERER_TOKEN,
            RENDERER_AUTH_TOKENS=f"backend:{BACKEND_TOKEN}",
            **pki.client_env("METERING", with_cert=True),
            **pki.server_env("RENDERER", mutual=True),
        ) as running,
        grpc.aio.secure_channel(
            running.target, credentials(pki, cert=pki.client_cert, key=pki.client_key)
        ) as channel,
    ):
        metadata = (("authorization", f"Bearer {BACKEND_TOKEN}"),)
        stub = renderer_pb2_grpc.RendererStub(channel)
        serving = await _wait_health(channel, SERVING)
        job = await stub.StartRender(
            renderer_pb2.StartRenderRequest(
                idempotency_key="k", user_id="alice", project_id="p", format="gif", composition=tiny_composition(0.5)
            ),
            metadata=metadata,
        )
        async for update in stub.WatchRender(renderer_pb2.WatchRenderRequest(job_id=job.job_id), metadata=metadata):
            job = update
        async with grpc.aio.insecure_channel(running.target) as plaintext:
            plaintext_health = await health(plaintext)

    assert serving == SERVING  # its health follows metering's, reached over mTLS
    assert job.state == renderer_pb2.RenderJob.SUCCEEDED, job.error
    assert plaintext_health == grpc.StatusCode.UNAVAILABLE


async def _wait_health(channel: grpc.aio.Channel, wanted: int) -> grpc.StatusCode | int:
    """The renderer's health follows metering's through a probe every 2 s: wait for it to settle."""
    status: grpc.StatusCode | int = grpc.StatusCode.UNKNOWN
    for _ in range(100):
        status = await health(channel)
        if status == wanted:
            break
        await asyncio.sleep(0.05)
    return status


async def test_a_renderer_without_its_client_certificate_renders_nothing(
    database_url: str, pki: Pki, tmp_path: Path
) -> None:
    async with (
        tls_metering(database_url, pki, mutual=True) as metering_target,
        start_renderer(metering_target, tmp_path, **pki.client_env("METERING")) as running,
        grpc.aio.insecure_channel(running.target) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await renderer_pb2_grpc.RendererStub(channel).StartRender(
                renderer_pb2.StartRenderRequest(
                    idempotency_key="k", user_id="alice", project_id="p", format="gif",
                    composition=tiny_composition(0.5),
                )
            )
        renderer_health = await _wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert "nothing was rendered" in (refused.value.details() or "")
    assert renderer_health == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_metering_cli_speaks_tls_with_metering_tls_ca_file(
    database_url: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_metering(database_url, pki, mutual=True, tokens=True) as target:

        async def run() -> tuple[int, str]:
            out = io.StringIO()
            code = await asyncio.to_thread(metering_cli.main, ["--target", target, "--json", "usage", "alice"], out)
            return code, out.getvalue()

        monkeypatch.setenv("METERING_TOKEN", BACKEND_TOKEN)
        for name in ("METERING_TLS_CA_FILE", "METERING_TLS_CLIENT_CERT_FILE", "METERING_TLS_CLIENT_KEY_FILE"):
            monkeypatch.delenv(name, raising=False)
        plaintext = await run()
        for name, value in pki.client_env("METERING", with_cert=True).items():
            monkeypatch.setenv(name, value)
        secure = await run()

    assert plaintext[0] == 3  # cannot reach metering
    assert secure[0] == 0 and json.loads(secure[1])["user_id"] == "alice"


# --- configuration ---------------------------------------------------------------------------------------


def _metering_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as refused:
        Config.from_env(env)
    return str(refused.value)


def test_tls_settings_are_checked_at_start_up(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    missing = str(tmp_path / "missing.pem")
    assert "METERING_TLS_CERT_FILE and METERING_TLS_KEY_FILE go together" in _metering_error(
        {"METERING_TLS_CERT_FILE": cert}
    )
    assert "METERING_TLS_CLIENT_CA_FILE (mutual TLS) needs METERING_TLS_CERT_FILE" in _metering_error(
        {"METERING_TLS_CLIENT_CA_FILE": ca}
    )
    assert _metering_error({"METERING_TLS_CERT_FILE": missing, "METERING_TLS_KEY_FILE": key}).startswith(
        f"METERING_TLS_CERT_FILE={missing}: cannot read it"
    )
    # The key where the certificate goes and the other way round: neither file holds what it should.
    swapped = _metering_error({"METERING_TLS_CERT_FILE": cert, "METERING_TLS_KEY_FILE": cert})
    assert swapped == f"METERING_TLS_KEY_FILE={cert}: not a PEM file with a PRIVATE KEY"
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello")
    assert "not a PEM file with a CERTIFICATE" in _metering_error(
        {"METERING_TLS_CERT_FILE": str(not_pem), "METERING_TLS_KEY_FILE": key}
    )
    # Caught now, not as gRPC's "Failed to bind" or a failing handshake later.
    assert _metering_error({"METERING_TLS_CERT_FILE": cert, "METERING_TLS_KEY_FILE": str(pki.client_key)}) == (
        f"METERING_TLS_KEY_FILE={pki.client_key}: not the key of the certificate in METERING_TLS_CERT_FILE={cert}"
    )
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "the key is encrypted" in _metering_error(
        {"METERING_TLS_CERT_FILE": cert, "METERING_TLS_KEY_FILE": str(encrypted)}
    )
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    assert _metering_error(
        {"METERING_TLS_CERT_FILE": cert, "METERING_TLS_KEY_FILE": key, "METERING_TLS_CLIENT_CA_FILE": str(garbled)}
    ) == f"METERING_TLS_CLIENT_CA_FILE={garbled}: not a readable PEM certificate"
    config = Config.from_env(
        {"METERING_TLS_CERT_FILE": cert, "METERING_TLS_KEY_FILE": key, "METERING_TLS_CLIENT_CA_FILE": ca}
    )
    assert config.tls is not None and config.tls.mutual
    assert "PRIVATE KEY" not in repr(config)  # key material stays out of reprs and logs

    client_cert_only = {
        "METERING_TLS_CLIENT_CERT_FILE": str(pki.client_cert), "METERING_TLS_CLIENT_KEY_FILE": str(pki.client_key)
    }
    with pytest.raises(RendererConfigError, match=r"CLIENT_CERT_FILE \(mutual TLS\) needs METERING_TLS_CA"):
        RendererConfig.from_env(client_cert_only)
    with pytest.raises(RendererConfigError, match="RENDERER_TLS_CERT_FILE and RENDERER_TLS_KEY_FILE go together"):
        RendererConfig.from_env({"RENDERER_TLS_KEY_FILE": key})
    renderer = RendererConfig.from_env({**pki.server_env("RENDERER"), **pki.client_env("METERING", with_cert=True)})
    assert renderer.tls is not None and not renderer.tls.mutual and renderer.metering_tls is not None
