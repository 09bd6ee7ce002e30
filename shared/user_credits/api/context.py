"""Request-scoped values the routers read: the caller and the Idempotency-Key header."""

from __future__ import annotations

import re

from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api.schemas import ID_PATTERN
from user_credits.errors import Unauthorized, ValidationFailed

_ID = re.compile(ID_PATTERN)


def current_user(router: Router) -> str:
    user_id = router.context.get("user_id")
    if not isinstance(user_id, str):
        raise Unauthorized("a signed-in user is required")
    return user_id


def idempotency_key(router: Router) -> str | None:
    """The optional Idempotency-Key header, held to the id rules of SPEC 3."""
    # API Gateway lower-cases header names, but hand-made events may not.
    headers = router.current_event.headers or {}
    value = next((v for k, v in headers.items() if k.lower() == "idempotency-key"), None)
    if value is None:
        return None
    if not _ID.fullmatch(value):
        raise ValidationFailed("Idempotency-Key must be 1..128 characters of A-Z a-z 0-9 _ - . : @")
    return value
