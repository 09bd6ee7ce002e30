"""Stripe webhook verification and the few fields we read from the events we act on."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import stripe

from user_credits.errors import InvalidSignature

# SPEC 3: a signature older than 5 minutes is refused (replay protection).
TOLERANCE_SECONDS: Final = 300


@dataclass(frozen=True)
class StripeEvent:
    event_id: str
    type: str
    object: Mapping[str, Any]
    # When Stripe created the event (seconds): orders the events of one subscription.
    created: int = 0

    def metadata(self) -> Mapping[str, Any]:
        value = self.object.get("metadata")
        return value if isinstance(value, Mapping) else {}

    def order_ref(self) -> tuple[str, str] | None:
        """(userId, orderId) from the object's metadata, when both are there."""
        meta = self.metadata()
        user_id, order_id = meta.get("userId"), meta.get("orderId")
        if isinstance(user_id, str) and user_id and isinstance(order_id, str) and order_id:
            return user_id, order_id
        return None

    def integer(self, field: str) -> int | None:
        value = self.object.get(field)
        return value if type(value) is int else None

    def text(self, field: str) -> str | None:
        value = self.object.get(field)
        return value if isinstance(value, str) else None


def _signed_at(header: str) -> int | None:
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def verify_event(payload: str, header: str | None, secret: Callable[[], str]) -> StripeEvent:
    """Check the `Stripe-Signature` header with the SDK and return the event; else `InvalidSignature`.

    A missing or stale header is refused before `secret()` is called, so junk traffic costs no
    Secrets Manager read on a cold start; the SDK then does the full check (HMAC and age).
    """
    if not header:
        raise InvalidSignature("the Stripe-Signature header is missing")
    signed_at = _signed_at(header)
    if signed_at is None or signed_at < time.time() - TOLERANCE_SECONDS:
        raise InvalidSignature("the Stripe-Signature timestamp is missing or older than 5 minutes")
    try:
        event = stripe.Webhook.construct_event(payload, header, secret(), tolerance=TOLERANCE_SECONDS)
    except stripe.SignatureVerificationError as exc:
        raise InvalidSignature("the Stripe-Signature does not match this payload") from exc
    except ValueError as exc:
        # Signed correctly but not JSON: only someone holding our secret could send it; refuse it anyway.
        raise InvalidSignature("the signed payload is not a JSON event") from exc
    data: dict[str, Any] = event.to_dict()
    body = data.get("data")
    obj = body.get("object") if isinstance(body, dict) else None
    if not isinstance(data.get("id"), str) or not isinstance(data.get("type"), str) or not isinstance(obj, dict):
        raise InvalidSignature("the signed payload is not a Stripe event")
    created = data.get("created")
    return StripeEvent(data["id"], data["type"], obj, created if type(created) is int else 0)
