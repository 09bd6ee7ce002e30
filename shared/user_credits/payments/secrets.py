"""The Stripe API key and webhook secret: from the environment when set, else from Secrets Manager.

SPEC 6: the secret named by STRIPE_SECRET_NAME (JSON `{"apiKey", "webhookSecret"}`) is read once and
kept for `MAX_AGE_SECONDS`, so a warm function makes no Secrets Manager call per request, yet one that
started before the operator filled in the secret (or rotated it) does not keep the old value for its
whole life.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from user_credits.config import Settings, load_settings
from user_credits.errors import ConfigurationError


@dataclass(frozen=True)
class StripeKeys:
    api_key: str
    webhook_secret: str


MAX_AGE_SECONDS = 300
_secret_cache: dict[str, tuple[float, dict[str, Any]]] = {}


def _read_secret(name: str) -> dict[str, Any]:
    cached = _secret_cache.get(name)
    if cached is None or time.monotonic() - cached[0] > MAX_AGE_SECONDS:
        # Imported here: only a cold start that lacks the env vars pays for the Powertools parameters module.
        from aws_lambda_powertools.utilities import parameters

        try:
            raw = parameters.get_secret(name)
        except parameters.exceptions.GetParameterError as exc:
            raise ConfigurationError(f"cannot read the Stripe secret {name!r}: {exc}") from exc
        try:
            parsed = json.loads(raw if isinstance(raw, str) else bytes(raw).decode())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"the Stripe secret {name!r} is not JSON") from exc
        if not isinstance(parsed, dict):
            raise ConfigurationError(f'the Stripe secret {name!r} must be {{"apiKey", "webhookSecret"}}')
        _secret_cache[name] = (time.monotonic(), parsed)
    return _secret_cache[name][1]


def _from_secret(settings: Settings, field: str) -> str:
    if not settings.stripe_secret_name:
        raise ConfigurationError(f"neither the env var nor STRIPE_SECRET_NAME provides the Stripe {field}")
    value = _read_secret(settings.stripe_secret_name).get(field)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"the Stripe secret has no {field}")
    return value


def api_key(settings: Settings | None = None) -> str:
    settings = settings or load_settings()
    return settings.stripe_api_key or _from_secret(settings, "apiKey")


def webhook_secret(settings: Settings | None = None) -> str:
    settings = settings or load_settings()
    return settings.stripe_webhook_secret or _from_secret(settings, "webhookSecret")


def stripe_keys(settings: Settings | None = None) -> StripeKeys:
    return StripeKeys(api_key(settings), webhook_secret(settings))


def forget_cached_secret() -> None:
    """For tests and the local server: the next read goes to Secrets Manager again."""
    _secret_cache.clear()
