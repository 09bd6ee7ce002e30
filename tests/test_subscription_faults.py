"""SPEC 2.8 and 2.10 when the function dies, on DynamoDB Local: the webhook killed before or after each
DynamoDB call of `invoice.paid` (the first invoice and a renewal), `invoice.payment_failed`,
`customer.subscription.deleted` and `checkout.session.completed` (payment mode), then the same event
delivered again as Stripe redelivers a non-2xx (later, after the other events of the moment, and more
than once): one lot per invoice, the ledger explains the balance, the subscription's status is right,
SubscriptionPaymentFailed and SubscriptionCanceled are sent once. And POST /checkout killed at each of
its DynamoDB calls, and at its Stripe calls (Stripe refusing, or dying once Stripe has answered), then
retried with its Idempotency-Key: one order, one Checkout Session, one Customer.

The crash (conftest `crash`) is raised from a botocore hook: `before` the call is sent, or `after`
DynamoDB applied it and before the function saw the answer. The stream function's calls are left alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import time_machine
from conftest import Backend, EventRecorder, Service, SimulatedCrash
from test_subscriptions import lots, subscriptions

from user_credits.payments import gateway
from user_credits.store.models import LedgerRecord
from user_credits.store.orders import list_orders
from user_credits.store.subscriptions import read_customer
from user_credits_dev import template as tpl

if TYPE_CHECKING:
    from conftest import CrashPlan
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

pytestmark = pytest.mark.ddblocal

PAGES = {"successUrl": "https://shop.example/done", "cancelUrl": "https://shop.example/cart"}
RETRIES = 3


# ---------------------------------------------------------------- helpers


def checkout(shop: Shop, user: str, offer_id: str, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return shop.service.call("POST", "/checkout", {"offerId": offer_id, **PAGES}, user=user, headers=headers)


def deliver_all(shop: Shop, events: list[dict[str, Any]]) -> None:
    for event in events:
        reply = shop.deliver(event)
        assert reply.status == 200, (event["type"], reply.body)


def plan(shop: Shop, **fields: Any) -> tuple[str, str]:
    return shop.offer(tokens=1000, cycle="monthly", prices={"usd": 2000}, billing="recurring", kind="subscription",
                      **fields)




def entries(user: str) -> list[tuple[int, str]]:
    records = sorted(LedgerRecord.query(user, consistent_read=True), key=lambda r: (r.offerGroup, int(r.seq)))
    return [(int(r.delta), r.reason) for r in records]


def sent(shop: Shop, detail_type: str, user: str) -> list[dict[str, Any]]:
    return [e for e in shop.service.events.of_type(detail_type) if e["userId"] == user]


def iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def of_type(events: list[dict[str, Any]], event_type: str) -> dict[str, Any]:
    [found] = [e for e in events if e["type"] == event_type]
    return found


# ---------------------------------------------------------------- the webhook's cases


@dataclass
class Case:
    """A delivery to kill (`target`), what Stripe delivers after it (`after`), and what must then hold."""

    shop: Shop
    user: str
    group: str
    target: dict[str, Any]
    after: list[dict[str, Any]]
    check: Callable[[Case], None]

    def redeliver(self) -> None:
        deliver_all(self.shop, self.after)


def later(target: dict[str, Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stripe's retry of a failed delivery comes minutes later, after the other events of that moment;
    and it may come twice."""
    return [*(e for e in events if e is not target), target, target]


def subscribed(shop: Shop, ids: Any) -> tuple[str, str, str, list[dict[str, Any]]]:
    """A user whose monthly plan is checked out (not yet delivered): user, group, order id, its events."""
    user = ids("u")
    offer_id, group = plan(shop)
    reply = checkout(shop, user, offer_id)
    assert reply.status == 201, reply.body
    return user, group, reply.body["orderId"], shop.fake.complete_session(reply.body["sessionId"])


def running(shop: Shop, ids: Any) -> tuple[str, str, str]:
    """A user whose plan's first invoice is credited: user, group, subscription id."""
    user, group, _, events = subscribed(shop, ids)
    deliver_all(shop, events)
    [subscription] = subscriptions(shop, user)
    return user, group, subscription["subscriptionId"]


def assert_credited(case: Case, reasons: list[str]) -> None:
    shop, user, group = case.shop, case.user, case.group
    assert [lot["granted"] for lot in lots(shop, user, group)] == [1000] * len(reasons)
    assert entries(user) == [(1000, reason) for reason in reasons]
    assert len(sent(shop, "CreditsGranted", user)) == len(reasons)
    shop.assert_ledger_explains_balances(user, [group])


