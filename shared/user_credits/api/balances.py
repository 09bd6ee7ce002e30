"""Routes of balances: consume (service), credits and ledger (user and service)."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Path, Query

from user_credits.api.context import current_user, idempotency_key
from user_credits.api.responses import json_response
from user_credits.api.schemas import ID_PATTERN, ConsumeIn
from user_credits.errors import ValidationFailed
from user_credits.logic import consumption, credits

consume_router = Router()
router = Router()
service_router = Router()

UserIdPath = Annotated[str, Path(pattern=ID_PATTERN, min_length=1, max_length=128)]
GroupQuery = Annotated[str | None, Query(pattern=ID_PATTERN, min_length=1, max_length=128)]
# Checked by hand (credits.parse_limit) so that "2.0" or "1e3" get the same 422 as "0" or "5000".
LimitQuery = Annotated[str | None, Query(max_length=16)]
CursorQuery = Annotated[str | None, Query(min_length=1, max_length=2048)]


def require_json_object(router: Router) -> None:
    """Powertools validates a body `[{...}]` as its first element; SPEC 3 wants the object itself."""
    if not isinstance(router.current_event.json_body, dict):
        raise ValidationFailed("the body must be a JSON object")


@consume_router.post("/users/<userId>/consume")
def consume(userId: UserIdPath, request: ConsumeIn) -> Response[str]:
    require_json_object(consume_router)
    result = consumption.consume_tokens(
        userId, request.offerGroup, request.tokens, request.maxOverdraft, idempotency_key(consume_router),
        request.model_dump(),
    )
    return json_response(result.status, result.body)


@router.get("/credits")
def my_credits() -> dict[str, Any]:
    return credits.credits_of(current_user(router))


@router.get("/credits/ledger")
def my_ledger(
    offerGroup: GroupQuery = None, limit: LimitQuery = None, cursor: CursorQuery = None,
) -> dict[str, Any]:
    return credits.ledger_of(current_user(router), offerGroup, credits.parse_limit(limit), cursor)


@service_router.get("/users/<userId>/credits")
def user_credits(userId: UserIdPath) -> dict[str, Any]:
    return credits.credits_of(userId)


@service_router.get("/users/<userId>/ledger")
def user_ledger(
    userId: UserIdPath, offerGroup: GroupQuery = None, limit: LimitQuery = None, cursor: CursorQuery = None,
) -> dict[str, Any]:
    return credits.ledger_of(userId, offerGroup, credits.parse_limit(limit), cursor)
