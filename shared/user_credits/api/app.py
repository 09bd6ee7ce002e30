"""The one place that builds a resolver, runs the pre-routing checks and maps errors to HTTP."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import BotoCoreError, ClientError
from pynamodb.exceptions import PynamoDBException

from user_credits.api.auth import caller_kind, check_caller
from user_credits.api.context import header
from user_credits.config import load_settings
from user_credits.errors import (
    CreditsError,
    MalformedJson,
    PayloadTooLarge,
    RouteNotFound,
    ServiceBusy,
    UnsupportedMediaType,
    ValidationFailed,
)
from user_credits.observability import count_server_error, logger, metrics
from user_credits.store.models import bind_tables

MAX_BODY_BYTES = 256 * 1024
RETRY_AFTER_SECONDS = "1"
_THROTTLING = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TransactionConflictException",
    "TransactionInProgressException",
}


def error_response(error: CreditsError) -> Response[str]:
    if error.http_status >= 500:
        count_server_error()
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if isinstance(error, ServiceBusy) else None
    return Response(
        status_code=error.http_status,
        content_type="application/json",
        body=json.dumps(error.body()),
        headers=headers,
    )


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def build_app(*routers: Router) -> APIGatewayHttpResolver:
    app = APIGatewayHttpResolver(enable_validation=True)
    for router in routers:
        app.include_router(router)

    @app.exception_handler(CreditsError)
    def _credits_error(error: CreditsError) -> Response[str]:
        if error.http_status >= 500:
            # The detail stays here: the body says only `error.public_message()` (errors.CreditsError).
            logger.exception("request failed", extra={"code": error.code})
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    def _invalid(error: RequestValidationError) -> Response[str]:
        errors = list(error.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(MalformedJson("the body is not valid JSON"))
        return error_response(ValidationFailed(_describe(errors)))

    @app.exception_handler(RequestUnsupportedContentType)
    def _media(error: RequestUnsupportedContentType) -> Response[str]:
        return error_response(UnsupportedMediaType("send JSON with Content-Type: application/json"))

    @app.exception_handler(ClientError)
    def _aws(error: ClientError) -> Response[str]:
        return _aws_failure(str(error.response.get("Error", {}).get("Code", "")))

    @app.exception_handler(PynamoDBException)
    def _dynamodb(error: PynamoDBException) -> Response[str]:
        # pynamodb wraps botocore's errors; what happened is on its cause.
        if isinstance(error.cause, BotoCoreError):
            return _unreachable(error.cause)
        code = error.cause.response.get("Error", {}).get("Code", "") if isinstance(error.cause, ClientError) else ""
        return _aws_failure(str(code))

    @app.exception_handler(BotoCoreError)
    def _transport(error: BotoCoreError) -> Response[str]:
        return _unreachable(error)

    @app.exception_handler(Exception)
    def _unexpected(error: Exception) -> Response[str]:
        # A bug, not bad input: keep the contract's error shape and leave the stack in the log.
        logger.exception("unexpected error")
        return error_response(CreditsError("internal error"))

    @app.not_found
    def _not_found(_: Exception) -> Response[str]:
        return error_response(RouteNotFound("no such route"))

    return app


def _unreachable(error: BotoCoreError) -> Response[str]:
    # Timeouts and dropped connections: nothing is known to have happened, the caller may retry.
    logger.warning("AWS unreachable", extra={"error": type(error).__name__})
    return error_response(ServiceBusy("a dependency timed out, retry shortly"))


def _aws_failure(code: str) -> Response[str]:
    if code in _THROTTLING:
        return error_response(ServiceBusy("the service is busy, retry shortly"))
    logger.exception("AWS call failed", extra={"code": code})
    return error_response(CreditsError("internal error"))


def _body_size(event: Mapping[str, Any]) -> int:
    body = event.get("body") or ""
    if not isinstance(body, str):
        return 0
    if event.get("isBase64Encoded"):
        return len(body) * 3 // 4
    return len(body.encode("utf-8"))


def route_path(event: Mapping[str, Any]) -> str:
    """The route's path as template.yaml declares it, whatever the stage.

    With a named stage, API Gateway puts it in rawPath (`/prod/admin/offers`); routeKey
    (`GET /admin/offers`) never has it, and API Gateway sets it, so callers cannot choose it.
    """
    route_key = event.get("routeKey")
    if isinstance(route_key, str) and " " in route_key:
        return route_key.split(" ", 1)[1]
    raw = str(event.get("rawPath") or "")
    stage = str((event.get("requestContext") or {}).get("stage") or "")
    if stage and stage != "$default" and raw.startswith(f"/{stage}/"):
        return raw[len(stage) + 1:]
    return raw


def _content_type(event: Mapping[str, Any]) -> str:
    return str(header(event.get("headers"), "content-type") or "").strip().lower()


def _check_json_object(event: Mapping[str, Any]) -> None:
    """Every body we accept is one JSON object. Checked here, in one place, because Powertools would
    parse form and multipart bodies (and crash on some), and would read `[{...}]` as its first element."""
    raw = event.get("body")
    method = str(((event.get("requestContext") or {}).get("http") or {}).get("method", "")).upper()
    content_type = _content_type(event)
    if (raw or method in ("POST", "PUT")) and content_type and not content_type.startswith("application/json"):
        raise UnsupportedMediaType("send JSON with Content-Type: application/json")
    if not raw:
        return
    try:
        text = base64.b64decode(raw).decode("utf-8") if event.get("isBase64Encoded") else str(raw)
        parsed = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedJson("the body is not valid JSON") from error
    if not isinstance(parsed, dict):
        raise ValidationFailed("the body must be a JSON object")


def handle(app: APIGatewayHttpResolver, event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Size and caller checks come first: nothing is parsed for a caller who may not call."""
    try:
        path = route_path(event)
        user_id = check_caller(event, path)
        if _body_size(event) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
        if caller_kind(path) != "stripe":
            # The webhook verifies its raw bytes' signature before it reads anything.
            _check_json_object(event)
        bind_tables(load_settings())
    except CreditsError as error:
        return _early_response(error)
    app.append_context(user_id=user_id)
    request_context = event.get("requestContext") or {}
    logger.append_keys(
        request_id=request_context.get("requestId"), route=event.get("routeKey"), user_id=user_id
    )
    return app.resolve(event, context)


def lambda_entry(*routers: Router) -> Any:
    """The Lambda handler of a function that serves `routers`: logging context, then `handle`."""
    app = build_app(*routers)

    @logger.inject_lambda_context(clear_state=True)
    @metrics.log_metrics
    def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        return handle(app, event, context)

    handler.app = app  # type: ignore[attr-defined]  # the local server and OpenAPI export read it
    return handler


def _early_response(error: CreditsError) -> dict[str, Any]:
    """The same shape the resolver returns, for refusals made before routing."""
    if error.http_status >= 500:
        logger.error("request failed before routing", extra={"code": error.code, "detail": error.message})
    response = error_response(error)
    headers: dict[str, Any] = {"Content-Type": "application/json", **(response.headers or {})}
    return {"statusCode": response.status_code, "headers": headers, "body": response.body,
            "isBase64Encoded": False, "cookies": []}
