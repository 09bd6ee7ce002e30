"""Real-shaped Lambda inputs: API Gateway HTTP API (payload 2.0) events, scheduled events, a context."""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

ACCOUNT = "123456789012"


def route_matches(route_path: str, path: str) -> dict[str, str] | None:
    """Match `/users/{userId}/consume` against a concrete path; returns the path parameters."""
    pattern = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(route_path)) + "$"
    match = re.match(pattern, path)
    return match.groupdict() if match else None


def http_api_event(
    method: str,
    path: str,
    *,
    route_path: str | None = None,
    body: str | bytes | None = None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    user: str | None = None,
    iam: bool = False,
) -> dict[str, Any]:
    """The event API Gateway sends for one request, with the authorizer context it would add."""
    route_path = route_path or path
    params = route_matches(route_path, path) or {}
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    if body is not None and "content-type" not in lowered:
        lowered["content-type"] = "application/json"
    authorizer: dict[str, Any] = {}
    if user is not None:
        authorizer["jwt"] = {"claims": {"sub": user, "iss": "https://issuer.example"}, "scopes": None}
    if iam:
        authorizer["iam"] = {
            "accessKey": "AKIAEXAMPLE", "accountId": ACCOUNT, "callerId": "AIDAEXAMPLE",
            "principalOrgId": None, "userArn": f"arn:aws:iam::{ACCOUNT}:user/backend", "userId": "AIDAEXAMPLE",
        }
    encoded = isinstance(body, bytes)
    text_body = base64.b64encode(body).decode() if isinstance(body, bytes) else body
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": f"{method.upper()} {route_path}",
        "rawPath": path,
        "rawQueryString": urlencode(query or {}),
        "headers": lowered,
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": "local",
            "domainName": "127.0.0.1",
            "domainPrefix": "local",
            "http": {"method": method.upper(), "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": lowered.get("user-agent", "local")},
            "requestId": str(uuid.uuid4()),
            "routeKey": f"{method.upper()} {route_path}",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if authorizer:
        event["requestContext"]["authorizer"] = authorizer
    if query:
        event["queryStringParameters"] = dict(query)
    if params:
        event["pathParameters"] = params
    if text_body is not None:
        event["body"] = text_body
    return event


def scheduled_event() -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.scheduler",
        "account": ACCOUNT,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "region": "us-east-1",
        "resources": [f"arn:aws:scheduler:us-east-1:{ACCOUNT}:schedule/default/sweep"],
        "detail": {},
    }


@dataclass
class LambdaContext:
    """What the Lambda runtime passes as `context`; `budget_ms` is the time limit."""

    function_name: str = "local-function"
    memory_limit_in_mb: int = 512
    budget_ms: int = 15_000
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = "/aws/lambda/local-function"
    log_stream_name: str = "local"
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self.budget_ms - int((time.monotonic() - self.started) * 1000))
