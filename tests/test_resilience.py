"""Worst-day behaviour at the HTTP edge: throttling and timeouts are 503 + Retry-After, never a 500."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError, ReadTimeoutError


def _fail_dynamodb(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    original = BaseClient._make_api_call

    def failing(self: BaseClient, operation: str, params: dict[str, Any]) -> Any:
        if self.meta.service_model.service_name == "dynamodb":
            raise error
        return original(self, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", failing)


@pytest.mark.parametrize("code", ["ThrottlingException", "ProvisionedThroughputExceededException"])
def test_throttling_is_503_with_retry_after(service: Any, monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    _fail_dynamodb(monkeypatch, ClientError({"Error": {"Code": code, "Message": "slow down"}}, "Scan"))
    reply = service.call("GET", "/offers", user="u-throttled")
    assert reply.status == 503
    assert reply.body["error"] == "service_unavailable"
    assert reply.headers.get("Retry-After") == "1"


def test_a_dynamodb_timeout_is_503(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_dynamodb(monkeypatch, ReadTimeoutError(endpoint_url="http://127.0.0.1"))
    reply = service.call("GET", "/admin/offers", iam=True)
    assert reply.status == 503 and reply.body["error"] == "service_unavailable"


def test_an_unexpected_failure_keeps_the_error_shape(
    service: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fail_dynamodb(monkeypatch, ClientError({"Error": {"Code": "InternalServerError", "Message": "x"}}, "Scan"))
    with caplog.at_level(logging.ERROR):
        reply = service.call("GET", "/admin/offers", iam=True)
    assert reply.status == 500
    assert reply.body == {"error": "internal_error", "message": "internal error"}


def test_a_named_stage_in_the_path_keeps_service_routes_behind_iam(service: Any) -> None:
    """With a named stage, API Gateway sends rawPath `/prod/admin/offers`: still a service route."""
    from user_credits_dev import template as tpl
    from user_credits_dev.lambda_events import LambdaContext, http_api_event

    spec, route_path = service.spec_for("GET", "/admin/offers")
    handler = tpl.load_handler(spec)
    for iam, expected in ((False, 403), (True, 200)):
        event = http_api_event("GET", "/admin/offers", route_path=route_path, user=None if iam else "a-user", iam=iam)
        event["rawPath"] = "/prod/admin/offers"
        event["requestContext"]["stage"] = "prod"
        event["requestContext"]["http"]["path"] = "/prod/admin/offers"
        result = handler(event, LambdaContext(function_name=spec.logical_id))
        assert result["statusCode"] == expected, result


def test_a_named_stage_in_the_path_serves_user_routes(service: Any) -> None:
    from user_credits_dev import template as tpl
    from user_credits_dev.lambda_events import LambdaContext, http_api_event

    spec, route_path = service.spec_for("GET", "/credits")
    event = http_api_event("GET", "/credits", route_path=route_path, user="stage-user")
    event["rawPath"] = "/prod/credits"
    event["requestContext"]["stage"] = "prod"
    event["requestContext"]["http"]["path"] = "/prod/credits"
    result = tpl.load_handler(spec)(event, LambdaContext(function_name=spec.logical_id))
    assert result["statusCode"] == 200, result


def test_a_server_error_body_names_nothing_internal(service: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 3: a missing table variable or an unreadable Stripe secret is a 5xx whose body names neither."""
    import os

    table = os.environ["ACCOUNTS_TABLE"]
    monkeypatch.delenv("ACCOUNTS_TABLE")
    early = service.call("GET", "/admin/offers", iam=True)
    monkeypatch.setenv("ACCOUNTS_TABLE", table)
    assert early.status == 500
    assert early.body == {"error": "configuration_error", "message": "internal error"}


def test_a_failed_stripe_call_is_502_without_stripes_words() -> None:
    from user_credits.errors import PaymentProviderError

    body = PaymentProviderError("Stripe refused or failed the payment: card_declined for sk_test_...").body()
    assert body == {"error": "payment_provider_error",
                    "message": "the payment provider failed; nothing was stored, retry later"}
