"""Configuration of the metering server, read from the environment once and validated at start-up."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from metering.auth import METERING_ROLES, AuthConfigError, ServerTls, TokenTable, read_pem
from metering.tiers import TierConfigError, TierTable

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_LEASE_SECONDS = 120.0
MIN_LEASE_SECONDS = 1.0
MAX_LEASE_SECONDS = 86400.0
MAX_RETENTION_DAYS = 36500  # a hundred years: "keep everything" (0 means never archive)
DEFAULT_RETENTION_DAYS = 90
DEFAULT_ARCHIVE_INTERVAL_SECONDS = 3600.0


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Config:
    database_url: str | None  # None: start the embedded PostgreSQL under data_dir/pg
    listen_host: str
    listen_port: int
    lease_seconds: float
    reaper_interval_seconds: float
    health_probe_seconds: float
    gauge_refresh_seconds: float  # the ledger gauges (reservations in flight, users near their limit)
    shutdown_grace_seconds: float
    tiers: TierTable
    day_zone: ZoneInfo
    data_dir: Path
    db_pool_size: int
    db_connect_timeout_seconds: float
    db_command_timeout_seconds: float
    db_startup_timeout_seconds: float
    log_level: str
    metrics_listen: str | None = None  # host:port of /metrics; None: not served
    auth: TokenTable | None = None  # None: no authentication, loopback only
    tls: ServerTls | None = None  # None: plaintext
    retention_days: int = DEFAULT_RETENTION_DAYS  # closed exports older than this move to the archive; 0: never
    archive_interval_seconds: float = DEFAULT_ARCHIVE_INTERVAL_SECONDS  # how often each replica archives

    @property
    def listen_address(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        host, port = parse_listen("METERING_LISTEN", env.get("METERING_LISTEN") or DEFAULT_LISTEN)
        try:
            auth = _auth_tokens(env)
            tls = ServerTls.from_files(
                read_pem(env, "METERING_TLS_CERT_FILE"),
                read_pem(env, "METERING_TLS_KEY_FILE", kind="PRIVATE KEY"),
                read_pem(env, "METERING_TLS_CLIENT_CA_FILE"),
                names=("METERING_TLS_CERT_FILE", "METERING_TLS_KEY_FILE", "METERING_TLS_CLIENT_CA_FILE"),
            )
        except AuthConfigError as error:
            raise ConfigError(str(error)) from None
        # Without authentication every caller is trusted, so only this machine may call.
        if auth is None and not is_loopback(host):
            raise ConfigError(
                f"METERING_LISTEN={host}:{port} is not a loopback address; without authentication "
                "(METERING_AUTH_TOKENS unset) metering serves only 127.0.0.1 / ::1"
            )
        # Shorter, and every reservation is born expired while the reaper spins; far longer, and a crashed
        # renderer holds its quota for days (and lease ends past year 9999 fail every reservation).
        lease = _seconds(
            env, "METERING_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, minimum=MIN_LEASE_SECONDS, maximum=MAX_LEASE_SECONDS
        )
        tiers_file = env.get("METERING_TIERS_FILE") or None
        try:
            tiers = TierTable.load(Path(tiers_file) if tiers_file else None)
        except TierConfigError as error:
            raise ConfigError(f"METERING_TIERS_FILE: {error}") from error
        zone_name = env.get("METERING_DAY_TIMEZONE") or "UTC"
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ConfigError(f"METERING_DAY_TIMEZONE={zone_name!r} is not a known time zone") from error
        log_level = (env.get("METERING_LOG_LEVEL") or "INFO").upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"METERING_LOG_LEVEL={log_level!r}: one of DEBUG, INFO, WARNING, ERROR")
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            listen_host=host,
            listen_port=port,
            lease_seconds=lease,
            reaper_interval_seconds=_seconds(
                env, "METERING_REAPER_INTERVAL_SECONDS", min(lease / 4, 5.0)
            ),
            health_probe_seconds=_seconds(env, "METERING_HEALTH_PROBE_SECONDS", 2.0),
            # Not with every health probe: counting the users near their limit reads every user of the day
            # (25 ms of PostgreSQL at 6,000 users), and Prometheus scrapes every 15-60 s anyway.
            gauge_refresh_seconds=_seconds(env, "METERING_GAUGE_REFRESH_SECONDS", 15.0),
            shutdown_grace_seconds=_seconds(env, "METERING_SHUTDOWN_GRACE_SECONDS", 10.0, allow_zero=True),
            tiers=tiers,
            day_zone=zone,
            data_dir=Path(env.get("METERING_DATA_DIR") or REPO_ROOT / ".data"),
            db_pool_size=_count(env, "METERING_DB_POOL_SIZE", 10),
            db_connect_timeout_seconds=_seconds(env, "METERING_DB_CONNECT_TIMEOUT_SECONDS", 5.0),
            db_command_timeout_seconds=_seconds(env, "METERING_DB_COMMAND_TIMEOUT_SECONDS", 30.0),
            db_startup_timeout_seconds=_seconds(env, "METERING_DB_STARTUP_TIMEOUT_SECONDS", 30.0),
            log_level=log_level,
            metrics_listen=_metrics_listen(env),
            auth=auth,
            tls=tls,
            retention_days=retention_days(env),
            archive_interval_seconds=_seconds(
                env, "METERING_ARCHIVE_INTERVAL_SECONDS", DEFAULT_ARCHIVE_INTERVAL_SECONDS
            ),
        )


def retention_days(env: Mapping[str, str]) -> int:
    """METERING_RETENTION_DAYS: closed exports older than this many days move to the archive; 0 never."""
    raw = (env.get("METERING_RETENTION_DAYS") or "").strip()
    if not raw:
        return DEFAULT_RETENTION_DAYS
    invalid = ConfigError(
        f"METERING_RETENTION_DAYS={raw!r}: expected a whole number of days from 0 to {MAX_RETENTION_DAYS} "
        "(0: never archive)"
    )
    try:
        value = int(raw)
    except ValueError:
        raise invalid from None
    if not 0 <= value <= MAX_RETENTION_DAYS:  # beyond, the archiver's cut-off date is before year 1
        raise invalid
    return value


def _auth_tokens(env: Mapping[str, str]) -> TokenTable | None:
    text = (env.get("METERING_AUTH_TOKENS") or "").strip()
    return TokenTable.parse("METERING_AUTH_TOKENS", text, METERING_ROLES) if text else None


def _metrics_listen(env: Mapping[str, str]) -> str | None:
    value = (env.get("METERING_METRICS_LISTEN") or "").strip()
    if not value:
        return None
    host, port = parse_listen("METERING_METRICS_LISTEN", value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(variable: str, value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{variable}={value!r}: expected host:port, e.g. {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{variable}={value!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{variable}={value!r}: the port must be 0..65535 (0 picks a free one)")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _seconds(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    allow_zero: bool = False,
    minimum: float = 0.0,
    maximum: float = math.inf,
) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={raw!r}: expected a finite number of seconds > 0")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={raw!r}: expected {minimum:g} to {maximum:g} seconds")
    return value


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value < 1:
        raise ConfigError(f"{name}={raw!r}: expected a whole number >= 1")
    return value
