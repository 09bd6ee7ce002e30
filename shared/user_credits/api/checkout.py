"""Routes of Stripe's hosted pages: POST /checkout and POST /billing-portal (user)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api import contract as c
from user_credits.api.context import current_user
from user_credits.api.params import IdempotencyKeyHeader
from user_credits.api.responses import json_response
from user_credits.api.schemas import CheckoutIn, PortalIn
from user_credits.logic import subscriptions

router = Router()


@router.post("/checkout", responses=c.answers(
    201, c.CheckoutOut, "A pending order and the Checkout Session that pays it", 401, 404, 409, 502, *c.WITH_BODY))
def checkout(request: CheckoutIn, key: IdempotencyKeyHeader = None) -> Response[str]:
    asked = subscriptions.CheckoutRequest(request.offerId, request.successUrl, request.cancelUrl, request.quantity,
                                          request.currency)
    status, body = subscriptions.checkout(current_user(router), asked, request.model_dump(exclude_unset=True), key)
    return json_response(status, body)


@router.post("/billing-portal", responses=c.answers(
    201, c.PortalOut, "A customer portal session", 401, 404, 502, *c.WITH_BODY,
    meaning={404: "The user has no Stripe customer yet (no checkout so far)"}))
def billing_portal(request: PortalIn) -> Response[str]:
    body: dict[str, Any] = subscriptions.billing_portal(current_user(router), request.returnUrl)
    return json_response(201, body)
