"""Offers and SPEC 2.2: which offers a user sees, and which one survives per overriding key."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CombinedItem:
    offer_id: str
    offer_group: str
    quantity: int

    def to_json(self) -> dict[str, Any]:
        return {"offerId": self.offer_id, "offerGroup": self.offer_group, "quantity": self.quantity}


@dataclass(frozen=True)
class Offer:
    offer_id: str
    offer_group: str
    tokens: int
    cycle: str
    prices: Mapping[str, int]
    name: str = ""
    kind: str = "tokens"
    custom_cycle_seconds: int | None = None
    append_date: bool = False
    quantity_limit: int | None = None
    tags: tuple[str, ...] = ()
    unlocked_by: tuple[str, ...] = ()
    overriding_key: str | None = None
    weight: int = 0
    popular: bool = False
    combined_items: tuple[CombinedItem, ...] = ()
    active: bool = True
    # SPEC 1: lots of this offer are spent before lots of a higher number.
    priority: int = 50
    # SPEC 2.11: how many of its orders one user may have that are pending, paid or partially refunded.
    per_user_limit: int | None = None
    # SPEC 1: `one_time`, or `recurring` (a Stripe subscription renewed every cycle).
    billing: str = "one_time"

    @property
    def is_public(self) -> bool:
        return not self.unlocked_by

    def to_json(self) -> dict[str, Any]:
        """The offer as the API shows it; PUT-ing this back unchanged is accepted."""
        return {
            "offerId": self.offer_id,
            "name": self.name or self.offer_id,
            "kind": self.kind,
            "offerGroup": self.offer_group,
            "tokens": self.tokens,
            "cycle": self.cycle,
            "customCycleSeconds": self.custom_cycle_seconds,
            "appendDate": self.append_date,
            "prices": dict(self.prices),
            "quantityLimit": self.quantity_limit,
            "tags": list(self.tags),
            "unlockedBy": list(self.unlocked_by),
            "overridingKey": self.overriding_key,
            "weight": self.weight,
            "popular": self.popular,
            "combinedItems": [item.to_json() for item in self.combined_items],
            "active": self.active,
            "priority": self.priority,
            "perUserLimit": self.per_user_limit,
            "billing": self.billing,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Offer:
        return cls(
            offer_id=data["offerId"],
            name=data.get("name") or data["offerId"],
            kind=data.get("kind", "tokens"),
            offer_group=data["offerGroup"],
            tokens=int(data["tokens"]),
            cycle=data["cycle"],
            custom_cycle_seconds=data.get("customCycleSeconds"),
            append_date=bool(data.get("appendDate", False)),
            prices={k: int(v) for k, v in data["prices"].items()},
            quantity_limit=data.get("quantityLimit"),
            tags=tuple(data.get("tags") or ()),
            unlocked_by=tuple(data.get("unlockedBy") or ()),
            overriding_key=data.get("overridingKey"),
            weight=int(data.get("weight", 0)),
            popular=bool(data.get("popular", False)),
            combined_items=tuple(
                CombinedItem(i["offerId"], i["offerGroup"], int(i["quantity"]))
                for i in data.get("combinedItems") or ()
            ),
            active=bool(data.get("active", True)),
            priority=int(data.get("priority", 50)),
            per_user_limit=data.get("perUserLimit"),
            billing=data.get("billing", "one_time"),
        )


@dataclass(frozen=True)
class VisibleOffer:
    offer: Offer
    subscribed: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.offer.to_json(), "subscribed": self.subscribed}


@dataclass(frozen=True)
class Holdings:
    """What a user holds that matters for visibility: groups and offers with paid, unexpired orders."""

    unlocked_groups: frozenset[str] = field(default_factory=frozenset)
    subscribed_offers: frozenset[str] = field(default_factory=frozenset)


def is_visible(offer: Offer, holdings: Holdings) -> bool:
    if not offer.active:
        return False
    return offer.is_public or any(group in holdings.unlocked_groups for group in offer.unlocked_by)


def _rank(offer: Offer) -> tuple[int, int, str]:
    # Sorting ascending: unlocked before public, then higher weight, then the smallest offerId.
    return (0 if not offer.is_public else 1, -offer.weight, offer.offer_id)


def resolve_overrides(offers: Iterable[Offer]) -> list[Offer]:
    """One offer survives per overridingKey; offers without a key never replace each other."""
    winners: dict[str, Offer] = {}
    survivors: list[Offer] = []
    for offer in offers:
        if offer.overriding_key is None:
            survivors.append(offer)
            continue
        current = winners.get(offer.overriding_key)
        if current is None or _rank(offer) < _rank(current):
            winners[offer.overriding_key] = offer
    survivors.extend(winners.values())
    return survivors


def visible_offers(
    catalog: Iterable[Offer], holdings: Holdings, tags: Collection[str] = ()
) -> list[VisibleOffer]:
    """SPEC 2.2, in its order: visibility, then overriding, then the tag filter.

    The result is sorted by weight (highest first), then offerId, so that the list is stable.
    """
    survivors = resolve_overrides(o for o in catalog if is_visible(o, holdings))
    wanted = set(tags)
    kept = [o for o in survivors if wanted.issubset(o.tags)]
    kept.sort(key=lambda o: (-o.weight, o.offer_id))
    return [VisibleOffer(o, o.offer_id in holdings.subscribed_offers) for o in kept]


def find_offer(catalog: Sequence[Offer], offer_id: str) -> Offer | None:
    return next((o for o in catalog if o.offer_id == offer_id), None)
