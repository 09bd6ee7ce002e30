"""Routes of balances read back: credits and ledger, for the user (JWT) and for the service (IAM)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Query
from pydantic import BeforeValidator, Field

from user_credits.api import contract as c
from user_credits.api.context import current_user
from user_credits.api.params import GroupQuery, IdPath
from user_credits.logic import credits

router = Router()
service_router = Router()

def _digits(value: object) -> object:
    # A query string is text, and pydantic would read "2.0", "+3" or " 5" as integers: only digits are.
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,7}", value):
        raise ValueError("limit must be an integer from 1 to 1000")
    return value


LimitQuery = Annotated[
    Annotated[int, Field(ge=1, le=credits.MAX_LIMIT)] | None, BeforeValidator(_digits),
    Query(description=f"Entries per page, 1..{credits.MAX_LIMIT} (default {credits.DEFAULT_LIMIT})"),
]
CursorQuery = Annotated[str | None, Query(min_length=1, max_length=2048)]


@router.get("/credits", responses=c.answers(200, c.Credits, "Balances, live lots and paid orders", 401))
def my_credits() -> dict[str, Any]:
    return credits.credits_of(current_user(router))


@router.get("/credits/ledger", responses=c.answers(200, c.LedgerPage, "Ledger entries, newest first", 401, 422))
def my_ledger(
    offerGroup: GroupQuery = None, limit: LimitQuery = None, cursor: CursorQuery = None,
) -> dict[str, Any]:
    return credits.ledger_of(current_user(router), offerGroup, limit or credits.DEFAULT_LIMIT, cursor)


@router.get("/subscriptions", responses=c.answers(200, c.Subscriptions, "The user's subscriptions", 401))
def my_subscriptions() -> dict[str, Any]:
    return credits.subscriptions_of(current_user(router))


@service_router.get("/users/<userId>/subscriptions", responses=c.answers(
    200, c.Subscriptions, "The user's subscriptions", 403, 422))
def user_subscriptions(userId: IdPath) -> dict[str, Any]:
    return credits.subscriptions_of(userId)


@service_router.get("/users/<userId>/credits", responses=c.answers(
    200, c.Credits, "Balances, live lots and paid orders", 403, 422))
def user_credits(userId: IdPath) -> dict[str, Any]:
    return credits.credits_of(userId)


@service_router.get("/users/<userId>/ledger", responses=c.answers(
    200, c.LedgerPage, "Ledger entries, newest first", 403, 422))
def user_ledger(
    userId: IdPath, offerGroup: GroupQuery = None, limit: LimitQuery = None, cursor: CursorQuery = None,
) -> dict[str, Any]:
    return credits.ledger_of(userId, offerGroup, limit or credits.DEFAULT_LIMIT, cursor)
