"""PaymentIntents through the official SDK's `StripeClient` (pointed at STRIPE_API_BASE when set)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import stripe

from user_credits.config import load_settings
from user_credits.errors import IdempotencyKeyReused, PaymentProviderError
from user_credits.payments.secrets import api_key

if TYPE_CHECKING:
    # Typing only (importing stripe's params package costs start-up time): mypy checks our names against them.
    from stripe.params.checkout import SessionCreateParams, SessionCreateParamsLineItemPriceData

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


def _failed(exc: stripe.StripeError, what: str) -> PaymentProviderError | IdempotencyKeyReused:
    if isinstance(exc, stripe.IdempotencyError):
        return IdempotencyKeyReused("this Idempotency-Key was used with a different request body")
    return PaymentProviderError(f"Stripe refused or failed {what}: {exc.user_message or exc}")


def create_customer(*, user_id: str) -> str:
    """The user's one Stripe Customer (SPEC 2.10). The idempotency key is derived from the user, so two
    first checkouts at once, or a retry after a crash before the id was stored, get the same Customer
    (Stripe keeps a key 24 hours; the id is stored long before)."""
    try:
        customer = stripe_client().v1.customers.create(
            params={"metadata": {"userId": user_id}}, options={"idempotency_key": f"customer-{user_id}"},
        )
    except stripe.StripeError as exc:
        raise _failed(exc, "the customer") from exc
    return str(customer.id)


@dataclass(frozen=True)
class CheckoutLine:
    """What a Checkout Session sells: one line, its price given inline (SPEC 2.10)."""

    name: str
    currency: str
    unit_amount: int
    quantity: int
    # For a subscription: Stripe's `recurring.interval` and `interval_count`.
    interval: str | None = None
    interval_count: int | None = None


@dataclass(frozen=True)
class CreatedSession:
    session_id: str
    url: str


def create_checkout_session(
    *, order_id: str, user_id: str, offer_id: str, customer_id: str, line: CheckoutLine, success_url: str,
    cancel_url: str,
) -> CreatedSession:
    """A Checkout Session for the order (its id is the idempotency key): mode `subscription` for a
    recurring offer, `payment` otherwise. Our ids travel in `metadata`, and for a subscription in
    `subscription_data.metadata`, which Stripe copies onto every invoice of it."""
    metadata = {"orderId": order_id, "userId": user_id, "offerId": offer_id}
    # stripe-python's typed params: mypy checks every name we send against Stripe's own definitions.
    price_data: SessionCreateParamsLineItemPriceData = {
        "currency": line.currency, "unit_amount": line.unit_amount, "product_data": {"name": line.name}}
    params: SessionCreateParams = {
        "customer": customer_id, "success_url": success_url, "cancel_url": cancel_url,
        "client_reference_id": order_id, "metadata": metadata,
    }
    if line.interval is not None:
        price_data["recurring"] = {"interval": line.interval, "interval_count": line.interval_count or 1}
        params["mode"] = "subscription"
        params["subscription_data"] = {"metadata": metadata}
    else:
        params["mode"] = "payment"
        params["payment_intent_data"] = {"metadata": {"orderId": order_id, "userId": user_id}}
    params["line_items"] = [{"price_data": price_data, "quantity": line.quantity}]
    try:
        session = stripe_client().v1.checkout.sessions.create(params=params, options={"idempotency_key": order_id})
    except stripe.StripeError as exc:
        raise _failed(exc, "the checkout") from exc
    if not session.url:
        raise PaymentProviderError("Stripe returned a Checkout Session without a url")
    return CreatedSession(str(session.id), str(session.url))


def create_portal_session(*, customer_id: str, return_url: str) -> str:
    """A session of Stripe's customer portal for the user's Customer; its url."""
    try:
        session = stripe_client().v1.billing_portal.sessions.create(
            params={"customer": customer_id, "return_url": return_url})
    except stripe.StripeError as exc:
        raise _failed(exc, "the billing portal") from exc
    return str(session.url)
