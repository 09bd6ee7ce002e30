"""POST /webhooks/stripe: verify the delivery, then hand the event to what it concerns.

Stripe delivers at least once and in no particular order; every handler is exactly-once on its own
(see `logic.purchases` and `logic.subscriptions`). Only transient faults escape (so Stripe retries);
duplicates, unknown orders and event types we do not use are acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from user_credits.errors import InvalidSignature
from user_credits.logic import purchases, subscriptions
from user_credits.logic.purchases import WebhookOutcome
from user_credits.observability import count, logger
from user_credits.payments import secrets
from user_credits.payments.webhooks import StripeEvent, verify_event


def receive_stripe_webhook(payload: str, signature: str | None) -> WebhookOutcome:
    try:
        event = verify_event(payload, signature, secrets.webhook_secret)
    except InvalidSignature:
        # A 400 is never logged as a failure: this count is what shows a rotated secret or forgeries.
        count("StripeEvent_invalid_signature")
        raise
    handler = HANDLERS.get(event.type)
    outcome = WebhookOutcome("ignored") if handler is None else handler(event)
    count(f"StripeEvent_{outcome.action}")
    logger.info("stripe event", extra={"type": event.type, "event_id": event.event_id, "action": outcome.action,
                                      "order_id": outcome.order_id})
    return outcome


def _outcome(handle: Callable[[StripeEvent], tuple[str, str | None]]) -> Callable[[StripeEvent], WebhookOutcome]:
    def on_event(event: StripeEvent) -> WebhookOutcome:
        action, order_id = handle(event)
        return WebhookOutcome(action, order_id)

    return on_event


def _on_checkout_completed(event: StripeEvent) -> WebhookOutcome:
    """A one-time Checkout paid: credited exactly as `payment_intent.succeeded` credits (and whichever of
    the two comes first does it; the other finds the order paid)."""
    action, record, problem = subscriptions.on_checkout_completed(event)
    if record is None:
        return WebhookOutcome(action)
    received = subscriptions.session_received(event)
    return purchases.apply_to_order(
        event, "payment_intent", purchases.PAYABLE,
        lambda fresh: purchases.credit_paid_order(fresh, event, problem, received))


HANDLERS: Final[dict[str, Callable[[StripeEvent], WebhookOutcome]]] = {
    **purchases.HANDLERS,
    "checkout.session.completed": _on_checkout_completed,
    "checkout.session.expired": _outcome(subscriptions.on_checkout_expired),
    "invoice.paid": _outcome(subscriptions.on_invoice_paid),
    "invoice.payment_failed": _outcome(subscriptions.on_payment_failed),
    "customer.subscription.updated": _outcome(subscriptions.on_subscription_changed),
    "customer.subscription.deleted": _outcome(subscriptions.on_subscription_changed),
}