def first_invoice(shop: Shop, ids: Any) -> Case:
    user, group, order_id, events = subscribed(shop, ids)
    paid = of_type(events, "invoice.paid")

    def check(case: Case) -> None:
        assert_credited(case, ["purchase"])
        [subscription] = subscriptions(shop, user)
        assert subscription["status"] == "active"
        [lot] = lots(shop, user, group)
        assert lot["expiresAt"] == subscription["currentPeriodEnd"] == iso(
            paid["data"]["object"]["lines"]["data"][0]["period"]["end"])
        assert shop.status(user, order_id) == "paid"

    return Case(shop, user, group, paid, later(paid, events), check)


def renewal(shop: Shop, ids: Any) -> Case:
    user, group, sub_id = running(shop, ids)
    events = shop.fake.renew(sub_id)
    paid = of_type(events, "invoice.paid")
    period_end = paid["data"]["object"]["lines"]["data"][0]["period"]["end"]

    def check(case: Case) -> None:
        assert_credited(case, ["purchase", "renewal"])
        [subscription] = subscriptions(shop, user)
        assert subscription["status"] == "active" and subscription["currentPeriodEnd"] == iso(period_end)
        assert lots(shop, user, group)[-1]["expiresAt"] == iso(period_end)

    return Case(shop, user, group, paid, later(paid, events), check)


def payment_failed(shop: Shop, ids: Any) -> Case:
    """The failure is redelivered before the past_due update of the same moment: in the other order the
    event is lost (`test_a_payment_failure_delivered_after_its_past_due_update_still_sends_its_event`)."""
    user, group, sub_id = running(shop, ids)
    events = shop.fake.fail_renewal(sub_id)
    failed = of_type(events, "invoice.payment_failed")

    def check(case: Case) -> None:
        assert_credited(case, ["purchase"])
        assert subscriptions(shop, user)[0]["status"] == "past_due"
        [event] = sent(shop, "SubscriptionPaymentFailed", user)
        assert event["subscriptionId"] == sub_id and event["status"] == "past_due" and event["balance"] == 1000

    return Case(shop, user, group, failed, [failed, *events], check)


def deleted(shop: Shop, ids: Any) -> Case:
    """Canceled at the period end: the cancellation's update is delivered after the crashed deletion."""
    user, group, sub_id = running(shop, ids)
    update = shop.fake.cancel(sub_id, at_period_end=True)
    [gone] = shop.fake.renew(sub_id)
    assert gone["type"] == "customer.subscription.deleted"

    def check(case: Case) -> None:
        assert_credited(case, ["purchase"])
        [subscription] = subscriptions(shop, user)
        assert subscription["status"] == "canceled" and subscription["cancelAtPeriodEnd"] is True
        [event] = sent(shop, "SubscriptionCanceled", user)
        assert event["subscriptionId"] == sub_id and event["status"] == "canceled"

    return Case(shop, user, group, gone, later(gone, [*update, gone]), check)


def checkout_completed(shop: Shop, ids: Any) -> Case:
    """A one-time offer paid on a Checkout page: `checkout.session.completed`, `payment_intent.succeeded`."""
    user = ids("u")
    offer_id, group = shop.offer(tokens=50, cycle="once", prices={"usd": 500})
    reply = checkout(shop, user, offer_id)
    assert reply.status == 201, reply.body
    order_id = reply.body["orderId"]
    events = shop.fake.complete_session(reply.body["sessionId"])
    completed = of_type(events, "checkout.session.completed")

    def check(case: Case) -> None:
        assert shop.status(user, order_id) == "paid"
        assert [lot["granted"] for lot in lots(shop, user, group)] == [50]
        assert entries(user) == [(50, "purchase")]
        assert len(sent(shop, "CreditsGranted", user)) == 1
        shop.assert_ledger_explains_balances(user, [group])

    return Case(shop, user, group, completed, later(completed, events), check)


