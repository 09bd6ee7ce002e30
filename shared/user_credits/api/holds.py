"""Routes of holds (SPEC 2.9): POST /users/{userId}/holds, .../holds/{holdId}/settle and .../release (service)."""

from __future__ import annotations

from typing import Final

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api import contract as c
from user_credits.api.params import HoldIdPath, IdempotencyKeyHeader, IdPath
from user_credits.api.responses import json_response
from user_credits.api.schemas import HoldIn, ReleaseIn, SettleIn
from user_credits.logic import holds

router = Router()

_OF_A_HOLD: Final = {
    404: "No such hold of this user (another user's hold looks the same), or it closed over 24 hours ago",
    409: "The hold is closed: settled or released by another call (the same call again answers 200)",
}


@router.post("/users/<userId>/holds", responses=c.answers(
    201, c.Held, "Held; the balance after", 402, 403, 409, *c.WITH_BODY,
    meaning={409: "The group has as many open holds as it may (too_many_holds): settle or release one first"}))
def hold(userId: IdPath, request: HoldIn, key: IdempotencyKeyHeader = None) -> Response[str]:
    result = holds.place_hold(
        userId, request.offerGroup, request.tokens, request.maxOverdraft, request.ttlSeconds, key,
        request.model_dump(),
    )
    return json_response(result.status, result.body)


@router.post("/users/<userId>/holds/<holdId>/settle", responses=c.answers(
    200, c.Closed, "Settled (or this same settle again); the balance after", 402, 403, 404, 409, *c.WITH_BODY,
    meaning=_OF_A_HOLD))
def settle(userId: IdPath, holdId: HoldIdPath, request: SettleIn) -> Response[str]:
    return json_response(200, holds.settle_hold(userId, holdId, request.tokens, request.maxOverdraft))


# A release says nothing but the hold: no body and `{}` are the same request (a field is still refused).
_NO_BODY: Final = ReleaseIn()


@router.post("/users/<userId>/holds/<holdId>/release", responses=c.answers(
    200, c.Closed, "Released (or released already); the balance after", 403, 404, 409, *c.WITH_BODY,
    meaning=_OF_A_HOLD))
def release(userId: IdPath, holdId: HoldIdPath, request: ReleaseIn = _NO_BODY) -> Response[str]:
    return json_response(200, holds.release_hold(userId, holdId))
