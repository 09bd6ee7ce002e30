"""The service's configuration, parsed once from the environment into a typed object.

A missing table name fails at the first request with a message that names the variable, instead of a
KeyError deep inside a DynamoDB call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from user_credits.errors import ConfigurationError


@dataclass(frozen=True)
class Settings:
    offers_table: str
    accounts_table: str
    ledger_table: str
    idempotency_table: str
    event_bus_name: str = "default"
    default_currency: str = "usd"
    low_balance_thresholds: Mapping[str, int] = field(default_factory=dict)
    warn_before_expiry_seconds: int = 3 * 24 * 3600
    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_secret_name: str | None = None
    stripe_api_base: str | None = None


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigurationError(f"environment variable {name} is not set")
    return value


def _thresholds(raw: str) -> dict[str, int]:
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"LOW_BALANCE_THRESHOLDS is not JSON: {exc}") from exc
    if not isinstance(parsed, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in parsed.items()
    ):
        raise ConfigurationError('LOW_BALANCE_THRESHOLDS must be a JSON object {"group": integer}')
    return parsed


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from exc


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


_cache: tuple[tuple[tuple[str, str], ...], Settings] | None = None
_KEYS = (
    "OFFERS_TABLE", "ACCOUNTS_TABLE", "LEDGER_TABLE", "IDEMPOTENCY_TABLE", "EVENT_BUS_NAME",
    "DEFAULT_CURRENCY", "LOW_BALANCE_THRESHOLDS", "WARN_BEFORE_EXPIRY_SECONDS", "STRIPE_API_KEY",
    "STRIPE_WEBHOOK_SECRET", "STRIPE_SECRET_NAME", "STRIPE_API_BASE",
)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse the environment; cached while the relevant variables are unchanged (one parse per cold start)."""
    global _cache
    source = os.environ if env is None else env
    snapshot = tuple((k, source.get(k, "")) for k in _KEYS)
    if _cache is not None and _cache[0] == snapshot:
        return _cache[1]
    settings = Settings(
        offers_table=_required(source, "OFFERS_TABLE"),
        accounts_table=_required(source, "ACCOUNTS_TABLE"),
        ledger_table=_required(source, "LEDGER_TABLE"),
        idempotency_table=_required(source, "IDEMPOTENCY_TABLE"),
        event_bus_name=_optional(source, "EVENT_BUS_NAME") or "default",
        default_currency=(_optional(source, "DEFAULT_CURRENCY") or "usd").lower(),
        low_balance_thresholds=_thresholds(source.get("LOW_BALANCE_THRESHOLDS", "")),
        warn_before_expiry_seconds=_int(source, "WARN_BEFORE_EXPIRY_SECONDS", 3 * 24 * 3600),
        stripe_api_key=_optional(source, "STRIPE_API_KEY"),
        stripe_webhook_secret=_optional(source, "STRIPE_WEBHOOK_SECRET"),
        stripe_secret_name=_optional(source, "STRIPE_SECRET_NAME"),
        stripe_api_base=_optional(source, "STRIPE_API_BASE"),
    )
    _cache = (snapshot, settings)
    return settings
