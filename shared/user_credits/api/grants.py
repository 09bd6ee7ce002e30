"""POST /admin/users/{userId}/grants: promotional or corrective credits (service)."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path

from user_credits.api.balances import require_json_object
from user_credits.api.context import idempotency_key
from user_credits.api.responses import json_response
from user_credits.api.schemas import ID_PATTERN, GrantIn
from user_credits.logic import grants

router = Router()

UserIdPath = Annotated[str, Path(pattern=ID_PATTERN, min_length=1, max_length=128)]


@router.post("/admin/users/<userId>/grants")
def grant(userId: UserIdPath, request: GrantIn) -> Response[str]:
    require_json_object(router)
    result = grants.grant_credits(
        userId, request.offerGroup, request.tokens, request.expiresAt, request.reason, idempotency_key(router),
        request.model_dump(mode="json"),
    )
    return json_response(result.status, result.body)
