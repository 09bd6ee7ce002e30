"""SPEC 2.10 and 2.11 through the handlers: Checkout, the portal, invoices as lots, the subscription's
status, with Stripe's events duplicated, concurrent and out of order (on moto and DynamoDB Local)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import time_machine

from user_credits.store.models import LedgerRecord

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

PAGES = {"successUrl": "https://shop.example/done", "cancelUrl": "https://shop.example/cart"}


def checkout(shop: Shop, user: str, offer_id: str, key: str | None = None, **fields: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return shop.service.call("POST", "/checkout", {"offerId": offer_id, **PAGES, **fields}, user=user,
                             headers=headers)


def started(shop: Shop, user: str, offer_id: str, **fields: Any) -> dict[str, Any]:
    reply = checkout(shop, user, offer_id, **fields)
    assert reply.status == 201, reply.body
    body: dict[str, Any] = reply.body
    return body


def deliver_all(shop: Shop, events: list[dict[str, Any]]) -> None:
    for event in events:
        reply = shop.deliver(event)
        assert reply.status == 200, (event["type"], reply.body)


def subscriptions(shop: Shop, user: str) -> list[dict[str, Any]]:
    reply = shop.service.call("GET", "/subscriptions", user=user)
    assert reply.status == 200, reply.body
    found: list[dict[str, Any]] = reply.body["subscriptions"]
    return found


def lots(shop: Shop, user: str, group: str) -> list[dict[str, Any]]:
    groups = shop.service.call("GET", "/credits", user=user).body["groups"]
    return next((g["lots"] for g in groups if g["offerGroup"] == group), [])


def entries(user: str) -> list[tuple[int, str, str | None]]:
    records = sorted(LedgerRecord.query(user, consistent_read=True), key=lambda r: (r.offerGroup, int(r.seq)))
    return [(int(r.delta), r.reason, r.subscriptionId) for r in records]


def plan(shop: Shop, group: str | None = None, **fields: Any) -> tuple[str, str]:
    return shop.offer(group=group, tokens=1000, cycle="monthly", prices={"usd": 2000}, billing="recurring",
                      kind="subscription", **fields)


def test_checkout_of_a_plan_creates_one_customer_and_a_subscription_session(shop: Shop, ids: Any) -> None:
    offer_id, _ = plan(shop)
    user = ids("u")
    first = started(shop, user, offer_id)
    session = shop.fake.session(first["sessionId"])
    assert session["mode"] == "subscription" and session["url"] == first["url"]
    assert session["metadata"]["orderId"] == first["orderId"] and session["metadata"]["userId"] == user
    params = next(p for m, path, p in shop.fake.request_params if m == "POST" and path == "/v1/checkout/sessions"
                  and p.get("metadata", {}).get("orderId") == first["orderId"])
    price = params["line_items"]["0"]["price_data"]
    assert price["recurring"] == {"interval": "month", "interval_count": "1"}
    assert (price["unit_amount"], price["currency"]) == ("2000", "usd")
    customer = shop.fake.customer(session["customer"])
    assert customer["metadata"] == {"userId": user}
    order = shop.service.call("GET", f"/orders/{first['orderId']}", user=user).body["order"]
    assert order["status"] == "pending" and order["amount"] == 2000
    second = started(shop, user, shop.offer(tokens=5, cycle="once", prices={"usd": 300})[0])
    assert shop.fake.session(second["sessionId"])["customer"] == session["customer"]
    creates = [p for m, path, p in shop.fake.request_params if m == "POST" and path == "/v1/customers"
               and p.get("metadata", {}).get("userId") == user]
    assert len(creates) == 1


def test_cycles_map_to_stripe_intervals(shop: Shop, ids: Any) -> None:
    user = ids("u")
    for cycle, expected in (("bi-weekly", ("week", "2")), ("trimester", ("month", "3")),
                            ("semester", ("month", "6")), ("yearly", ("year", "1")), ("daily", ("day", "1"))):
        offer_id, _ = shop.offer(cycle=cycle, billing="recurring", prices={"usd": 100})
        order_id = started(shop, user, offer_id)["orderId"]
        params = next(p for m, path, p in shop.fake.request_params if path == "/v1/checkout/sessions"
                      and p.get("metadata", {}).get("orderId") == order_id)
        recurring = params["line_items"]["0"]["price_data"]["recurring"]
        assert (recurring["interval"], recurring["interval_count"]) == expected, cycle


def test_each_paid_invoice_is_a_lot_to_its_period_end_and_a_top_up_outlives_it(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, group = plan(shop)
    top_up, _ = shop.offer(group=group, tokens=50, cycle="once", prices={"usd": 500})
    begun = started(shop, user, offer_id)
    deliver_all(shop, shop.fake.complete_session(begun["sessionId"]))
    [subscription] = subscriptions(shop, user)
    period_end = datetime.fromisoformat(subscription["currentPeriodEnd"].replace("Z", "+00:00"))
    assert subscription["status"] == "active" and subscription["offerGroup"] == group
    assert subscription["quantity"] == 1 and subscription["cancelAtPeriodEnd"] is False
    [lot] = lots(shop, user, group)
    assert (lot["source"], lot["remaining"], lot["subscriptionId"]) == ("subscription", 1000,
                                                                        subscription["subscriptionId"])
    assert lot["expiresAt"] == subscription["currentPeriodEnd"]
    shop.bought(user, top_up)
    assert shop.service.call("GET", f"/orders/{begun['orderId']}", user=user).body["order"]["status"] == "paid"
    deliver_all(shop, shop.fake.renew(subscription["subscriptionId"]))
    assert [lot["granted"] for lot in lots(shop, user, group)] == [1000, 1000, 50]
    sub_id = subscription["subscriptionId"]
    assert [(d, r) for d, r, s in entries(user) if s == sub_id] == [(1000, "purchase"), (1000, "renewal")]
    with time_machine.travel(period_end + timedelta(minutes=1), tick=True):
        remaining = lots(shop, user, group)
        assert [(lot["source"], lot["remaining"]) for lot in remaining] == [("subscription", 1000), ("order", 50)]
    shop.assert_ledger_explains_balances(user, [group])


def test_an_invoice_credits_once_whatever_the_order_and_the_duplicates(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, group = plan(shop)
    events = shop.fake.complete_session(started(shop, user, offer_id)["sessionId"])
    shuffled = events * 2
    random.Random(7).shuffle(shuffled)
    deliver_all(shop, shuffled)
    assert [lot["granted"] for lot in lots(shop, user, group)] == [1000]
    [subscription] = subscriptions(shop, user)
    assert subscription["status"] == "active"
    renewal = shop.fake.renew(subscription["subscriptionId"])
    deliver_all(shop, list(reversed(renewal)) + renewal)
    assert [lot["granted"] for lot in lots(shop, user, group)] == [1000, 1000]
    shop.assert_ledger_explains_balances(user, [group])


def test_concurrent_deliveries_of_one_invoice_credit_it_once(local_shop: Shop, ids: Any) -> None:
    shop = local_shop
    user = ids("u")
    offer_id, group = plan(shop)
    events = shop.fake.complete_session(started(shop, user, offer_id)["sessionId"])
    paid = next(e for e in events if e["type"] == "invoice.paid")
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: shop.deliver(paid), range(4)))
    assert all(r.status in (200, 503) for r in replies), [r.body for r in replies]
    deliver_all(shop, [paid])
    assert [lot["granted"] for lot in lots(shop, user, group)] == [1000]
    shop.assert_ledger_explains_balances(user, [group])


def test_a_failed_renewal_is_past_due_with_its_event_and_a_cancellation_stops_renewals(
        shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, group = plan(shop)
    deliver_all(shop, shop.fake.complete_session(started(shop, user, offer_id)["sessionId"]))
    [subscription] = subscriptions(shop, user)
    sub_id = subscription["subscriptionId"]
    deliver_all(shop, shop.fake.fail_renewal(sub_id))
    assert subscriptions(shop, user)[0]["status"] == "past_due"
    [failed] = [e for e in shop.service.events.of_type("SubscriptionPaymentFailed") if e["userId"] == user]
    assert failed["subscriptionId"] == sub_id and failed["offerGroup"] == group and failed["balance"] == 1000
    deliver_all(shop, shop.fake.renew(sub_id))  # the retry of the open invoice succeeds
    assert subscriptions(shop, user)[0]["status"] == "active"
    assert len(lots(shop, user, group)) == 2
    deliver_all(shop, shop.fake.cancel(sub_id, at_period_end=True))
    assert subscriptions(shop, user)[0]["cancelAtPeriodEnd"] is True
    deliver_all(shop, shop.fake.renew(sub_id))  # the period ends: Stripe deletes it, no invoice
    assert subscriptions(shop, user)[0]["status"] == "canceled"
    [canceled] = [e for e in shop.service.events.of_type("SubscriptionCanceled") if e["userId"] == user]
    assert canceled["subscriptionId"] == sub_id
    assert len(lots(shop, user, group)) == 2
    shop.assert_ledger_explains_balances(user, [group])


def test_a_late_invoice_of_a_canceled_subscription_credits_nothing(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, group = plan(shop)
    deliver_all(shop, shop.fake.complete_session(started(shop, user, offer_id)["sessionId"]))
    sub_id = subscriptions(shop, user)[0]["subscriptionId"]
    renewal = shop.fake.renew(sub_id)
    deliver_all(shop, shop.fake.cancel(sub_id))
    deliver_all(shop, renewal)  # arrives after the cancellation
    assert len(lots(shop, user, group)) == 1
    assert subscriptions(shop, user)[0]["status"] == "canceled"


def test_an_older_subscription_event_changes_nothing(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, _ = plan(shop)
    events = shop.fake.complete_session(started(shop, user, offer_id)["sessionId"])
    deliver_all(shop, events)
    sub_id = subscriptions(shop, user)[0]["subscriptionId"]
    failing = shop.fake.fail_renewal(sub_id)
    deliver_all(shop, failing)
    created = next(e for e in events if e["type"] == "customer.subscription.created")
    # An `active` from a minute before the failure (the fake's clock does not move: events of one test
    # share a second), delivered after it: older, so it changes nothing.
    stale = {**created, "id": "evt_stale_update", "type": "customer.subscription.updated",
             "created": failing[0]["created"] - 60}
    deliver_all(shop, [stale])
    assert subscriptions(shop, user)[0]["status"] == "past_due"


def test_a_one_time_checkout_is_credited_once_and_only_for_our_session(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, group = shop.offer(tokens=50, cycle="once", prices={"usd": 500})
    begun = started(shop, user, offer_id)
    assert shop.fake.session(begun["sessionId"])["mode"] == "payment"
    events = shop.fake.complete_session(begun["sessionId"])
    completed = next(e for e in events if e["type"] == "checkout.session.completed")
    foreign = {**completed, "id": "evt_foreign", "data": {"object": {**completed["data"]["object"],
                                                                     "id": "cs_test_not_ours"}}}
    deliver_all(shop, [foreign])
    assert lots(shop, user, group) == []
    deliver_all(shop, events + events)
    order = shop.service.call("GET", f"/orders/{begun['orderId']}", user=user).body["order"]
    assert order["status"] == "paid" and [lot["granted"] for lot in lots(shop, user, group)] == [50]
    shop.assert_ledger_explains_balances(user, [group])


def test_a_one_time_checkout_of_another_amount_is_inconsistent(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, group = shop.offer(tokens=50, cycle="once", prices={"usd": 500})
    begun = started(shop, user, offer_id)
    events = shop.fake.complete_session(begun["sessionId"])
    completed = next(e for e in events if e["type"] == "checkout.session.completed")
    altered = {**completed, "data": {"object": {**completed["data"]["object"], "amount_total": 1}}}
    deliver_all(shop, [altered])
    order = shop.service.call("GET", f"/orders/{begun['orderId']}", user=user).body["order"]
    assert order["status"] == "inconsistent" and lots(shop, user, group) == []


def test_the_portal_needs_a_customer_and_uses_the_users_own(shop: Shop, ids: Any) -> None:
    user = ids("u")
    missing = shop.service.call("POST", "/billing-portal", {"returnUrl": "https://shop.example/me"}, user=user)
    assert missing.status == 404 and missing.error == "customer_not_found"
    begun = started(shop, user, plan(shop)[0])
    portal = shop.service.call("POST", "/billing-portal", {"returnUrl": "https://shop.example/me"}, user=user)
    assert portal.status == 201 and portal.body["url"].startswith("http")
    params = [p for m, path, p in shop.fake.request_params if path == "/v1/billing_portal/sessions"]
    assert params[-1] == {"customer": shop.fake.session(begun["sessionId"])["customer"],
                          "return_url": "https://shop.example/me"}


def test_checkout_honours_the_idempotency_key_and_the_purchase_limit(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, _ = plan(shop, perUserLimit=1)
    first = checkout(shop, user, offer_id, key="buy-1")
    assert checkout(shop, user, offer_id, key="buy-1").body == first.body
    sessions = sum(1 for m, path, _ in shop.fake.request_params if path == "/v1/checkout/sessions")
    refused = checkout(shop, user, offer_id)
    assert refused.status == 409 and refused.error == "purchase_limit_reached"
    assert sum(1 for m, path, _ in shop.fake.request_params if path == "/v1/checkout/sessions") == sessions


def test_the_service_route_lists_a_users_subscriptions(shop: Shop, ids: Any) -> None:
    user = ids("u")
    deliver_all(shop, shop.fake.complete_session(started(shop, user, plan(shop)[0])["sessionId"]))
    reply = shop.service.call("GET", f"/users/{user}/subscriptions", iam=True)
    assert reply.status == 200 and reply.body["subscriptions"] == subscriptions(shop, user)
    assert datetime.fromisoformat(reply.body["subscriptions"][0]["currentPeriodEnd"].replace("Z", "+00:00")) > \
        datetime.now(UTC) + timedelta(days=27)


def test_an_abandoned_checkout_expires_and_no_longer_counts_against_the_limit(shop: Shop, ids: Any) -> None:
    user = ids("u")
    offer_id, _ = plan(shop, perUserLimit=1)
    begun = started(shop, user, offer_id)
    assert checkout(shop, user, offer_id).status == 409
    session = {**shop.fake.session(begun["sessionId"]), "status": "expired"}
    expired = {"id": f"evt_{ids('x')}", "object": "event", "api_version": "2025-09-30.clover",
               "created": int(datetime.now(UTC).timestamp()), "data": {"object": session}, "livemode": False,
               "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None},
               "type": "checkout.session.expired"}
    deliver_all(shop, [expired, expired])
    order = shop.service.call("GET", f"/orders/{begun['orderId']}", user=user).body["order"]
    assert order["status"] == "canceled"
    assert checkout(shop, user, offer_id).status == 201


def test_a_payment_failure_redelivered_days_later_is_still_a_duplicate(shop: Shop, ids: Any) -> None:
    """Stripe retries for three days, longer than an Idempotency-Key's day: the event's record lasts 4."""
    user = ids("u")
    deliver_all(shop, shop.fake.complete_session(started(shop, user, plan(shop)[0])["sessionId"]))
    failed = next(e for e in shop.fake.fail_renewal(subscriptions(shop, user)[0]["subscriptionId"])
                  if e["type"] == "invoice.payment_failed")
    deliver_all(shop, [failed])
    with time_machine.travel(datetime.now(UTC) + timedelta(days=3), tick=True):
        deliver_all(shop, [{**failed}])  # a redelivery (the signature is made now)
    assert len([e for e in shop.service.events.of_type("SubscriptionPaymentFailed") if e["userId"] == user]) == 1
