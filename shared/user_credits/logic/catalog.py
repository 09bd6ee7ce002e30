"""The offer catalog: admin writes, and SPEC 2.2's view of it for one user."""

from __future__ import annotations

from collections.abc import Collection

from user_credits.domain.clock import utc_now
from user_credits.domain.offers import Offer, VisibleOffer, visible_offers
from user_credits.domain.orders import holdings_from_orders
from user_credits.store import offers as offer_store
from user_credits.store import orders as order_store


def put_offer(offer: Offer) -> bool:
    """Create or replace; True when created."""
    return offer_store.save_offer(offer)


def all_offers() -> list[Offer]:
    return sorted(offer_store.load_catalog(), key=lambda o: o.offer_id)


def offers_for_user(user_id: str, tags: Collection[str] = ()) -> list[VisibleOffer]:
    holdings = holdings_from_orders(order_store.list_orders(user_id), utc_now())
    return visible_offers(offer_store.load_catalog(), holdings, tags)
