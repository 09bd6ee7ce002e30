"""Request models, strict by SPEC 3: exact JSON types, bounded integers, no unknown fields."""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from user_credits.domain.lots import DEFAULT_HOLD_TTL_SECONDS, MAX_HOLD_TTL_SECONDS

ID_PATTERN: Final = r"^[A-Za-z0-9_\-.:@]{1,128}$"
ID_RE: Final = re.compile(ID_PATTERN)
# A hold id is opaque to callers: the id alphabet, with room for what the service builds it from.
HOLD_ID_PATTERN: Final = r"^[A-Za-z0-9_\-.:@]{1,200}$"
MAX_INT: Final = 10**15

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN, min_length=1, max_length=128)]
Tag = Annotated[str, StringConstraints(pattern=ID_PATTERN, min_length=1, max_length=128)]
Currency = Annotated[str, StringConstraints(pattern=r"^[a-z]{3}$")]
NonNegative = Annotated[int, Field(ge=0, le=MAX_INT)]
Positive = Annotated[int, Field(ge=1, le=MAX_INT)]
AnyInt = Annotated[int, Field(ge=-MAX_INT, le=MAX_INT)]
Cycle = Literal["once", "daily", "weekly", "bi-weekly", "monthly", "trimester", "semester", "yearly", "custom"]


class StrictModel(BaseModel):
    # strict: "2", 2.0 and true are not integers, 1 is not a boolean; forbid: typos are errors.
    model_config = ConfigDict(strict=True, extra="forbid")


class CombinedItemIn(StrictModel):
    offerId: Id
    offerGroup: Id
    quantity: Positive


class OfferIn(StrictModel):
    offerId: Id | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    kind: Literal["subscription", "tokens", "expertise"] = "tokens"
    offerGroup: Id
    tokens: NonNegative
    cycle: Cycle
    customCycleSeconds: Positive | None = None
    appendDate: bool = False
    prices: Annotated[dict[Currency, NonNegative], Field(min_length=1, max_length=200)]
    quantityLimit: Positive | None = None
    tags: Annotated[list[Tag], Field(max_length=100)] = []
    unlockedBy: Annotated[list[Id], Field(max_length=100)] = []
    overridingKey: Id | None = None
    weight: AnyInt = 0
    popular: bool = False
    # A purchase commits in one transaction (at most 100 items, ~3 per group credited): 20 items fit.
    combinedItems: Annotated[list[CombinedItemIn], Field(max_length=20)] = []
    active: bool = True
    priority: Annotated[int, Field(ge=0, le=100)] = 50
    perUserLimit: Positive | None = None
    billing: Literal["one_time", "recurring"] = "one_time"

    @model_validator(mode="after")
    def _recurring_needs_a_calendar_cycle(self) -> OfferIn:
        # SPEC 1: a Stripe subscription renews every cycle, which `once` and `custom` are not.
        if self.billing == "recurring" and self.cycle in ("once", "custom"):
            raise ValueError(f"billing recurring needs a cycle other than once and custom, not {self.cycle}")
        return self

    @model_validator(mode="after")
    def _custom_cycle_needs_seconds(self) -> OfferIn:
        if self.cycle == "custom" and self.customCycleSeconds is None:
            raise ValueError("customCycleSeconds is required when cycle is custom")
        if self.cycle != "custom" and self.customCycleSeconds is not None:
            raise ValueError("customCycleSeconds is only allowed when cycle is custom")
        return self


class OrderIn(StrictModel):
    offerId: Id
    quantity: Positive = 1
    currency: Currency | None = None


# A page to send the customer back to, as Stripe takes it: an absolute http(s) URL.
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", min_length=8, max_length=2048)]


class CheckoutIn(StrictModel):
    offerId: Id
    quantity: Positive = 1
    currency: Currency | None = None
    successUrl: Url
    cancelUrl: Url


class PortalIn(StrictModel):
    returnUrl: Url


class ConsumeIn(StrictModel):
    offerGroup: Id
    tokens: Positive
    maxOverdraft: NonNegative = 0


class HoldIn(StrictModel):
    offerGroup: Id
    tokens: Positive
    maxOverdraft: NonNegative = 0
    # SPEC 2.9: 15 minutes by default, at most 24 hours.
    ttlSeconds: Annotated[int, Field(ge=1, le=MAX_HOLD_TTL_SECONDS)] = DEFAULT_HOLD_TTL_SECONDS


class SettleIn(StrictModel):
    # 0 is a cost too: work that cost nothing settles, and everything held goes back.
    tokens: NonNegative
    maxOverdraft: NonNegative = 0


class ReleaseIn(StrictModel):
    """A release names nothing: the body may be absent or `{}`, and any field in it is a typo (422)."""


class GrantIn(StrictModel):
    offerGroup: Id
    # Corrective grants may be negative; zero changes nothing and is refused.
    tokens: Annotated[int, Field(ge=-MAX_INT, le=MAX_INT)]
    # ISO 8601 strings are the JSON form of a time, so this one field is parsed leniently.
    expiresAt: Annotated[AwareDatetime, Field(strict=False)] | None = None
    reason: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    # The grant's lot is spent before lots of a higher number (SPEC 2.5); default 50, as for offers.
    priority: Annotated[int, Field(ge=0, le=100)] | None = None

    @field_validator("expiresAt", mode="before")
    @classmethod
    def _iso_string(cls, value: object) -> object:
        # Lenient parsing would also take a number as epoch seconds; SPEC 3 says times are ISO strings.
        if value is not None and not isinstance(value, str):
            raise ValueError("expiresAt must be an ISO 8601 string with a time zone")
        return value

    @model_validator(mode="after")
    def _non_zero(self) -> GrantIn:
        if self.tokens == 0:
            raise ValueError("tokens must not be 0")
        return self