CASES: dict[str, Callable[[Shop, Any], Case]] = {
    "first_invoice": first_invoice, "renewal": renewal, "payment_failed": payment_failed, "deleted": deleted,
    "checkout_completed": checkout_completed,
}
# The DynamoDB calls of one clean delivery of each target (test_the_webhook_makes_the_calls_the_fault_tests_cover).
CALLS = {
    # GetItem of the order, of the invoice's record, of the subscription; the group; the transaction.
    "first_invoice": 5, "renewal": 5,
    # GetItem of the order, of the event's record (a failure is sent once per Stripe event), of the
    # subscription; the group (for the event's balance); the transaction.
    "payment_failed": 5,
    # GetItem of the order, of the subscription; the group (for the event's balance); the transaction.
    "deleted": 4,
    # GetItem of the order (is the session ours?), again (apply_to_order); the group; the transaction.
    "checkout_completed": 4,
}


# Killed before call k leaves DynamoDB as killed after call k - 1 does, when nothing but DynamoDB is
# called in between (the webhook's paths call no one else; their events go out through the stream): so
# `before` is the first call only, `after` every call.
def kills(calls: int) -> list[tuple[str, int]]:
    return [("before", 1), *(("after", at) for at in range(1, calls + 1))]


@pytest.mark.parametrize("name", CASES)
def test_the_webhook_makes_the_calls_the_fault_tests_cover(
    local_shop: Shop, crash: CrashPlan, ids: Any, name: str,
) -> None:
    case = CASES[name](local_shop, ids)
    crash.count_calls()
    assert local_shop.deliver(case.target).status == 200
    assert crash.calls == CALLS[name]


@pytest.mark.parametrize(("name", "phase", "at_call"), [
    (name, phase, at) for name, calls in CALLS.items() for phase, at in kills(calls)])
def test_a_webhook_killed_at_any_dynamodb_call_then_redelivered_has_its_effect_once(
    local_shop: Shop, crash: CrashPlan, ids: Any, name: str, phase: str, at_call: int,
) -> None:
    case = CASES[name](local_shop, ids)
    crash.arm(phase, at_call)
    # A 500 (or the function's death): Stripe sees a non-2xx and redelivers.
    crash.expect_crash(lambda: local_shop.deliver(case.target))
    crash.disarm()
    case.redeliver()
    case.check(case)


# ---------------------------------------------------------------- POST /checkout

# A keyed checkout of an offer with a perUserLimit, the user's first: GetItem of the key's record, of the
# offer; Query of the orders (what is unlocked); GetItem of the limit's lock, Query of the orders (the
# limit); GetItem of the customer, [Stripe: the Customer], PutItem of the customer, [Stripe: the Checkout
# Session], the transaction (order, lock, key's record).
CHECKOUT_CALLS = 8


def retried(shop: Shop, user: str, offer_id: str, key: str) -> Any:
    """The client resends with its key until it gets an answer that is not a 5xx."""
    for _ in range(RETRIES):
        reply = checkout(shop, user, offer_id, key)
        if reply.status < 500:
            return reply
    return reply


def assert_one_checkout(shop: Shop, user: str, offer_id: str, key: str, reply: Any, *, pay: bool = False) -> None:
    """One order, one Checkout Session, one Customer; the same answer again; with `pay`, the page pays it."""
    assert reply.status == 201, reply.body
    assert checkout(shop, user, offer_id, key).body == reply.body
    [order] = list_orders(user, consistent=True)
    assert (order.order_id, order.status) == (reply.body["orderId"], "pending")
    assert shop.order_record(user, order.order_id).sessionId == reply.body["sessionId"]
    mine = [s for s in shop.fake.sessions.values() if s["metadata"].get("userId") == user]
    assert [s["id"] for s in mine] == [reply.body["sessionId"]]
    customers = [c["id"] for c in shop.fake.customers.values() if c["metadata"].get("userId") == user]
    assert customers == [mine[0]["customer"]] == [read_customer(user)]
    # Every attempt asked Stripe with the order's id as idempotency key and the same parameters.
    asked = [(headers.get("idempotency-key"), params) for (_, path, headers), (_, _, params)
             in zip(shop.fake.requests, shop.fake.request_params, strict=True)
             if path == "/v1/checkout/sessions" and params.get("metadata", {}).get("userId") == user]
    assert asked and all(one == (order.order_id, asked[0][1]) for one in asked), asked
    if not pay:
        return
    deliver_all(shop, shop.fake.complete_session(reply.body["sessionId"]))
    assert [lot["granted"] for lot in lots(shop, user, order.offer_group)] == [1000]
    assert shop.status(user, order.order_id) == "paid"


