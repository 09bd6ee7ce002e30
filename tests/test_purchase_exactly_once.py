"""SPEC 2.8 for purchases, on DynamoDB Local: concurrent deliveries from separate processes, and a
function that dies between any two of its DynamoDB calls and is retried, credit exactly once."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from conftest import dynamodb_hooks

from user_credits_dev.stripe_fake import payment_intent_event, signed_delivery

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

DELIVERIES = 5


def test_concurrent_duplicate_deliveries_from_separate_processes_credit_once(local_shop: Shop, ids: Any) -> None:
    from stripe_fixtures import WEBHOOK_SECRET, deliver_from_process

    shop = local_shop
    offer_id, group = shop.offer(tokens=100)
    user = ids("u")
    order = shop.placed(user, offer_id)
    payload, signature = signed_delivery(payment_intent_event(shop.intent(order)), WEBHOOK_SECRET)
    env = dict(os.environ)
    env["TEST_TABLES"] = json.dumps(shop.service.backend.tables)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(DELIVERIES)
    results = context.Queue()
    workers = [context.Process(target=deliver_from_process, args=(env, payload, signature, start, results))
               for _ in range(DELIVERIES)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert [status for status, *_ in outcomes] == [200] * DELIVERIES, outcomes
    # The one credit's write carries the one event; the stream sends it.
    shop.service.drain()
    assert len(shop.service.events.of_type("CreditsGranted")) == 1
    assert shop.status(user, order["orderId"]) == "paid"
    assert shop.group(user, group).balance == 100
    assert [(int(e.delta), e.reason) for e in shop.ledger(user)] == [(100, "purchase")]
    shop.assert_ledger_explains_balances(user, [group])


# ---------------------------------------------------------------- dying between DynamoDB calls


class Died(BaseException):
    """The Lambda was killed: a BaseException, so no `except Exception` in our code can swallow it."""


@dataclass
class Fault:
    """Counts DynamoDB calls and raises `Died` at call number `at` (before it is sent, or after it
    completed and before its answer is seen)."""

    phase: str = "after"
    at: int | None = None
    calls: int = 0

    def hook(self, **_: Any) -> None:
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            self.at = None
            raise Died(f"killed {self.phase} DynamoDB call {self.calls}")

    def arm(self, at: int | None) -> None:
        self.at, self.calls = at, 0


@contextmanager
def dynamodb_faults(shop: Shop, monkeypatch: pytest.MonkeyPatch, phase: str) -> Iterator[Fault]:
    """A `Fault` on every DynamoDB call (`before-call` / `after-call`) made inside the block."""
    fault = Fault(phase)
    with dynamodb_hooks(shop.service, {f"{phase}-call.dynamodb": fault.hook}):
        yield fault


def outcome(shop: Shop, user: str, order_id: str, groups: list[str]) -> dict[str, Any]:
    """What a delivery left, without the instants (two runs happen seconds apart)."""
    shop.assert_ledger_explains_balances(user, groups)
    record = shop.order_record(user, order_id)
    states = {g: shop.group(user, g) for g in groups}
    def named(lot_id: str | None) -> str | None:
        # Lots are named after their order: compare the names with the order's id taken out.
        return None if lot_id is None else lot_id.replace(order_id, "ORDER")

    credits = [{**c, "lots": [named(lot) for lot in c.get("lots", [])]} for c in record.credits or []]
    return {
        "status": record.status,
        "credits": credits,
        "revoked": int(record.revokedTokens),
        "refunded": int(record.amountRefunded),
        "balances": {g: (s.balance, s.seq, s.expires_at is None) for g, s in states.items()},
        "ledger": [(e.offerGroup, int(e.delta), int(e.balanceAfter), e.reason, e.orderId == order_id,
                    e.shortfall, named(e.lotId)) for e in shop.ledger(user)],
    }


def bundle(shop: Shop) -> tuple[str, list[str]]:
    item_id, item_group = shop.offer(tokens=10, cycle="weekly", prices={"usd": 100})
    offer_id, main_group = shop.offer(
        tokens=100, cycle="monthly", appendDate=True,
        combinedItems=[{"offerId": item_id, "offerGroup": item_group, "quantity": 2}],
    )
    return offer_id, [main_group, item_group]


@pytest.mark.parametrize("phase", ["before", "after"])
def test_a_webhook_killed_between_any_two_dynamodb_calls_then_redelivered_credits_once(
    local_shop: Shop, ids: Any, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    shop = local_shop
    offer_id, groups = bundle(shop)
    with dynamodb_faults(shop, monkeypatch, phase) as fault:
        reference_user = ids("u")
        reference_order = shop.placed(reference_user, offer_id)
        fault.arm(None)
        assert shop.pay(reference_order).status == 200
        clean_calls = fault.calls
        expected = outcome(shop, reference_user, reference_order["orderId"], groups)
        reference_expiry = {g: shop.group(reference_user, g).expires_at for g in groups}
        assert clean_calls >= 4  # the order, two groups, the transaction

        for kill_at in range(1, clean_calls + 1):
            user = ids("u")
            order = shop.placed(user, offer_id)
            event = payment_intent_event(shop.intent(order))
            fault.arm(kill_at)
            with pytest.raises(Died):
                shop.deliver(event)
            fault.arm(None)
            assert shop.deliver(event).status == 200, kill_at
            assert shop.deliver(event).status == 200, kill_at
            assert outcome(shop, user, order["orderId"], groups) == expected, kill_at
            for g in groups:
                got, want = shop.group(user, g).expires_at, reference_expiry[g]
                assert got is not None and want is not None and abs(got - want) < timedelta(minutes=1)


@pytest.mark.parametrize("phase", ["before", "after"])
def test_a_refund_killed_between_any_two_dynamodb_calls_then_redelivered_revokes_once(
    local_shop: Shop, ids: Any, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    from user_credits_dev.stripe_fake import charge_refunded_event

    shop = local_shop
    offer_id, groups = bundle(shop)
    with dynamodb_faults(shop, monkeypatch, phase) as fault:
        reference_user = ids("u")
        reference_order = shop.bought(reference_user, offer_id)
        fault.arm(None)
        assert shop.refund(reference_order, 250).status == 200
        clean_calls = fault.calls
        expected = outcome(shop, reference_user, reference_order["orderId"], groups)
        assert expected["status"] == "partially_refunded"

        for kill_at in range(1, clean_calls + 1):
            user = ids("u")
            order = shop.bought(user, offer_id)
            event = charge_refunded_event(shop.intent(order), 250)
            fault.arm(kill_at)
            with pytest.raises(Died):
                shop.deliver(event)
            fault.arm(None)
            assert shop.deliver(event).status == 200, kill_at
            assert shop.deliver(event).status == 200, kill_at
            assert outcome(shop, user, order["orderId"], groups) == expected, kill_at


@pytest.mark.parametrize("price", [1000, 0], ids=["paid", "free"])
def test_an_order_killed_between_any_two_dynamodb_calls_then_retried_with_its_key_happens_once(
    local_shop: Shop, ids: Any, monkeypatch: pytest.MonkeyPatch, price: int
) -> None:
    from user_credits.store.orders import list_orders

    shop = local_shop
    offer_id, group = shop.offer(tokens=100, prices={"usd": price})
    with dynamodb_faults(shop, monkeypatch, "after") as fault:
        fault.arm(None)
        assert shop.order(ids("u"), offer_id, key=ids("k")).status == 201
        clean_calls = fault.calls

        for kill_at in range(1, clean_calls + 1):
            user, key = ids("u"), ids("k")
            fault.arm(kill_at)
            with pytest.raises(Died):
                shop.order(user, offer_id, key=key)
            fault.arm(None)
            first = shop.order(user, offer_id, key=key)
            again = shop.order(user, offer_id, key=key)
            assert first.status == again.status == 201 and first.body == again.body, kill_at
            orders = list_orders(user)
            assert [o.order_id for o in orders] == [first.body["order"]["orderId"]], kill_at
            if price:
                intents = [i for i in shop.fake.intents.values() if i["metadata"].get("userId") == user]
                assert len(intents) == 1 and intents[0]["id"] == orders[0].payment_intent_id
            else:
                assert orders[0].status == "paid" and shop.group(user, group).balance == 100
                shop.assert_ledger_explains_balances(user, [group])
