"""GET /credits and GET /users/{userId}/credits: balances and paid orders, from one Query."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from user_credits.store.models import OrderRecord, order_sk


def grant(service: Any, user: str, group: str, tokens: int, **extra: Any) -> Any:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens, **extra},
                         iam=True)
    assert reply.status == 201, reply.body
    return reply


def order(user: str, order_id: str, status: str, group: str = "pro", tokens: int = 100) -> None:
    now = datetime.now(UTC)
    paid = status in ("paid", "partially_refunded", "refunded")
    OrderRecord(
        user, order_sk(order_id), orderId=order_id, offerId="offer-1", offerGroup=group, quantity=1, amount=999,
        currency="usd", status=status, tokens=tokens, createdAt=now,
        startsAt=now if paid else None, expiresAt=now + timedelta(days=30) if paid else None,
    ).save()


def test_credits_lists_every_group_with_balance_and_expiry(service: Any, ids: Any, balanced: Any) -> None:
    user, a, b = ids("u"), ids("a"), ids("b")
    expiry = "2099-01-01T00:00:00Z"
    grant(service, user, a, 10)
    grant(service, user, b, 5, expiresAt=expiry)
    service.call("POST", f"/users/{user}/consume", {"offerGroup": a, "tokens": 4}, iam=True)
    reply = service.call("GET", "/credits", user=user)
    assert reply.status == 200
    assert reply.body["userId"] == user
    groups = {g["offerGroup"]: g for g in reply.body["groups"]}
    assert [(g["balance"], g["expiresAt"]) for g in (groups[a], groups[b])] == [(6, None), (5, expiry)]
    # Each grant is a lot of its own; `remaining` includes the consume.
    assert [(lot["source"], lot["granted"], lot["remaining"], lot["expiresAt"], lot["priority"])
            for lot in groups[a]["lots"] + groups[b]["lots"]] == [
        ("grant", 10, 6, None, 50), ("grant", 5, 5, expiry, 50)]
    assert reply.body["orders"] == []
    balanced(user)


def test_credits_lists_paid_orders_only(service: Any, ids: Any) -> None:
    user = ids("u")
    for status in ("pending", "paid", "failed", "canceled", "inconsistent", "refunded", "partially_refunded"):
        order(user, f"o-{status}", status)
    reply = service.call("GET", "/credits", user=user)
    listed = {o["orderId"]: o for o in reply.body["orders"]}
    assert set(listed) == {"o-paid", "o-partially_refunded"}
    paid = listed["o-paid"]
    assert paid["tokens"] == 100 and paid["startsAt"] and paid["expiresAt"] and paid["status"] == "paid"
    assert "clientSecret" not in paid


def test_a_user_with_nothing_has_empty_credits(service: Any, ids: Any) -> None:
    user = ids("u")
    assert service.call("GET", "/credits", user=user).body == {"userId": user, "groups": [], "orders": []}


def test_a_user_sees_only_their_own_credits(service: Any, ids: Any) -> None:
    alice, bob, group = ids("u"), ids("u"), ids("g")
    grant(service, alice, group, 10)
    order(alice, "o-alice", "paid")
    assert service.call("GET", "/credits", user=bob).body == {"userId": bob, "groups": [], "orders": []}


def test_service_reads_any_users_credits(service: Any, ids: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(service, user, group, 10)
    reply = service.call("GET", f"/users/{user}/credits", iam=True)
    assert reply.status == 200
    assert [(g["offerGroup"], g["balance"], g["expiresAt"], len(g["lots"])) for g in reply.body["groups"]] == [
        (group, 10, None, 1)]


def test_service_credits_without_iam_is_forbidden(service: Any, ids: Any) -> None:
    reply = service.call("GET", f"/users/{ids('u')}/credits", user="someone")
    assert reply.status == 403 and reply.body["error"] == "forbidden"


def test_user_credits_without_a_signed_in_user_is_unauthorized(service: Any) -> None:
    reply = service.call("GET", "/credits")
    assert reply.status == 401 and reply.body["error"] == "unauthorized"


@pytest.mark.parametrize("user", ["has space", "x" * 129, "a;b"])
def test_bad_user_id_in_the_path_is_refused(service: Any, user: str) -> None:
    reply = service.call("GET", f"/users/{user}/credits", iam=True)
    assert reply.status == 422 and reply.body["error"] == "validation_error"
