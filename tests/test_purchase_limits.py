"""SPEC 2.11 (perUserLimit) and SPEC 1's `billing`, on moto and DynamoDB Local."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from stripe_fixtures import payment_intent_event

from user_credits.store.models import OrderRecord

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]


def orders_of(user: str) -> list[OrderRecord]:
    return [r for r in OrderRecord.query(user, consistent_read=True) if isinstance(r, OrderRecord)]


def test_a_free_trial_is_ordered_once_per_user(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(prices={"usd": 0}, tokens=50, cycle="once", perUserLimit=1)
    user = ids("u")
    assert shop.placed(user, offer_id)["status"] == "paid"
    again = shop.order(user, offer_id)
    assert again.status == 409 and again.error == "purchase_limit_reached", again.body
    assert len(orders_of(user)) == 1 and shop.group(user, group).balance == 50
    assert shop.placed(ids("other"), offer_id)["status"] == "paid"


def test_the_limit_counts_pending_and_paid_orders_not_failed_ones_and_calls_no_stripe(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer(perUserLimit=2)
    user = ids("u")
    first = shop.placed(user, offer_id)
    failed = shop.deliver(payment_intent_event(shop.intent(first), "payment_intent.payment_failed"))
    assert failed.status == 200
    shop.placed(user, offer_id)
    shop.placed(user, offer_id)
    created = shop.fake.created_count()
    refused = shop.order(user, offer_id)
    assert refused.status == 409 and refused.error == "purchase_limit_reached"
    assert shop.fake.created_count() == created
    assert len(orders_of(user)) == 3


def test_a_repeated_keyed_order_of_a_free_trial_replays_instead_of_refusing(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer(prices={"usd": 0}, tokens=5, cycle="once", perUserLimit=1)
    user = ids("u")
    first = shop.order(user, offer_id, key="trial-1")
    again = shop.order(user, offer_id, key="trial-1")
    assert first.status == again.status == 201 and again.body == first.body


def test_concurrent_orders_of_a_free_trial_credit_it_once(local_shop: Shop, ids: Any) -> None:
    shop = local_shop
    offer_id, group = shop.offer(prices={"usd": 0}, tokens=50, cycle="once", perUserLimit=1)
    user = ids("u")
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: shop.order(user, offer_id), range(4)))
    assert sorted(r.status for r in replies if r.status != 503)[0] == 201, [r.body for r in replies]
    assert sum(1 for r in replies if r.status == 201) == 1
    assert all(r.status in (201, 409, 503) for r in replies)
    assert len(orders_of(user)) == 1 and shop.group(user, group).balance == 50


def test_recurring_billing_needs_a_calendar_cycle_and_is_not_bought_with_orders(shop: Shop, ids: Any) -> None:
    for cycle, extra in (("once", {}), ("custom", {"customCycleSeconds": 60})):
        reply = shop.service.call("PUT", f"/admin/offers/{ids('o')}", {
            "offerGroup": "g", "tokens": 1, "cycle": cycle, "prices": {"usd": 100}, "billing": "recurring", **extra,
        }, iam=True)
        assert reply.status == 422 and reply.error == "validation_error", reply.body
    offer_id, _ = shop.offer(billing="recurring", cycle="monthly")
    listed = shop.service.call("GET", "/admin/offers", iam=True).body["offers"]
    assert next(o for o in listed if o["offerId"] == offer_id)["billing"] == "recurring"
    refused = shop.order(ids("u"), offer_id)
    assert refused.status == 422 and refused.error == "validation_error"
