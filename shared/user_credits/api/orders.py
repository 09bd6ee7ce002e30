"""Routes of purchases: POST /orders and GET /orders/{orderId} (user)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api import contract as c
from user_credits.api.context import current_user
from user_credits.api.params import IdempotencyKeyHeader, IdPath
from user_credits.api.responses import json_response
from user_credits.api.schemas import OrderIn
from user_credits.logic import purchases

router = Router()


@router.post("/orders", responses=c.answers(
    201, c.OneOrder, "The order (with `clientSecret` to pay it)", 401, 404, 409, 502, *c.WITH_BODY))
def create_order(order: OrderIn, key: IdempotencyKeyHeader = None) -> Response[str]:
    user_id = current_user(router)
    request = purchases.OrderRequest(order.offerId, order.quantity, order.currency)
    status, body = purchases.create_order(user_id, request, order.model_dump(exclude_unset=True), key)
    return json_response(status, body)


@router.get("/orders/<orderId>", responses=c.answers(200, c.OneOrder, "The order", 401, 404, 422))
def get_order(orderId: IdPath) -> dict[str, Any]:
    return {"order": purchases.get_order(current_user(router), orderId).to_json()}
