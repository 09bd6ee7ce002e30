"""POST /admin/users/{userId}/grants: promotional or corrective credits (service)."""

from __future__ import annotations

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api import contract as c
from user_credits.api.params import IdempotencyKeyHeader, IdPath
from user_credits.api.responses import json_response
from user_credits.api.schemas import GrantIn
from user_credits.logic import grants

router = Router()

@router.post("/admin/users/<userId>/grants", responses=c.answers(
    201, c.Granted, "Granted (or corrected); the balance after", 402, 403, *c.WITH_BODY))
def grant(userId: IdPath, request: GrantIn, key: IdempotencyKeyHeader = None) -> Response[str]:
    result = grants.grant_credits(
        userId, request.offerGroup, request.tokens, request.expiresAt, request.reason, request.priority,
        key, request.model_dump(mode="json"),
    )
    return json_response(result.status, result.body)
