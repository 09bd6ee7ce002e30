"""Routes of balances read back: credits and ledger, for the user (JWT) and for the service (IAM)."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Query

from user_credits.api.context import current_user
from user_credits.api.params import GroupQuery, IdPath
from user_credits.logic import credits

router = Router()
service_router = Router()

# Checked by hand (credits.parse_limit) so that "2.0" or "1e3" get the same 422 as "0" or "5000".
LimitQuery = Annotated[str | None, Query(max_length=16)]
CursorQuery = Annotated[str | None, Query(min_length=1, max_length=2048)]


@router.get("/credits")
def my_credits() -> dict[str, Any]:
    return credits.credits_of(current_user(router))


@router.get("/credits/ledger")
def my_ledger(
    offerGroup: GroupQuery = None, limit: LimitQuery = None, cursor: CursorQuery = None,
) -> dict[str, Any]:
    return credits.ledger_of(current_user(router), offerGroup, credits.parse_limit(limit), cursor)


@service_router.get("/users/<userId>/credits")
def user_credits(userId: IdPath) -> dict[str, Any]:
    return credits.credits_of(userId)


@service_router.get("/users/<userId>/ledger")
def user_ledger(
    userId: IdPath, offerGroup: GroupQuery = None, limit: LimitQuery = None, cursor: CursorQuery = None,
) -> dict[str, Any]:
    return credits.ledger_of(userId, offerGroup, credits.parse_limit(limit), cursor)
