"""Route of consumption: POST /users/{userId}/consume (service)."""

from __future__ import annotations

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api import contract as c
from user_credits.api.params import IdempotencyKeyHeader, IdPath
from user_credits.api.responses import json_response
from user_credits.api.schemas import ConsumeIn
from user_credits.logic import consumption

router = Router()


@router.post("/users/<userId>/consume", responses=c.answers(
    200, c.Consumed, "Consumed; the balance after", 402, 403, *c.WITH_BODY))
def consume(userId: IdPath, request: ConsumeIn, key: IdempotencyKeyHeader = None) -> Response[str]:
    result = consumption.consume_tokens(
        userId, request.offerGroup, request.tokens, request.maxOverdraft, key,
        request.model_dump(),
    )
    return json_response(result.status, result.body)
