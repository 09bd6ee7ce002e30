"""The offer catalog in DynamoDB: one item per offer, read whole."""

from __future__ import annotations

from user_credits.domain.clock import utc_now
from user_credits.domain.offers import Offer
from user_credits.store.models import OfferRecord


def save_offer(offer: Offer) -> bool:
    """Create or replace an offer; True when it did not exist before."""
    record = OfferRecord(offer.offer_id, document=offer.to_json(), updatedAt=utc_now())
    # ALL_OLD tells created from updated in the same single write, with no read before it.
    response = record._get_connection().put_item(
        offer.offer_id, attributes=record.serialize(), return_values="ALL_OLD"
    )
    return not response.get("Attributes")


def load_offer(offer_id: str) -> Offer | None:
    try:
        record = OfferRecord.get(offer_id, consistent_read=True)
    except OfferRecord.DoesNotExist:
        return None
    return Offer.from_json(record.document)


def load_catalog() -> list[Offer]:
    """The whole catalog. A scan is right here: catalogs hold tens of offers, not millions."""
    return [Offer.from_json(record.document) for record in OfferRecord.scan()]
