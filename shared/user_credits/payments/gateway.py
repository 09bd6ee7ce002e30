"""PaymentIntents through the official SDK's `StripeClient` (pointed at STRIPE_API_BASE when set)."""

from __future__ import annotations

from dataclasses import dataclass

import stripe

from user_credits.config import load_settings
from user_credits.errors import IdempotencyKeyReused, PaymentProviderError
from user_credits.payments.secrets import api_key

# Safe to retry: every create carries an idempotency key, so Stripe replays instead of charging twice.
NETWORK_RETRIES = 2
# The SDK's default read timeout is 80 s: a hung Stripe would outlive the function, and API Gateway would
# answer a bare 500. 3 attempts x (2 + 6) s plus the SDK's backoff stay under CreateOrderFunction's 29 s
# Timeout (template.yaml; API Gateway's own limit is 30 s), so the caller gets our 502 instead.
CONNECT_TIMEOUT_SECONDS = 2.0
READ_TIMEOUT_SECONDS = 6.0

_clients: dict[tuple[str, str | None], stripe.StripeClient] = {}


@dataclass(frozen=True)
class CreatedIntent:
    payment_intent_id: str
    client_secret: str


def stripe_client() -> stripe.StripeClient:
    """One client per (key, base) per cold start: it keeps its HTTP connection pool warm."""
    settings = load_settings()
    key = api_key(settings)
    cache_key = (key, settings.stripe_api_base)
    if cache_key not in _clients:
        base = settings.stripe_api_base
        _clients[cache_key] = stripe.StripeClient(
            key, base_addresses={"api": base.rstrip("/")} if base else None, max_network_retries=NETWORK_RETRIES,
            http_client=stripe.RequestsClient(timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)),
        )
    return _clients[cache_key]


def create_payment_intent(*, order_id: str, user_id: str, amount: int, currency: str) -> CreatedIntent:
    """Create the order's PaymentIntent; the order id is the idempotency key (SPEC 2.3).

    A create retried after a crash (same order id) gets the same PaymentIntent back from Stripe, so a
    customer is never asked to pay twice for one order.
    """
    try:
        intent = stripe_client().v1.payment_intents.create(
            params={
                "amount": amount,
                "currency": currency,
                "metadata": {"orderId": order_id, "userId": user_id},
                "automatic_payment_methods": {"enabled": True},
            },
            options={"idempotency_key": order_id},
        )
    except stripe.IdempotencyError as exc:
        # The order id is derived from (user, Idempotency-Key): Stripe saw this key with another body
        # after a first attempt died before storing its answer.
        raise IdempotencyKeyReused("this Idempotency-Key was used with a different request body") from exc
    except stripe.StripeError as exc:
        raise PaymentProviderError(f"Stripe refused or failed the payment: {exc.user_message or exc}") from exc
    if not intent.client_secret:
        raise PaymentProviderError("Stripe returned a PaymentIntent without a client secret")
    return CreatedIntent(intent.id, intent.client_secret)
