"""Who is calling. User routes: the JWT `sub`; service routes: an IAM-signed caller (SPEC 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from user_credits.api.schemas import ID_RE
from user_credits.errors import Forbidden, Unauthorized

Caller = Literal["user", "service", "stripe"]

SERVICE_PREFIXES = ("/admin/", "/users/")
STRIPE_PATHS = ("/webhooks/stripe",)


def caller_kind(path: str) -> Caller:
    """Which authorizer guards a route, from its path: the same split template.yaml declares."""
    if path in STRIPE_PATHS:
        return "stripe"
    if path.startswith(SERVICE_PREFIXES):
        return "service"
    return "user"


def _authorizer(event: Mapping[str, Any]) -> Mapping[str, Any]:
    context = event.get("requestContext") or {}
    authorizer = context.get("authorizer") if isinstance(context, Mapping) else None
    return authorizer if isinstance(authorizer, Mapping) else {}


def jwt_user(event: Mapping[str, Any]) -> str:
    jwt = _authorizer(event).get("jwt") or {}
    claims = jwt.get("claims") if isinstance(jwt, Mapping) else None
    sub = claims.get("sub") if isinstance(claims, Mapping) else None
    if not isinstance(sub, str) or not sub:
        raise Unauthorized("a signed-in user is required (JWT claim sub)")
    if not _id_ok(sub):
        raise Unauthorized("the JWT subject is not a valid user id")
    return sub


def require_service(event: Mapping[str, Any]) -> None:
    # Defence in depth: a route wired without AWS_IAM must not open the admin API.
    if not _authorizer(event).get("iam"):
        raise Forbidden("this route is for IAM-signed service callers only")


def _id_ok(value: str) -> bool:
    return bool(ID_RE.fullmatch(value))


def check_caller(event: Mapping[str, Any], path: str) -> str | None:
    """Authenticate before any parsing; returns the user id of a user route."""
    kind = caller_kind(path)
    if kind == "user":
        return jwt_user(event)
    if kind == "service":
        require_service(event)
    return None