def test_a_checkout_makes_the_calls_the_fault_tests_cover(local_shop: Shop, crash: CrashPlan, ids: Any) -> None:
    offer_id, _ = plan(local_shop, perUserLimit=1)
    user, key = ids("u"), ids("k")
    crash.count_calls()
    reply = checkout(local_shop, user, offer_id, key)
    assert crash.calls == CHECKOUT_CALLS
    crash.disarm()
    assert_one_checkout(local_shop, user, offer_id, key, reply, pay=True)


@pytest.mark.parametrize(("phase", "at_call"), kills(CHECKOUT_CALLS))
def test_a_checkout_killed_at_any_dynamodb_call_then_retried_with_its_key_happens_once(
    local_shop: Shop, crash: CrashPlan, ids: Any, phase: str, at_call: int,
) -> None:
    """`before` a call that follows a Stripe call is Stripe's `died_after` below."""
    offer_id, _ = plan(local_shop, perUserLimit=1)
    user, key = ids("u"), ids("k")
    crash.arm(phase, at_call)
    crash.expect_crash(lambda: checkout(local_shop, user, offer_id, key))
    crash.disarm()
    assert_one_checkout(local_shop, user, offer_id, key, retried(local_shop, user, offer_id, key))


@pytest.mark.parametrize("fault", ["refused", "died_after"])
@pytest.mark.parametrize("call", ["create_customer", "create_checkout_session"])
def test_a_checkout_whose_stripe_call_fails_then_retried_with_its_key_happens_once(
    local_shop: Shop, ids: Any, monkeypatch: pytest.MonkeyPatch, call: str, fault: str,
) -> None:
    """`refused`: Stripe answers 500 (nothing created; the SDK does not retry what Stripe says not to),
    the client gets a 502. `died_after`: Stripe created the object, the function died before using it
    (a timeout, a kill): the retry must get that same object, not a second one."""
    shop = local_shop
    offer_id, _ = plan(shop, perUserLimit=1)
    user, key = ids("u"), ids("k")
    real = getattr(gateway, call)
    fired = []

    def failing(**kwargs: Any) -> Any:
        if fired:
            return real(**kwargs)
        fired.append(call)
        if fault == "refused":
            shop.fake.fail_next(500)
            return real(**kwargs)
        real(**kwargs)
        raise SimulatedCrash(f"killed after Stripe answered {call}")

    monkeypatch.setattr(gateway, call, failing)
    try:
        first = checkout(shop, user, offer_id, key)
    except SimulatedCrash:
        first = None
    assert fired == [call]
    if fault == "refused":
        assert first is not None and (first.status, first.error) == (502, "payment_provider_error"), first
        assert list_orders(user, consistent=True) == []
    else:
        assert first is None or first.status == 500, first
    assert_one_checkout(shop, user, offer_id, key, retried(shop, user, offer_id, key))


# ---------------------------------------------------------------- found by these tests (mended in f8166a6)


@pytest.mark.parametrize("how", ["out_of_order", "retried_after_a_crash"])
def test_a_payment_failure_delivered_after_its_past_due_update_still_sends_its_event(
    local_shop: Shop, crash: CrashPlan, ids: Any, how: str,
) -> None:
    """SPEC 2.10: `invoice.payment_failed` -> past_due AND a SubscriptionPaymentFailed event. Stripe sends
    `customer.subscription.updated` (status past_due) at the same moment, in no promised order; and a
    failure whose delivery got a 500 is redelivered minutes later, after that update. Either way the
    update lands first, and the failure then finds the subscription as it would leave it (same status,
    same `statusAt`, both events sharing their `created` second; or, an update a second later, newer):
    judged by the subscription's state it looked like a duplicate (or stale), and nothing was sent. It
    is now judged by its own event's record."""
    shop = local_shop
    user, _, sub_id = running(shop, ids)
    events = shop.fake.fail_renewal(sub_id)
    failed = of_type(events, "invoice.payment_failed")
    update = of_type(events, "customer.subscription.updated")
    if how == "retried_after_a_crash":
        crash.arm("before", CALLS["payment_failed"])  # dies before its transaction: nothing written
        crash.expect_crash(lambda: shop.deliver(failed))
        crash.disarm()
    deliver_all(shop, [update, failed, failed])
    assert subscriptions(shop, user)[0]["status"] == "past_due"
    assert len(sent(shop, "SubscriptionPaymentFailed", user)) == 1


