"""Request-scoped values the routers read: the caller and headers (the Idempotency-Key)."""

from __future__ import annotations

from collections.abc import Mapping

from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api.schemas import ID_RE
from user_credits.errors import Unauthorized, ValidationFailed


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header by its lower-case name: API Gateway lower-cases names, but hand-made events may not."""
    return next((v for k, v in (headers or {}).items() if k.lower() == name), None)


def current_user(router: Router) -> str:
    user_id = router.context.get("user_id")
    if not isinstance(user_id, str):
        raise Unauthorized("a signed-in user is required")
    return user_id


def idempotency_key(router: Router) -> str | None:
    """The optional Idempotency-Key header, held to the id rules of SPEC 3."""
    value = header(router.current_event.headers, "idempotency-key")
    if value is None:
        return None
    if not ID_RE.fullmatch(value):
        raise ValidationFailed("Idempotency-Key must be 1..128 characters of A-Z a-z 0-9 _ - . : @")
    return value
