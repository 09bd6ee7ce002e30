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
