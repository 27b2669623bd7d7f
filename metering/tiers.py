"""Tiers: daily limits and the longest video, from a TOML file over the contract's built-in defaults.

File format (every key optional; a tier named in the file replaces the built-in tier of that name
entirely, so a key left out there means "no limit")::

    [tiers.free]
    daily_limit = 3
    max_duration_seconds = 30
    project_daily_limit = 10

    [tiers.team]
    daily_limit = 500
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIER = "free"  # the tier of a user metering has never seen (contract)
TIER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")  # \Z: `$` would let a trailing newline through
# Limits travel as PostgreSQL bigint and protobuf int64; a billion exports a day already means "no limit".
MAX_COUNT = 1 << 62
_KEYS = frozenset({"daily_limit", "max_duration_seconds", "project_daily_limit"})


class TierConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    daily_limit: int | None = None
    max_duration_seconds: float | None = None
    project_daily_limit: int | None = None


BUILT_IN_TIERS: tuple[Tier, ...] = (
    Tier("free", daily_limit=3, max_duration_seconds=30.0),
    Tier("pro", daily_limit=50, max_duration_seconds=120.0),
    Tier("unlimited"),
)


class TierTable(Mapping[str, Tier]):
    """The configured tiers by name; always contains the default tier."""

    def __init__(self, tiers: Mapping[str, Tier]) -> None:
        if DEFAULT_TIER not in tiers:
            raise TierConfigError(f"the tier {DEFAULT_TIER!r} must exist (users never seen are {DEFAULT_TIER})")
        self._tiers = dict(tiers)

    def __getitem__(self, name: str) -> Tier:
        return self._tiers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tiers)

    def __len__(self) -> int:
        return len(self._tiers)

    @property
    def default(self) -> Tier:
        return self._tiers[DEFAULT_TIER]

    def resolve(self, name: str | None) -> Tier:
        """The tier of an account; an account whose tier was removed from the config falls back to
        the default tier rather than failing its renders."""
        if name is None:
            return self.default
        return self._tiers.get(name, self.default)

    @classmethod
    def built_in(cls) -> TierTable:
        return cls({tier.name: tier for tier in BUILT_IN_TIERS})

    @classmethod
    def load(cls, path: Path | None) -> TierTable:
        tiers = {tier.name: tier for tier in BUILT_IN_TIERS}
        if path is None:
            return cls(tiers)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise TierConfigError(f"cannot read tiers file {path}: {error.strerror or error}") from error
        except tomllib.TOMLDecodeError as error:
            raise TierConfigError(f"tiers file {path} is not valid TOML: {error}") from error
        unknown_top = set(document) - {"tiers"}
        if unknown_top:
            raise TierConfigError(f"tiers file {path}: unknown top-level keys {sorted(unknown_top)}")
        section = document.get("tiers", {})
        if not isinstance(section, dict):
            raise TierConfigError(f"tiers file {path}: [tiers] must be a table")
        for name, values in section.items():
            tiers[name] = _parse_tier(path, name, values)
        return cls(tiers)


def _parse_tier(path: Path, name: str, values: object) -> Tier:
    where = f"tiers file {path}, tier {name!r}"
    if not TIER_NAME.match(name):
        raise TierConfigError(f"{where}: a tier name is 1-32 of a-z, 0-9, '_' or '-', starting with a letter")
    if not isinstance(values, dict):
        raise TierConfigError(f"{where}: must be a table")
    unknown = set(values) - _KEYS
    if unknown:
        raise TierConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    return Tier(
        name,
        daily_limit=_count(where, "daily_limit", values.get("daily_limit")),
        max_duration_seconds=_seconds(where, values.get("max_duration_seconds")),
        project_daily_limit=_count(where, "project_daily_limit", values.get("project_daily_limit")),
    )


def _count(where: str, key: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise TierConfigError(f"{where}: {key} must be a whole number from 0 to 2**62, got {value!r}")
    return value


def _seconds(where: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise TierConfigError(f"{where}: max_duration_seconds must be a number > 0, got {value!r}")
    return float(value)
