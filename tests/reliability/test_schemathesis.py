"""Schemathesis against openapi.json (`user-credits openapi --write`), through the Lambda handlers.

Every request it generates from the document (conforming or not) goes to the function template.yaml
routes it to, with the caller the route's authorizer admits (a JWT user, an IAM service, nobody for
the webhook). Whatever arrives: never a 5xx, and every 4xx carries `{"error", "message"}`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import schemathesis
from hypothesis import settings

from user_credits_dev import template as tpl

pytestmark = pytest.mark.ddblocal

schema = schemathesis.openapi.from_path(tpl.REPO_ROOT / "openapi.json")
AUTH = {(m, p): auth for spec in tpl.functions({}) for m, p, auth in spec.routes}
EXAMPLES = 400 if os.environ.get("HYPOTHESIS_PROFILE") == "soak" else 15


def query_string_parameters(query: Any) -> dict[str, str] | None:
    """As API Gateway passes them: strings, repeated keys joined with commas."""
    if not query:
        return None
    flat: dict[str, str] = {}
    for key, value in query.items():
        values = value if isinstance(value, list) else [value]
        flat[str(key)] = ",".join(v if isinstance(v, str) else json.dumps(v) for v in values)
    return flat


@schema.parametrize()
@settings(max_examples=EXAMPLES)
def test_generated_requests_never_get_a_5xx_and_4xx_carry_the_error_shape(case: Any, local_service: Any) -> None:
    auth = AUTH.get((case.method.upper(), case.path))
    path = case.formatted_path
    try:
        local_service.spec_for(case.method, path)
    except LookupError:
        auth = None
    if auth is None:
        return  # no route: API Gateway answers itself (an undeclared method, an empty or "/"-bearing id)
    # Schemathesis serializes the case (JSON, raw bytes, other media types) as it would send it.
    sent = case.as_transport_kwargs(base_url="http://local")
    headers = {str(k): str(v) for k, v in (sent.get("headers") or {}).items()}
    raw: str | bytes | None
    if "json" in sent:
        raw = json.dumps(sent["json"])
    else:
        raw = sent.get("data")
        raw = raw if raw is None or isinstance(raw, str | bytes) else str(raw)
    reply = local_service.call(
        case.method, path, headers=headers, query=query_string_parameters(sent.get("params")), raw_body=raw,
        user="schemathesis-user" if auth == "UserJwt" else None, iam=auth == "AWS_IAM",
    )
    assert reply.status < 500, (case.method, path, reply.status, reply.body)
    if reply.status >= 400:
        assert isinstance(reply.body, dict), reply.body
        assert isinstance(reply.body.get("error"), str) and isinstance(reply.body.get("message"), str), reply.body
