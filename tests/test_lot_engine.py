"""SPEC 1, 2.4-2.6 and the credits route: a group's tokens as lots, each with its own life, spent in order.

Through the handlers, with real orders paid by webhook, on moto and on DynamoDB Local.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import time_machine

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

T0 = datetime(2031, 5, 10, 9, 0, tzinfo=UTC)


def credits(shop: Shop, user: str, group: str) -> dict[str, Any]:
    reply = shop.service.call("GET", f"/users/{user}/credits", iam=True)
    assert reply.status == 200, reply.body
    found: dict[str, Any] = next(g for g in reply.body["groups"] if g["offerGroup"] == group)
    return found


def consume(shop: Shop, user: str, group: str, tokens: int) -> Any:
    return shop.service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens}, iam=True)


def test_a_top_up_outlives_the_monthly_plan_in_the_same_group(shop: Shop, ids: Any) -> None:
    user = ids("u")
    with time_machine.travel(T0, tick=True):
        plan, group = shop.offer(tokens=100, cycle="monthly")
        top_up, _ = shop.offer(group=group, tokens=50, cycle="once", prices={"usd": 500})
        monthly = shop.bought(user, plan)
        extra = shop.bought(user, top_up)
        assert consume(shop, user, group, 30).status == 200
        now = credits(shop, user, group)
        # The plan's lot first (it expires), the top-up last (it never does); the group never expires.
        assert (now["balance"], now["expiresAt"]) == (120, None)
        assert [(lot["orderId"], lot["remaining"], lot["granted"]) for lot in now["lots"]] == [
            (monthly["orderId"], 70, 100), (extra["orderId"], 50, 50)]
    with time_machine.travel(T0 + timedelta(days=32), tick=True):
        # The month is over: its 70 tokens are gone at once, before any sweep has run.
        later = credits(shop, user, group)
        assert later["balance"] == 50
        assert [lot["orderId"] for lot in later["lots"]] == [extra["orderId"]]
        refused = consume(shop, user, group, 60)
        assert refused.status == 402 and refused.body["error"] == "insufficient_credits"
        assert refused.body["balance"] == 50
        assert consume(shop, user, group, 20).body["balance"] == 30
    entries = [(int(e.delta), e.reason, e.lotId) for e in shop.ledger(user, group)]
    assert entries == [
        (100, "purchase", f"{monthly['orderId']}.0"), (50, "purchase", f"{extra['orderId']}.0"),
        (-30, "consume", None), (-70, "expire", f"{monthly['orderId']}.0"), (-20, "consume", None)]
    shop.assert_ledger_explains_balances(user, [group])


def test_a_lower_priority_offer_is_spent_first(shop: Shop, ids: Any) -> None:
    user = ids("u")
    regular, group = shop.offer(tokens=40, cycle="weekly")
    promo, _ = shop.offer(group=group, tokens=10, cycle="once", priority=5, prices={"usd": 100})
    shop.bought(user, regular)
    shop.bought(user, promo)
    assert consume(shop, user, group, 15).status == 200
    lots = credits(shop, user, group)["lots"]
    assert [(lot["priority"], lot["remaining"]) for lot in lots] == [(5, 0), (50, 35)]


def test_a_refund_takes_from_the_orders_own_lot_first(shop: Shop, ids: Any) -> None:
    user = ids("u")
    first, group = shop.offer(tokens=100, cycle="monthly")
    second, _ = shop.offer(group=group, tokens=100, cycle="once")
    a = shop.bought(user, first)
    b = shop.bought(user, second)
    assert consume(shop, user, group, 50).status == 200  # from A: it expires sooner
    # Refunding B takes B's own tokens, not the ones A still holds.
    assert shop.refund(b, 1000).status == 200
    lots = {lot["orderId"]: lot["remaining"] for lot in credits(shop, user, group)["lots"]}
    assert lots == {a["orderId"]: 50, b["orderId"]: 0}
    # Refunding A wants 100; A holds 50 and B nothing: 50 are taken, 50 are shortfall.
    assert shop.refund(a, 1000).status == 200
    refunds = [(int(e.delta), e.lotId, e.shortfall) for e in shop.ledger(user, group) if e.reason == "refund"]
    assert refunds == [(-100, f"{b['orderId']}.0", None), (-50, f"{a['orderId']}.0", 50)]
    assert credits(shop, user, group)["balance"] == 0
    shop.assert_ledger_explains_balances(user, [group])


def test_a_purchase_pays_the_debt_first(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer, group = shop.offer(tokens=100, cycle="once")
    spent = shop.service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 30,
                                                                 "maxOverdraft": 30}, iam=True)
    assert spent.status == 200 and spent.body["balance"] == -30
    shop.bought(user, offer)
    now = credits(shop, user, group)
    assert now["balance"] == 70
    assert [(lot["granted"], lot["remaining"]) for lot in now["lots"]] == [(100, 70)]
    shop.assert_ledger_explains_balances(user, [group])
