"""GET /credits/ledger and GET /users/{userId}/ledger: newest first, limit, opaque cursor, group filter."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest


def grant(service: Any, user: str, group: str, tokens: int) -> None:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens}, iam=True)
    assert reply.status == 201, reply.body


def consume(service: Any, user: str, group: str, tokens: int) -> None:
    reply = service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens}, iam=True)
    assert reply.status == 200, reply.body


def history(service: Any, user: str, group: str, consumes: int) -> None:
    grant(service, user, group, 100)
    for tokens in range(1, consumes + 1):
        consume(service, user, group, tokens)


def read_all(service: Any, path: str, *, user: str | None = None, iam: bool = False,
             **query: str) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        params = {**query, **({"cursor": cursor} if cursor else {})}
        reply = service.call("GET", path, user=user, iam=iam, query=params or None)
        assert reply.status == 200, reply.body
        pages.append(reply.body["items"])
        cursor = reply.body["nextCursor"]
        if cursor is None:
            return pages


def test_ledger_is_newest_first_with_exact_entries(service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    history(service, user, group, 3)
    reply = service.call("GET", "/credits/ledger", user=user)
    assert reply.status == 200 and reply.body["nextCursor"] is None
    items = reply.body["items"]
    assert [(i["delta"], i["balanceAfter"], i["reason"]) for i in items] == [
        (-3, 94, "consume"), (-2, 97, "consume"), (-1, 99, "consume"), (100, 100, "grant")]
    assert all(i["offerGroup"] == group and i["at"].endswith("Z") for i in items)
    assert {"offerGroup", "delta", "balanceAfter", "reason", "at"} <= set(items[0])
    balanced(user)


def test_ledger_pages_with_a_cursor_until_the_end(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    history(service, user, group, 6)
    pages = read_all(service, "/credits/ledger", user=user, limit="3")
    assert [len(p) for p in pages] == [3, 3, 1]
    whole = service.call("GET", "/credits/ledger", user=user).body["items"]
    assert [i for p in pages for i in p] == whole


def test_a_last_full_page_has_no_cursor(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    history(service, user, group, 3)
    reply = service.call("GET", "/credits/ledger", user=user, query={"limit": "4"})
    assert len(reply.body["items"]) == 4 and reply.body["nextCursor"] is None


def test_ledger_filters_by_group_and_pages_within_it(service: Any, ids: Any) -> None:
    user, a, b = ids("u"), ids("a"), ids("b")
    history(service, user, a, 3)
    history(service, user, b, 2)
    only_b = read_all(service, f"/users/{user}/ledger", iam=True, offerGroup=b, limit="2")
    assert [len(p) for p in only_b] == [2, 1]
    assert {i["offerGroup"] for p in only_b for i in p} == {b}
    assert [i["balanceAfter"] for p in only_b for i in p] == [97, 99, 100]
    everything = service.call("GET", f"/users/{user}/ledger", iam=True).body["items"]
    assert len(everything) == 7


def test_default_limit_is_50_and_max_is_1000(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 100)
    for _ in range(51):
        consume(service, user, group, 1)
    first = service.call("GET", "/credits/ledger", user=user).body
    assert len(first["items"]) == 50 and first["nextCursor"] is not None
    assert len(service.call("GET", "/credits/ledger", user=user, query={"limit": "1000"}).body["items"]) == 52


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "2.0", "1e2", "abc", "", " 5", "+5", "99999999999"])
def test_a_bad_limit_is_refused(service: Any, ids: Any, limit: str) -> None:
    reply = service.call("GET", "/credits/ledger", user=ids("u"), query={"limit": limit})
    assert reply.status == 422 and reply.body["error"] == "validation_error"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "not-a-cursor!", _b64(b"[]"), _b64(b'{"after": 5}'), _b64(b'{"after": "x"}'), _b64(b"{"),
    _b64(json.dumps({"after": "20260101T000000.000000#g#000000000001", "userId": "x"}).encode())[:-3],
    _b64(json.dumps({"after": "20260101T000000.000000#bad group#000000000001"}).encode()),
])
def test_a_tampered_cursor_is_refused(service: Any, ids: Any, cursor: str) -> None:
    reply = service.call("GET", "/credits/ledger", user=ids("u"), query={"cursor": cursor})
    assert reply.status == 422 and reply.body["error"] == "validation_error"


def test_a_cursor_cannot_open_another_users_ledger(service: Any, ids: Any) -> None:
    alice, bob, group = ids("u"), ids("u"), ids("g")
    history(service, alice, group, 4)
    cursor = service.call("GET", "/credits/ledger", user=alice, query={"limit": "2"}).body["nextCursor"]
    reply = service.call("GET", "/credits/ledger", user=bob, query={"cursor": cursor})
    assert reply.status == 200 and reply.body == {"items": [], "nextCursor": None}


def test_a_user_sees_only_their_own_ledger(service: Any, ids: Any) -> None:
    alice, bob, group = ids("u"), ids("u"), ids("g")
    history(service, alice, group, 2)
    assert service.call("GET", "/credits/ledger", user=bob).body["items"] == []


def test_service_ledger_without_iam_is_forbidden(service: Any, ids: Any) -> None:
    reply = service.call("GET", f"/users/{ids('u')}/ledger", user="someone")
    assert reply.status == 403 and reply.body["error"] == "forbidden"


def test_bad_group_filter_is_refused(service: Any, ids: Any) -> None:
    reply = service.call("GET", "/credits/ledger", user=ids("u"), query={"offerGroup": "has space"})
    assert reply.status == 422 and reply.body["error"] == "validation_error"
