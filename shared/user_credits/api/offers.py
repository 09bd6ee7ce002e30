"""Routes of the catalog: GET /offers (user), PUT and GET /admin/offers (service)."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Query

from user_credits.api import contract as c
from user_credits.api.context import current_user
from user_credits.api.params import IdPath
from user_credits.api.responses import json_response
from user_credits.api.schemas import OfferIn
from user_credits.domain.offers import Offer
from user_credits.errors import ValidationFailed
from user_credits.logic import catalog

router = Router()
admin_router = Router()


@router.get("/offers", responses=c.answers(200, c.VisibleOffers, "The offers this user sees", 401, 422))
def list_offers(
    tags: Annotated[str | None, Query(max_length=2048, pattern=r"^[A-Za-z0-9_\-.:@,]*$")] = None,
) -> dict[str, Any]:
    user_id = current_user(router)
    wanted = [t for t in (tags or "").split(",") if t]
    return {"offers": [o.to_json() for o in catalog.offers_for_user(user_id, wanted)]}


@admin_router.get("/admin/offers", responses=c.answers(200, c.AllOffers, "Every offer, active or not", 403))
def list_all_offers() -> dict[str, Any]:
    return {"offers": [o.to_json() for o in catalog.all_offers()]}


@admin_router.put("/admin/offers/<offerId>", responses=c.answers(
    (200, 201), c.OneOffer, "200: updated, 201: created", 403, *c.WITH_BODY))
def put_offer(offerId: IdPath, offer: OfferIn) -> Response[str]:
    if offer.offerId is not None and offer.offerId != offerId:
        raise ValidationFailed("offerId in the body differs from the path")
    domain_offer = Offer.from_json({**offer.model_dump(), "offerId": offerId})
    created = catalog.put_offer(domain_offer)
    return json_response(201 if created else 200, {"offer": domain_offer.to_json()})
