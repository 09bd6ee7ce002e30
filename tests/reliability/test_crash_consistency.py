"""SPEC 2.8 and 2.6 on DynamoDB Local: the expiry sweep and order creation fail at every DynamoDB call
(killed, TransactionCanceled, throttled; before the call or after DynamoDB applied it), the caller
retries as it would (the scheduler runs the sweep again, a client resends), and nothing is lost or
applied twice: balance == sum of the ledger, one `expire` entry per expiry, orders agree with the ledger.

Webhook, refund, keyed-order (killed after a call), consume and grant crashes are covered by
tests/test_purchase_exactly_once.py, tests/test_consume_faults.py and tests/test_grants.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import time_machine
from conftest import Backend, EventRecorder, Service
from crash_faults import KINDS, PHASES, Died, Fault, dynamodb_faults

from user_credits.domain.clock import to_iso
from user_credits.local import template as tpl
from user_credits.logic.invariants import check_user
from user_credits.store.balances import read_group
from user_credits.store.models import LedgerRecord
from user_credits.store.orders import list_orders

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

pytestmark = pytest.mark.ddblocal

T0 = datetime(2032, 5, 3, 9, 0, 0, tzinfo=UTC)
# A run that makes fewer calls than this would not be exercising the sweep at all.
MIN_SWEEP_CALLS = 6
RETRIES = 5


def assert_balanced(*users: str) -> None:
    for user in users:
        report = check_user(user)
        assert report.ok, (user, report.mismatches)


def entries(user: str, group: str, reason: str) -> list[LedgerRecord]:
    return [r for r in LedgerRecord.query(user, consistent_read=True) if r.offerGroup == group and r.reason == reason]


# ---------------------------------------------------------------- the sweep


@pytest.fixture
def sweep_service(
    ddblocal_backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder
) -> Iterator[Service]:
    """Tables of its own: the sweep's stored position and its expiry index are table-wide."""
    client = ddblocal_backend.client()
    tables = tpl.create_tables(client, f"crash-{uuid.uuid4().hex[:8]}")
    yield Service(Backend("ddblocal", ddblocal_backend.endpoint, tables), monkeypatch, events)
    for name in tables.values():
        client.delete_table(TableName=name)


def grant(service: Service, user: str, group: str, tokens: int, expires_at: datetime) -> None:
    body = {"offerGroup": group, "tokens": tokens, "expiresAt": to_iso(expires_at)}
    reply = service.call("POST", f"/admin/users/{user}/grants", body, iam=True)
    assert reply.status == 201, reply.body


def run_sweep(service: Service) -> Any:
    """The scheduler's view: a run either returns its summary or fails (and is run again later)."""
    try:
        return service.invoke_schedule()
    except (Died, Exception) as error:  # every failure is a failed invocation, to be run again
        return error


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", KINDS)
def test_a_sweep_failing_at_any_dynamodb_call_then_run_again_expires_each_group_exactly_once(
    sweep_service: Service, monkeypatch: pytest.MonkeyPatch, ids: Any, kind: str, phase: str
) -> None:
    service = sweep_service
    at = 1
    while True:
        base = T0 + timedelta(days=at)
        # Two due groups of two users, and one group of the first user that is not due.
        first, second, group, later = ids("u"), ids("u"), ids("g"), ids("g")
        with time_machine.travel(base, tick=True):
            grant(service, first, group, 40, base + timedelta(hours=1))
            grant(service, second, group, 25, base + timedelta(hours=1, minutes=5))
            grant(service, first, later, 7, base + timedelta(days=30))
        with dynamodb_faults(service, monkeypatch, kind, phase) as fault:
            fault.arm(at)
            with time_machine.travel(base + timedelta(hours=3), tick=True):
                failed = run_sweep(service)
            fired = fault.fired
            fault.arm(None)
            with time_machine.travel(base + timedelta(hours=3, minutes=1), tick=True):
                again = run_sweep(service)
                third = run_sweep(service)
        assert isinstance(again, dict) and again["complete"], (at, failed, again)
        assert isinstance(third, dict) and third["expired"] == 0, (at, third)
        for user, tokens in ((first, 40), (second, 25)):
            expired = entries(user, group, "expire")
            assert [(int(e.delta), int(e.balanceAfter)) for e in expired] == [(-tokens, 0)], (at, user, failed)
            assert read_group(user, group).balance == 0, at
            sent = [e for e in service.events.of_type("CreditsExpired") if e["userId"] == user]
            assert len(sent) <= 1, (at, sent)
        assert read_group(first, later).balance == 7 and entries(first, later, "expire") == [], at
        assert_balanced(first, second)
        if not fired:
            break  # this run made fewer than `at` calls: every call has failed once
        at += 1
    assert at > MIN_SWEEP_CALLS, at


