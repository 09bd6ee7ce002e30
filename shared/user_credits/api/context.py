"""Request-scoped values the routers read: the caller, and headers by name."""

from __future__ import annotations

from collections.abc import Mapping

from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.errors import Unauthorized


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header by its lower-case name: API Gateway lower-cases names, but hand-made events may not."""
    return next((v for k, v in (headers or {}).items() if k.lower() == name), None)


def current_user(router: Router) -> str:
    user_id = router.context.get("user_id")
    if not isinstance(user_id, str):
        raise Unauthorized("a signed-in user is required")
    return user_id
