"""SPEC 2.2 and the catalog routes, through the Lambda handlers, on moto and on DynamoDB Local."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from user_credits.store.models import OrderRecord, order_sk


def offer_body(group: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"offerGroup": group, "tokens": 100, "cycle": "monthly", "prices": {"usd": 999}}
    body.update(overrides)
    return body


def put_offer(service: Any, offer_id: str, **fields: Any) -> Any:
    return service.call("PUT", f"/admin/offers/{offer_id}", fields, iam=True)


def record_paid_order(user: str, offer_id: str, group: str, expires_at: datetime | None) -> None:
    """Test helper: a paid order as the webhook would leave it."""
    now = datetime.now(UTC)
    OrderRecord(
        user, order_sk(f"o-{offer_id}-{user}"), orderId=f"o-{offer_id}-{user}", offerId=offer_id,
        offerGroup=group, quantity=1, amount=999, currency="usd", status="paid", tokens=100,
        createdAt=now, startsAt=now, expiresAt=expires_at,
    ).save()


def visible_ids(service: Any, user: str, **query: str) -> list[str]:
    reply = service.call("GET", "/offers", user=user, query=query or None)
    assert reply.status == 200, reply.body
    return [o["offerId"] for o in reply.body["offers"]]


def test_put_creates_then_updates_and_round_trips(service: Any, ids: Any) -> None:
    offer_id, group = ids("offer"), ids("grp")
    created = put_offer(service, offer_id, **offer_body(group))
    assert created.status == 201
    offer = created.body["offer"]
    assert offer["name"] == offer_id and offer["kind"] == "tokens" and offer["active"] is True
    assert offer["priority"] == 50
    # An offer as returned can be PUT back unchanged.
    updated = service.call("PUT", f"/admin/offers/{offer_id}", offer, iam=True)
    assert updated.status == 200
    assert updated.body["offer"] == offer
    listed = service.call("GET", "/admin/offers", iam=True)
    assert offer in listed.body["offers"]


@pytest.mark.parametrize(
    "change",
    [
        {"tokens": "100"},
        {"tokens": 100.0},
        {"tokens": True},
        {"tokens": -1},
        {"tokens": 10**15 + 1},
        {"priority": 101},
        {"priority": -1},
        {"priority": "1"},
        {"prices": {"usd": -1}},
        {"prices": {}},
        {"prices": {"USD": 100}},
        {"prices": {"usd": 9.99}},
        {"cycle": "fortnightly"},
        {"cycle": "custom"},
        {"customCycleSeconds": 60},
        {"appendDate": 1},
        {"quantityLimit": 0},
        {"unknownField": 1},
        {"offerGroup": ""},
        {"offerGroup": "has space"},
        {"offerGroup": "x" * 129},
        {"combinedItems": [{"offerId": "a", "offerGroup": "b", "quantity": 0}]},
        {"tags": ["ok", 3]},
    ],
)
def test_bad_offer_is_refused_and_writes_nothing(service: Any, ids: Any, change: dict[str, Any]) -> None:
    offer_id = ids("offer")
    reply = put_offer(service, offer_id, **{**offer_body(ids("grp")), **change})
    assert reply.status in (400, 422), reply.body
    assert reply.body["error"] == "validation_error" and reply.body["message"]
    assert service.call("GET", "/admin/offers", iam=True).body["offers"] == [] or all(
        o["offerId"] != offer_id for o in service.call("GET", "/admin/offers", iam=True).body["offers"]
    )


@pytest.mark.parametrize("missing", ["offerGroup", "tokens", "cycle", "prices"])
def test_required_offer_fields(service: Any, ids: Any, missing: str) -> None:
    body = offer_body(ids("grp"))
    del body[missing]
    reply = put_offer(service, ids("offer"), **body)
    assert reply.status == 422 and reply.body["error"] == "validation_error"


def test_malformed_json_is_400(service: Any, ids: Any) -> None:
    reply = service.call("PUT", f"/admin/offers/{ids('offer')}", raw_body="{not json", iam=True)
    assert reply.status == 400 and reply.body["error"] == "validation_error"


def test_admin_routes_refuse_callers_without_iam(service: Any, ids: Any) -> None:
    reply = service.call("PUT", f"/admin/offers/{ids('offer')}", offer_body("g"), user="someone")
    assert reply.status == 403 and reply.body["error"] == "forbidden"
    assert service.call("GET", "/admin/offers", user="someone").status == 403


def test_user_routes_need_a_user(service: Any) -> None:
    reply = service.call("GET", "/offers")
    assert reply.status == 401 and reply.body["error"] == "unauthorized"


def test_body_over_256_kib_is_413(service: Any, ids: Any) -> None:
    big = offer_body(ids("grp"), name="x" * (300 * 1024))
    reply = put_offer(service, ids("offer"), **big)
    assert reply.status == 413 and reply.body["error"] == "payload_too_large"


def test_unlocked_offer_shows_only_to_a_holder_and_overrides_the_public_one(service: Any, ids: Any) -> None:
    base_group, premium_group = ids("base"), ids("premium")
    key = ids("key")
    public, unlocked, other = ids("public"), ids("unlocked"), ids("plain")
    put_offer(service, public, **offer_body(premium_group, overridingKey=key))
    put_offer(service, unlocked, **offer_body(premium_group, overridingKey=key, unlockedBy=[base_group]))
    put_offer(service, other, **offer_body(base_group))
    holder, stranger = ids("holder"), ids("stranger")
    record_paid_order(holder, other, base_group, datetime.now(UTC) + timedelta(days=10))

    holder_sees = visible_ids(service, holder)
    stranger_sees = visible_ids(service, stranger)
    assert unlocked in holder_sees and public not in holder_sees
    assert public in stranger_sees and unlocked not in stranger_sees
    subscribed = {o["offerId"]: o["subscribed"] for o in service.call("GET", "/offers", user=holder).body["offers"]}
    assert subscribed[other] is True and subscribed[unlocked] is False


def test_expired_order_unlocks_nothing(service: Any, ids: Any) -> None:
    base_group = ids("base")
    locked = ids("locked")
    put_offer(service, locked, **offer_body(ids("g"), unlockedBy=[base_group]))
    user = ids("user")
    record_paid_order(user, ids("old"), base_group, datetime.now(UTC) - timedelta(seconds=1))
    assert locked not in visible_ids(service, user)


def test_inactive_offers_are_hidden_and_tags_filter(service: Any, ids: Any) -> None:
    tag = ids("tag")
    a, b, c = ids("a"), ids("b"), ids("c")
    put_offer(service, a, **offer_body(ids("g"), tags=[tag, "x"]))
    put_offer(service, b, **offer_body(ids("g"), tags=[tag]))
    put_offer(service, c, **offer_body(ids("g"), tags=[tag, "x"], active=False))
    assert visible_ids(service, ids("u"), tags=f"{tag},x") == [a]
