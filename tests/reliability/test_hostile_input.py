"""Hostile input on every route of template.yaml: random bodies, ids, query strings and headers.

Whatever arrives, the answer is a 4xx with `{"error", "message"}` (never a 5xx), and a refused request
writes nothing. Routes are read from the template, so a new route is fuzzed without a new test.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from user_credits_dev import template as tpl

ROUTES = sorted({(m, p) for spec in tpl.functions({}) for m, p, _ in spec.routes if p != "/webhooks/stripe"})

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(
    allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["offerId", "offerGroup", "tokens", "quantity", "currency", "maxOverdraft", "expiresAt", "prices", "cycle",
     "reason", "customCycleSeconds", "unknown", "__proto__", "$where"]
)
plausible_bodies = st.dictionaries(field_names, json_values, max_size=6)
raw_bodies = st.one_of(
    plausible_bodies.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.sampled_from(["", "{", "[]", "null", '{"tokens": 1e999}', '{"tokens": NaN}', "\x00", "{'a': 1}"]),
)
hostile_ids = st.one_of(
    st.text(min_size=1, max_size=300),
    st.sampled_from(["' OR 1=1 --", "../../etc/passwd", "%00", "a" * 129, "ü", "GROUP#x", "#sweep", "a b", "*"]),
    st.text(alphabet=string.ascii_letters + string.digits + "_-.:@", min_size=1, max_size=128),
)
queries = st.dictionaries(
    st.sampled_from(["limit", "cursor", "offerGroup", "tags", "x"]),
    st.text(max_size=30) | st.integers(-5, 5000).map(str),
    max_size=3,
)
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=utf-8"])


def _path(route: str, value: str) -> str:
    from urllib.parse import quote

    for name in ("{offerId}", "{userId}", "{orderId}", "{holdId}"):
        route = route.replace(name, quote(value, safe=""))
    return route


def _total_items(service: Any) -> int:
    return sum(service.item_count(logical) for logical in service.backend.tables)


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_hostile_requests_get_a_4xx_and_write_nothing(fresh_service: Any, method: str, route: str) -> None:
    @given(ident=hostile_ids, body=raw_bodies, query=queries, content_type=content_types,
           key=st.none() | hostile_ids)
    def run(ident: str, body: str, query: dict[str, str], content_type: str, key: str | None) -> None:
        before = _total_items(fresh_service)
        headers = {"content-type": content_type}
        if key is not None:
            headers["idempotency-key"] = key
        caller = {"iam": True} if route.startswith(("/admin/", "/users/")) else {"user": "fuzz-user"}
        reply = fresh_service.call(
            method, _path(route, ident), raw_body=body if method in ("POST", "PUT") else None,
            query=query or None, headers=headers, **caller,
        )
        assert reply.status < 500, (reply.status, reply.body)
        if reply.status >= 400:
            assert isinstance(reply.body, dict) and set(reply.body) >= {"error", "message"}, reply.body
            assert _total_items(fresh_service) == before, "a refused request wrote something"

    run()