# ---------------------------------------------------------------- order creation


def resend(shop: Shop, user: str, offer_id: str, key: str | None) -> Any:
    """A client resends until it gets an answer that is not a 5xx (503 means: retry shortly)."""
    for _ in range(RETRIES):
        reply = shop.order(user, offer_id, key=key)
        if reply.status < 500:
            return reply
    return reply


def attempt_order(shop: Shop, fault: Fault, at: int, user: str, offer_id: str, key: str | None) -> bool:
    """One request failing at DynamoDB call `at`; whether it made that many calls."""
    fault.arm(at)
    try:
        reply = shop.order(user, offer_id, key=key)
    except Died:
        reply = None
    fired = fault.fired
    fault.arm(None)
    # A failed call is never answered as a success the client could act on without a stored order.
    if reply is not None and reply.status == 201:
        stored = [o.order_id for o in list_orders(user)]
        assert reply.body["order"]["orderId"] in stored, (at, reply.body)
    elif reply is not None:
        assert reply.status in (500, 503) and reply.error, (at, reply.status, reply.body)
    return fired


def assert_orders_agree_with_stripe_and_ledger(shop: Shop, user: str, group: str, price: int) -> None:
    orders = list_orders(user)
    assert orders, user
    intents = [i for i in shop.fake.intents.values() if i["metadata"].get("userId") == user]
    by_order = {i["metadata"]["orderId"]: i for i in intents}
    for order in orders:
        if price:
            assert order.status == "pending", order
            intent = by_order[order.order_id]
            assert intent["id"] == order.payment_intent_id and intent["amount"] == order.amount == price
        else:
            assert order.status == "paid" and order.payment_intent_id is None, order
            purchase = [e for e in entries(user, group, "purchase") if e.orderId == order.order_id]
            assert [int(e.delta) for e in purchase] == [100], order
    # Free orders: every stored order credited once, and nothing credited without a stored order.
    paid = [o for o in orders if o.status == "paid"]
    assert read_group(user, group).balance == 100 * len(paid)
    assert len(entries(user, group, "purchase")) == len(paid)
    assert_balanced(user)


@pytest.mark.parametrize("price", [1000, 0], ids=["paid", "free"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", KINDS)
def test_an_unkeyed_order_failing_at_any_dynamodb_call_then_resent_leaves_consistent_orders(
    local_shop: Shop, monkeypatch: pytest.MonkeyPatch, ids: Any, kind: str, phase: str, price: int
) -> None:
    shop = local_shop
    offer_id, group = shop.offer(tokens=100, prices={"usd": price})
    with dynamodb_faults(shop.service, monkeypatch, kind, phase) as fault:
        at = 1
        while True:
            user = ids("u")
            fired = attempt_order(shop, fault, at, user, offer_id, None)
            reply = resend(shop, user, offer_id, None)
            assert reply.status == 201, (at, reply.body)
            # The failed attempt may have stored an order (it died after the write): at most one more.
            assert 1 <= len(list_orders(user)) <= 2, at
            assert_orders_agree_with_stripe_and_ledger(shop, user, group, price)
            if not fired:
                break
            at += 1
    assert at > 2, at


@pytest.mark.parametrize("price", [1000, 0], ids=["paid", "free"])
@pytest.mark.parametrize(("kind", "phase"), [(k, p) for k in KINDS for p in PHASES if (k, p) != ("died", "after")])
def test_a_keyed_order_failing_at_any_dynamodb_call_then_resent_with_its_key_happens_once(
    local_shop: Shop, monkeypatch: pytest.MonkeyPatch, ids: Any, kind: str, phase: str, price: int
) -> None:
    """Killed-after is in tests/test_purchase_exactly_once.py; these are the other failures."""
    shop = local_shop
    offer_id, group = shop.offer(tokens=100, prices={"usd": price})
    with dynamodb_faults(shop.service, monkeypatch, kind, phase) as fault:
        at = 1
        while True:
            user, key = ids("u"), ids("k")
            fired = attempt_order(shop, fault, at, user, offer_id, key)
            first = resend(shop, user, offer_id, key)
            again = shop.order(user, offer_id, key=key)
            assert first.status == again.status == 201 and first.body == again.body, (at, first.body, again.body)
            orders = list_orders(user)
            assert [o.order_id for o in orders] == [first.body["order"]["orderId"]], at
            if price:
                intents = [i for i in shop.fake.intents.values() if i["metadata"].get("userId") == user]
                assert [i["id"] for i in intents] == [orders[0].payment_intent_id], at
            assert_orders_agree_with_stripe_and_ledger(shop, user, group, price)
            if not fired:
                break
            at += 1
    assert at > 2, at
