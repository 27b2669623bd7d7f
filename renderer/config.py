"""The renderer's configuration: read from the environment once, validated at start-up."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from metering.auth import RENDERER_ROLES, AuthConfigError, ClientTls, ServerTls, TokenTable, read_pem
from metering.config import is_loopback as is_loopback_host
from renderer.domain import RenderMode
from renderer.lambda_handler import DEFAULT_KEY_PREFIX, SAFE_KEY_PREFIX
from renderer.metering_client import RESERVE_RETRY_DELAY_SECONDS
from renderer.sources import parse_asset_roots, parse_buckets

REPO_ROOT = Path(__file__).resolve().parent.parent
# S3's rules for a bucket name (3-63 of a-z, 0-9, '.', '-'; a letter or digit at each end): anything else,
# such as "s3://bucket" or a key prefix, would only fail at the first upload or fetch, after a reservation.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+\Z")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the variable."""


@dataclass(frozen=True, slots=True)
class LambdaSettings:
    function_name: str
    bucket: str
    chunk_seconds: float
    max_concurrency: int
    timeout_seconds: float
    endpoint_url: str | None
    s3_endpoint_url: str | None
    region: str
    key_prefix: str
    # What the function may read (the stack's source bucket and SourcePrefix): checked before reserving.
    source_buckets: frozenset[str]
    source_prefix: str


