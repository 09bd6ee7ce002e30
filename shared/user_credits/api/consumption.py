"""Route of consumption: POST /users/{userId}/consume (service)."""

from __future__ import annotations

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api.context import idempotency_key
from user_credits.api.params import IdPath
from user_credits.api.responses import json_response
from user_credits.api.schemas import ConsumeIn
from user_credits.logic import consumption

router = Router()


@router.post("/users/<userId>/consume")
def consume(userId: IdPath, request: ConsumeIn) -> Response[str]:
    result = consumption.consume_tokens(
        userId, request.offerGroup, request.tokens, request.maxOverdraft, idempotency_key(router),
        request.model_dump(),
    )
    return json_response(result.status, result.body)
