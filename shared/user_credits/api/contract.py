"""What each route answers (SPEC 3), as the OpenAPI document shows it: the success body of each route
and the one error body of every error status it can give.

These models only describe: the handlers build their bodies from the domain. `additionalProperties`
is false everywhere, so a field the document does not name is a mismatch; the test suite validates
every answer it gets against `openapi.json` (tests/conftest.py), which keeps the two honest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

DateTime = str  # ISO 8601 UTC, e.g. 2026-11-26T00:34:16Z (SPEC 3)


class Described(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(Described):
    """Every error: a stable code and a message for people; a 402 also tells the balance."""

    error: str
    message: str
    balance: int | None = None


class CombinedItemOut(Described):
    offerId: str
    offerGroup: str
    quantity: int


class OfferOut(Described):
    offerId: str
    name: str
    kind: Literal["subscription", "tokens", "expertise"]
    offerGroup: str
    tokens: int
    cycle: str
    customCycleSeconds: int | None
    appendDate: bool
    prices: dict[str, int]
    quantityLimit: int | None
    tags: list[str]
    unlockedBy: list[str]
    overridingKey: str | None
    weight: int
    popular: bool
    combinedItems: list[CombinedItemOut]
    active: bool
    priority: int
    perUserLimit: int | None
    billing: Literal["one_time", "recurring"]


class VisibleOfferOut(OfferOut):
    subscribed: bool


class VisibleOffers(Described):
    offers: list[VisibleOfferOut]


class AllOffers(Described):
    offers: list[OfferOut]


class OneOffer(Described):
    offer: OfferOut


class OrderOut(Described):
    orderId: str
    userId: str
    offerId: str
    offerGroup: str
    quantity: int
    amount: int
    currency: str
    status: Literal["pending", "paid", "failed", "canceled", "inconsistent", "refunded", "partially_refunded"]
    tokens: int
    createdAt: DateTime
    startsAt: DateTime | None
    expiresAt: DateTime | None
    paymentIntentId: str | None
    # Only in the answer to POST /orders.
    clientSecret: str | None = None


class OneOrder(Described):
    order: OrderOut


class Consumed(Described):
    userId: str
    offerGroup: str
    consumed: int
    balance: int
    expiresAt: DateTime | None


class Held(Described):
    """A hold placed: its tokens are taken from the group now, until it is settled or released."""

    holdId: str = Field(description="Opaque: pass it back as it came to settle or release the hold.")
    userId: str
    offerGroup: str
    tokens: int = Field(description="The tokens held.")
    balance: int = Field(description="The group's balance after the hold.")
    expiresAt: DateTime = Field(description="When the hold is released if it has not been settled (not the "
                                            "group's expiry).")


class Closed(Described):
    """A hold settled or released: what it finally cost, and what went back to the group."""

    holdId: str
    settled: int = Field(description="The tokens the work cost (0 for a release).")
    released: int = Field(description="The held tokens given back to the group.")
    balance: int = Field(description="The group's balance after the settle or release.")
    status: Literal["settled", "released"]


class LotOut(Described):
    lotId: str
    offerGroup: str
    source: Literal["order", "subscription", "grant"]
    granted: int
    remaining: int
    startsAt: DateTime
    expiresAt: DateTime | None
    priority: int
    orderId: str | None = None
    subscriptionId: str | None = None


class GroupOut(Described):
    offerGroup: str
    balance: int
    expiresAt: DateTime | None
    lots: list[LotOut]


class Credits(Described):
    userId: str
    groups: list[GroupOut]
    orders: list[OrderOut]


class EntryOut(Described):
    offerGroup: str
    delta: int
    balanceAfter: int
    reason: Literal["purchase", "renewal", "consume", "hold", "release", "expire", "refund", "grant"]
    seq: int
    lotId: str | None = None
    orderId: str | None = None
    subscriptionId: str | None = None
    holdId: str | None = None
    idempotencyKey: str | None = None
    shortfall: int | None = None
    note: str | None = None
    at: DateTime


class LedgerPage(Described):
    items: list[EntryOut]
    nextCursor: str | None


class Granted(Described):
    userId: str
    offerGroup: str
    balance: int
    expiresAt: DateTime | None
    # null for a negative grant: a correction is no lot.
    lotId: str | None


class CheckoutOut(Described):
    """A Stripe Checkout Session for a new pending order: send the customer to `url`."""

    orderId: str
    sessionId: str
    url: str


class PortalOut(Described):
    """A session of Stripe's customer portal: send the customer to `url`."""

    url: str


class SubscriptionOut(Described):
    subscriptionId: str
    offerId: str
    offerGroup: str
    status: str = Field(description="Stripe's: active, past_due, canceled, ...")
    currentPeriodEnd: DateTime | None
    cancelAtPeriodEnd: bool
    quantity: int


class Subscriptions(Described):
    subscriptions: list[SubscriptionOut]


class Received(Described):
    received: bool


ERROR_STATUSES: Final = {
    400: "Malformed JSON, or a bad, missing or stale Stripe-Signature",
    401: "No signed-in user (user routes)",
    402: "Not enough credits, or the credits have expired (the body tells the balance)",
    403: "Not a signed service call (service routes)",
    404: "No such offer or order (or it is another user's)",
    409: "The offer is locked or inactive",
    413: "The body is over 256 KiB",
    415: "The body is not JSON",
    422: "A field is missing, of the wrong type or out of range; or the Idempotency-Key was used with "
         "another body",
    500: "An unexpected failure; the detail is in the logs",
    502: "Stripe refused or failed the call",
    503: "DynamoDB or Stripe is busy or unreachable: retry after Retry-After",
}
# Every route can meet a bug or a busy dependency.
ALWAYS: Final = (500, 503)
# Routes with a body.
WITH_BODY: Final = (400, 413, 415, 422)


def answers(
    success: int | tuple[int, ...], model: type[BaseModel], description: str, *errors: int,
    meaning: Mapping[int, str] | None = None,
) -> dict[int, Any]:
    """The `responses` of a route: its success status(es), and each error status it can give with the
    error body. `meaning` says what an error status means on this route where ERROR_STATUSES's
    general text would mislead (a 404 of the hold routes is about holds, not offers)."""
    statuses = success if isinstance(success, tuple) else (success,)
    if not set(meaning or {}) <= {*errors, *ALWAYS}:
        raise ValueError(f"meaning of a status the route does not give: {sorted(meaning or {})}")
    documented: dict[int, Any] = {
        status: {"description": description, "content": {"application/json": {"model": model}}}
        for status in statuses
    }
    for code in sorted({*errors, *ALWAYS}):
        documented[code] = {"description": (meaning or {}).get(code, ERROR_STATUSES[code]),
                            "content": {"application/json": {"model": ErrorBody}}}
    return documented