@pytest.mark.parametrize("first", ["payment_intent", "checkout_session"])
def test_a_one_time_checkout_paid_is_refundable_whichever_of_its_two_events_comes_first(
    local_shop: Shop, ids: Any, first: str,
) -> None:
    """SPEC 2.10: `checkout.session.completed` credits like `payment_intent.succeeded`; SPEC 2.4: a
    `charge.refunded` then revokes. A charge names only its PaymentIntent (no metadata), so the refund
    finds the order through its `paymentIntentId` (the byPaymentIntent index). With the session's event
    applied first, the order did not record it (`session_received` did not read the session's
    `payment_intent`), the PaymentIntent's own event then found the order paid (a duplicate, nothing
    written): the refund was `ignored_no_order`, and the tokens stayed."""
    from user_credits_dev.stripe_fake import charge_refunded_event

    shop = local_shop
    user = ids("u")
    offer_id, group = shop.offer(tokens=50, cycle="once", prices={"usd": 500})
    reply = checkout(shop, user, offer_id)
    events = shop.fake.complete_session(reply.body["sessionId"])
    completed = of_type(events, "checkout.session.completed")
    succeeded = of_type(events, "payment_intent.succeeded")
    deliver_all(shop, [completed, succeeded] if first == "checkout_session" else [succeeded, completed])
    assert shop.group(user, group).balance == 50
    intent = shop.fake.intent(completed["data"]["object"]["payment_intent"])
    deliver_all(shop, [charge_refunded_event(intent, 500)])
    assert (shop.status(user, reply.body["orderId"]), shop.group(user, group).balance) == ("refunded", 0)
    assert shop.order_record(user, reply.body["orderId"]).paymentIntentId == intent["id"]


@pytest.fixture
def sweep_shop(ddblocal_backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder, stripe_fake: Any,
               ids: Any) -> Iterator[Shop]:
    """Tables of its own: the sweep's stored position is table-wide (and this test moves the clock on)."""
    from stripe_fixtures import API_KEY, WEBHOOK_SECRET, Shop

    client = ddblocal_backend.client()
    tables = tpl.create_tables(client, f"subsweep-{uuid.uuid4().hex[:8]}")
    service = Service(Backend("ddblocal", ddblocal_backend.endpoint, tables), monkeypatch, events)
    for key, value in (("STRIPE_API_BASE", stripe_fake.base_url), ("STRIPE_API_KEY", API_KEY),
                       ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)):
        service.setenv(key, value)
    yield Shop(service, stripe_fake, ids)
    for name in tables.values():
        client.delete_table(TableName=name)


def test_a_lot_credited_after_its_period_ended_is_expired_by_the_next_sweep(sweep_shop: Shop, ids: Any) -> None:
    """SPEC 2.6: every lot whose expiresAt <= now with remaining > 0 goes to 0 with an `expire` entry
    (and a CreditsExpired event). A daily plan's first `invoice.paid` got a 500 and Stripe's retry lands
    an hour after the period it pays ended (Stripe retries for three days): the lot is credited already
    expired. Its group's due-index entry (`nextExp`, its expiresAt) sorts before the position the sweep
    stored on its last run (`store.expiry`: a run reads only from that position to now), so no sweep
    would ever expire it (no `expire` entry, no CreditsExpired until another write touched the group):
    the credit expires it at once."""
    shop = sweep_shop
    user = ids("u")
    offer_id, group = shop.offer(tokens=10, cycle="daily", prices={"usd": 100}, billing="recurring",
                                 kind="subscription")
    reply = checkout(shop, user, offer_id)
    assert reply.status == 201, reply.body
    events = shop.fake.complete_session(reply.body["sessionId"])
    invoice = of_type(events, "invoice.paid")["data"]["object"]
    ends = datetime.fromtimestamp(invoice["lines"]["data"][0]["period"]["end"], UTC)
    with time_machine.travel(ends + timedelta(hours=1), tick=True):
        shop.service.invoke_schedule()  # the scheduled sweep has run past the period's end
        deliver_all(shop, events)  # Stripe's retry of the first invoice: its lot expires at once
        assert entries(user) == [(10, "purchase"), (-10, "expire")]
        shop.service.invoke_schedule()
        expired = [(int(e.delta), e.lotId) for e in shop.ledger(user, group) if e.reason == "expire"]
        assert expired == [(-10, invoice["id"])]
        assert len(sent(shop, "CreditsExpired", user)) == 1