# After the renders of a drain have ended: time for WatchRender streams to send the final state, and for calls
# under way to be answered, before gRPC stops.
FINAL_ANSWERS_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class RendererConfig:
    listen: str
    metering_target: str
    default_mode: RenderMode
    output_dir: Path
    state_dir: Path
    concurrency: int
    max_waiting: int  # renders that may wait for a slot beyond `concurrency`; more are refused (RENDER_MAX_WAITING)
    asset_roots: tuple[Path, ...]
    source_buckets: frozenset[str]  # buckets s3:// sources may come from (RENDER_SOURCE_BUCKETS)
    stall_seconds: float  # stop an ffmpeg that shows no sign of life this long (RENDER_STALL_SECONDS)
    shutdown_grace_seconds: float  # after SIGTERM, renders under way get this long to finish
    output_retention_hours: float  # finished local renders older than this are removed; 0: kept
    metering_timeout_seconds: float
    metering_token: str | None = field(repr=False)  # a secret: kept out of repr and logs
    metrics_listen: str | None
    lambda_settings: LambdaSettings | None
    auth: TokenTable | None = None  # RENDERER_AUTH_TOKENS; None: no authentication, loopback only
    tls: ServerTls | None = None  # RENDERER_TLS_*; None: plaintext
    metering_tls: ClientTls | None = None  # METERING_TLS_*: how to reach metering; None: plaintext

    @property
    def drain_seconds(self) -> float:
        """The longest a renderer takes to exit after SIGTERM: the renders' grace (or, when longer, a start's
        reservation under way: two metering calls at most), then their completions (one metering call each, at
        once; the outbox keeps what is not acknowledged), then its last answers."""
        reserving = 2 * self.metering_timeout_seconds + RESERVE_RETRY_DELAY_SECONDS
        return max(self.shutdown_grace_seconds, reserving) + self.metering_timeout_seconds + FINAL_ANSWERS_SECONDS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RendererConfig:
        env = os.environ if env is None else env
        data_dir = REPO_ROOT / ".data"
        mode_text = env.get("RENDER_MODE", "local").strip().lower()
        try:
            default_mode = RenderMode(mode_text)
        except ValueError:
            raise ConfigError(f"RENDER_MODE must be 'local' or 'lambda', not {mode_text!r}") from None
        source_buckets = _buckets(env, "RENDER_SOURCE_BUCKETS")
        lambda_settings = _lambda_settings(env, source_buckets)
        if default_mode is RenderMode.LAMBDA and lambda_settings is None:
            raise ConfigError("RENDER_MODE=lambda needs LAMBDA_FUNCTION_NAME and RENDER_BUCKET")
        roots = tuple(root.resolve() for root in parse_asset_roots(env.get("RENDER_ASSET_ROOTS")))
        listen = _host_port(env, "RENDERER_LISTEN", "127.0.0.1:50052")
        try:
            auth = _auth_tokens(env)
            tls = ServerTls.from_files(
                read_pem(env, "RENDERER_TLS_CERT_FILE"),
                read_pem(env, "RENDERER_TLS_KEY_FILE", kind="PRIVATE KEY"),
                read_pem(env, "RENDERER_TLS_CLIENT_CA_FILE"),
                names=("RENDERER_TLS_CERT_FILE", "RENDERER_TLS_KEY_FILE", "RENDERER_TLS_CLIENT_CA_FILE"),
            )
            metering_tls = ClientTls.from_files(
                read_pem(env, "METERING_TLS_CA_FILE"),
                read_pem(env, "METERING_TLS_CLIENT_CERT_FILE"),
                read_pem(env, "METERING_TLS_CLIENT_KEY_FILE", kind="PRIVATE KEY"),
                names=("METERING_TLS_CA_FILE", "METERING_TLS_CLIENT_CERT_FILE", "METERING_TLS_CLIENT_KEY_FILE"),
            )
        except AuthConfigError as error:
            raise ConfigError(str(error)) from None
        require_auth_beyond_loopback(listen, auth)
        concurrency = _int(env, "RENDER_CONCURRENCY", os.cpu_count() or 1, minimum=1, maximum=256)
        return cls(
            listen=listen,
            metering_target=_host_port(env, "METERING_TARGET", "127.0.0.1:50051"),
            default_mode=default_mode,
            output_dir=Path(env.get("RENDER_OUTPUT_DIR") or data_dir / "renders").resolve(),
            state_dir=Path(env.get("RENDER_STATE_DIR") or data_dir / "renderer").resolve(),
            concurrency=concurrency,
            max_waiting=_int(env, "RENDER_MAX_WAITING", 4 * concurrency, minimum=0, maximum=100_000),
            asset_roots=roots,
            source_buckets=source_buckets,
            stall_seconds=_float(env, "RENDER_STALL_SECONDS", 60.0, minimum=1.0),
            shutdown_grace_seconds=_float(env, "RENDER_SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0.0),
            output_retention_hours=_float(env, "RENDER_OUTPUT_RETENTION_HOURS", 0.0, minimum=0.0),
            metering_timeout_seconds=_float(env, "METERING_TIMEOUT_SECONDS", 5.0, minimum=0.1),
            metering_token=_metering_token(env),
            metrics_listen=_optional_host_port(env, "RENDERER_METRICS_LISTEN"),
            lambda_settings=lambda_settings,
            auth=auth,
            tls=tls,
            metering_tls=metering_tls,
        )


def _auth_tokens(env: Mapping[str, str]) -> TokenTable | None:
    text = env.get("RENDERER_AUTH_TOKENS", "").strip()
    return TokenTable.parse("RENDERER_AUTH_TOKENS", text, RENDERER_ROLES) if text else None


def _metering_token(env: Mapping[str, str]) -> str | None:
    token = env.get("METERING_TOKEN", "").strip()
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        # It goes into a metadata header; never echo it.
        raise ConfigError("METERING_TOKEN may hold only visible ASCII characters")
    return token or None


def require_auth_beyond_loopback(listen: str, auth: TokenTable | None) -> None:
    """Without authentication anyone who reaches the port could render: only this machine may call."""
    if auth is None and not is_loopback(listen):
        raise ConfigError(
            f"RENDERER_LISTEN={listen} is not a loopback address; without authentication "
            "(RENDERER_AUTH_TOKENS unset) the renderer serves only 127.0.0.1 / ::1"
        )


def _lambda_settings(env: Mapping[str, str], source_buckets: frozenset[str]) -> LambdaSettings | None:
    """`source_buckets` (RENDER_SOURCE_BUCKETS, local renders') stand in for RENDER_LAMBDA_SOURCE_BUCKETS,
    which came later, when it is unset."""
    function_name = env.get("LAMBDA_FUNCTION_NAME", "").strip()
    bucket = env.get("RENDER_BUCKET", "").strip()
    if not function_name and not bucket:
        return None
    if not function_name or not bucket:
        raise ConfigError("LAMBDA_FUNCTION_NAME and RENDER_BUCKET go together: set both or neither")
    return LambdaSettings(
        function_name=function_name,
        bucket=_bucket_name("RENDER_BUCKET", bucket),
        chunk_seconds=_float(env, "RENDER_LAMBDA_CHUNK_SECONDS", 10.0, minimum=0.5),
        max_concurrency=_int(env, "RENDER_LAMBDA_MAX_CONCURRENCY", 8, minimum=1, maximum=1000),
        timeout_seconds=_float(env, "RENDER_LAMBDA_TIMEOUT_SECONDS", 900.0, minimum=1.0),
        endpoint_url=env.get("AWS_ENDPOINT_URL_LAMBDA") or env.get("AWS_ENDPOINT_URL") or None,
        s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        region=_aws_region(env),
        key_prefix=_key_prefix(env, "RENDER_KEY_PREFIX", DEFAULT_KEY_PREFIX),
        source_buckets=_buckets(env, "RENDER_LAMBDA_SOURCE_BUCKETS") or source_buckets,
        source_prefix=_key_prefix(env, "RENDER_LAMBDA_SOURCE_PREFIX", ""),
    )


def _aws_region(env: Mapping[str, str]) -> str:
    """The region, read here for both of botocore's names (it reads only AWS_DEFAULT_REGION itself): without
    one every Lambda render would be reserved and then fail."""
    region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip()
    if not region:
        raise ConfigError("LAMBDA_FUNCTION_NAME is set but no AWS region is: set AWS_REGION (or AWS_DEFAULT_REGION)")
    if not _AWS_REGION.match(region):
        raise ConfigError(f"AWS_REGION: {region!r} is not an AWS region name (such as eu-west-1)")
    return region


def _key_prefix(env: Mapping[str, str], name: str, default: str) -> str:
    """RENDER_KEY_PREFIX: where the function writes (the template's RendersPrefix); the renderer names it in
    every invocation and cleans up under it, so both must agree. RENDER_LAMBDA_SOURCE_PREFIX: where it reads."""
    prefix = env.get(name, default).strip()
    if not SAFE_KEY_PREFIX.match(prefix):
        raise ConfigError(
            f"{name}: {prefix!r} must be empty or path segments of A-Z, a-z, 0-9, '_' and '-', "
            "each ending in '/' (such as renders/)"
        )
    return prefix


def _buckets(env: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(_bucket_name(name, bucket) for bucket in parse_buckets(env.get(name)))


def _bucket_name(variable: str, name: str) -> str:
    if not _BUCKET_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{variable}: {name!r} is not an S3 bucket name (3-63 of a-z, 0-9, '.' and '-'; no s3:// or path)"
        )
    return name


def ensure_writable_directory(directory: Path, variable: str) -> None:
    """Creates `directory` if need be and proves a file can be made in it: checked when the renderer starts,
    not at the first render, which would fail after its reservation."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"{variable}={directory}: not a directory the renderer can write to ({error})") from None


def _optional_host_port(env: Mapping[str, str], name: str) -> str | None:
    return _host_port(env, name, "") if env.get(name, "").strip() else None


def _host_port(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name} must be host:port, not {value!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {text!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, not {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {text!r}") from None
    if not value >= minimum or value == float("inf"):
        raise ConfigError(f"{name} must be a finite number of at least {minimum}, not {text}")
    return value


def is_loopback(listen: str) -> bool:
    """`listen` is host:port; the host must be a loopback address (or localhost), never a name that resolves."""
    return is_loopback_host(listen.rpartition(":")[0].strip("[]"))
