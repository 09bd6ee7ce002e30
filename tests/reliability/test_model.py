"""The service against a model: random interleavings of purchases, deliveries (duplicated, failed),
consumes, refunds, grants, sweeps and clock jumps, through the real handlers, checked step by step
against a small in-memory model of SPEC.md's rules.

The model is written independently of the code under test (months come from dateutil, not from
`domain.durations`), so a shared mistake would have to be made twice.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import time_machine
from dateutil.relativedelta import relativedelta
from hypothesis import Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from user_credits.logic.invariants import check_user
from user_credits_dev.stripe_fake import payment_intent_event

pytest_plugins = ["stripe_fixtures"]

START = datetime(2027, 1, 31, 12, 0, tzinfo=UTC)  # a month end, so calendar clamping is exercised
OFFERS: dict[str, dict[str, Any]] = {
    "pack": {"offerGroup": "g3", "tokens": 100, "cycle": "once", "prices": {"usd": 500}},
    "monthly": {"offerGroup": "g1", "tokens": 50, "cycle": "monthly", "appendDate": True, "prices": {"usd": 1000}},
    "weekly": {"offerGroup": "g2", "tokens": 20, "cycle": "weekly", "prices": {"usd": 300}},
    "trial": {"offerGroup": "g2", "tokens": 5, "cycle": "daily", "prices": {"usd": 0}},
}
DURATIONS = {"once": None, "daily": relativedelta(days=1), "weekly": relativedelta(weeks=1),
             "monthly": relativedelta(months=1)}


@dataclass
class Group:
    balance: int = 0
    expires_at: datetime | None = None
    exists: bool = False

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def expire_remainder(self, now: datetime) -> None:
        if self.expired(now) and self.balance > 0:
            self.balance = 0


@dataclass
class Order:
    order: dict[str, Any]
    offer: str
    quantity: int
    credited: dict[str, int] = field(default_factory=dict)
    refunded: int = 0
    revoked: dict[str, int] = field(default_factory=dict)


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return None if a is None or b is None else max(a, b)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


class Model:
    """SPEC 2.4-2.6 and the documented choices, in the plainest Python."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {"g1": Group(), "g2": Group(), "g3": Group()}

    def credit(self, offer_name: str, quantity: int, now: datetime) -> dict[str, int]:
        offer = OFFERS[offer_name]
        group = self.groups[offer["offerGroup"]]
        group.expire_remainder(now)
        start = now
        if offer.get("appendDate") and group.expires_at is not None and group.expires_at > now:
            start = group.expires_at
        step = DURATIONS[offer["cycle"]]
        expiry = None if step is None else start + step * quantity
        group.expires_at = expiry if not group.exists else _later(group.expires_at, expiry)
        group.balance += offer["tokens"] * quantity
        group.exists = True
        return {offer["offerGroup"]: offer["tokens"] * quantity}

    def consume(self, name: str, tokens: int, overdraft: int, now: datetime) -> tuple[int, str | None]:
        group = self.groups[name]
        if group.expired(now):
            return 402, "credits_expired"
        if group.balance - tokens < -overdraft:
            return 402, "insufficient_credits"
        group.balance -= tokens
        group.exists = True
        return 200, None

    def refund(self, order: Order, amount_refunded: int, now: datetime) -> None:
        # Stripe's amount_refunded is cumulative: an event that does not grow it is a duplicate and
        # changes nothing (not even the expiry of a remainder). Found by `make soak`.
        if amount_refunded <= order.refunded:
            return
        order.refunded = amount_refunded
        amount = order.order["amount"]
        for name, credited in order.credited.items():
            group = self.groups[name]
            group.expire_remainder(now)
            target = math.floor(credited * amount_refunded / amount)
            due = max(0, target - order.revoked.get(name, 0))
            group.balance -= min(due, max(0, group.balance))
            order.revoked[name] = order.revoked.get(name, 0) + due

    def grant(self, name: str, tokens: int, now: datetime) -> None:
        group = self.groups[name]
        if group.expired(now):
            # Documented choice: the remainder expires, then the group starts afresh (no expiry).
            group.expire_remainder(now)
            group.expires_at = None
        group.balance += tokens
        group.exists = True

    def sweep(self, now: datetime) -> None:
        for group in self.groups.values():
            group.expire_remainder(now)


def test_service_agrees_with_the_model(fresh_service: Any, stripe_fake: Any, ids: Any) -> None:
    from stripe_fixtures import API_KEY, WEBHOOK_SECRET, Shop

    fresh_service.setenv("STRIPE_API_BASE", stripe_fake.base_url)
    fresh_service.setenv("STRIPE_API_KEY", API_KEY)
    fresh_service.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    fresh_service.setenv("WARN_BEFORE_EXPIRY_SECONDS", "0")
    shop = Shop(fresh_service, stripe_fake, ids)
    catalog: dict[str, str] = {}
    with time_machine.travel(START, tick=False):
        for name, body in OFFERS.items():
            offer_id = ids(name)
            reply = fresh_service.call("PUT", f"/admin/offers/{offer_id}", body, iam=True)
            assert reply.status == 201, reply.body
            catalog[name] = offer_id

    class Machine(RuleBasedStateMachine):
        total_steps = 0

        def __init__(self) -> None:
            super().__init__()
            self.user = ids("model-user")
            self.model = Model()
            self.pending: list[Order] = []
            self.paid: list[Order] = []
            self.clock = time_machine.travel(START, tick=False)
            self.traveller = self.clock.start()
            self.steps = 0

        def teardown(self) -> None:
            self.clock.stop()

        def now(self) -> datetime:
            return datetime.now(UTC)

        @rule(offer=st.sampled_from(sorted(OFFERS)), quantity=st.integers(1, 2))
        def place_order(self, offer: str, quantity: int) -> None:
            reply = shop.order(self.user, catalog[offer], quantity=quantity)
            assert reply.status == 201, reply.body
            order = Order(reply.body["order"], offer, quantity)
            if order.order["amount"] == 0:
                assert order.order["status"] == "paid"
                order.credited = self.model.credit(offer, quantity, self.now())
                self.paid.append(order)
            else:
                assert order.order["status"] == "pending"
                self.pending.append(order)

        @precondition(lambda self: self.pending)
        @rule(data=st.data())
        def pay(self, data: st.DataObject) -> None:
            order = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
            assert shop.pay(order.order).status == 200
            order.credited = self.model.credit(order.offer, order.quantity, self.now())
            self.paid.append(order)

        @precondition(lambda self: self.pending)
        @rule(data=st.data())
        def payment_fails(self, data: st.DataObject) -> None:
            order = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
            event = payment_intent_event(shop.intent(order.order), event_type="payment_intent.payment_failed")
            assert shop.deliver(event).status == 200
            assert shop.status(self.user, order.order["orderId"]) == "failed"

        @precondition(lambda self: self.paid)
        @rule(data=st.data())
        def duplicate_delivery(self, data: st.DataObject) -> None:
            order = self.paid[data.draw(st.integers(0, len(self.paid) - 1))]
            if order.order["amount"] == 0:
                return
            assert shop.pay(order.order).status == 200  # changes nothing: the model is left as is

        @precondition(lambda self: any(o.order["amount"] > 0 for o in self.paid))
        @rule(data=st.data(), share=st.sampled_from([0.25, 0.5, 1.0]))
        def refund(self, data: st.DataObject, share: float) -> None:
            refundable = [o for o in self.paid if o.order["amount"] > 0]
            order = refundable[data.draw(st.integers(0, len(refundable) - 1))]
            amount_refunded = max(order.refunded, math.floor(order.order["amount"] * share))
            assert shop.refund(order.order, amount_refunded).status == 200
            self.model.refund(order, amount_refunded, self.now())

        @rule(group=st.sampled_from(["g1", "g2", "g3"]), tokens=st.integers(1, 160), overdraft=st.integers(0, 30))
        def consume(self, group: str, tokens: int, overdraft: int) -> None:
            body = {"offerGroup": group, "tokens": tokens, "maxOverdraft": overdraft}
            reply = fresh_service.call("POST", f"/users/{self.user}/consume", body, iam=True)
            status, error = self.model.consume(group, tokens, overdraft, self.now())
            assert (reply.status, reply.error) == (status, error), reply.body

        @rule(group=st.sampled_from(["g1", "g2", "g3"]), tokens=st.integers(1, 100))
        def grant(self, group: str, tokens: int) -> None:
            reply = fresh_service.call("POST", f"/admin/users/{self.user}/grants",
                                       {"offerGroup": group, "tokens": tokens}, iam=True)
            assert reply.status == 201, reply.body
            self.model.grant(group, tokens, self.now())

        @rule()
        def sweep(self) -> None:
            fresh_service.invoke_schedule()
            self.model.sweep(self.now())

        @rule(hours=st.integers(1, 24 * 40))
        def time_passes(self, hours: int) -> None:
            self.traveller.shift(timedelta(hours=hours))

        @invariant()
        def balances_and_ledger_agree(self) -> None:
            self.steps += 1
            Machine.total_steps += 1
            credits = fresh_service.call("GET", f"/users/{self.user}/credits", iam=True)
            assert credits.status == 200, credits.body
            seen = {g["offerGroup"]: g for g in credits.body["groups"]}
            for name, group in self.model.groups.items():
                if not group.exists:
                    continue
                note(f"{name}: model {group}, service {seen.get(name)}")
                assert seen[name]["balance"] == group.balance, name
                assert seen[name]["expiresAt"] == _iso(group.expires_at), name
            report = check_user(self.user)
            assert report.ok, report.mismatches

    # ci: a bounded run of about a minute, without shrinking (a failure prints its steps; shrinking a
    # long interleaving can take longer than the test's time limit). soak (`make soak`): new seeds
    # until SOAK_SECONDS have passed, with shrinking.
    soak_seconds = float(os.environ.get("SOAK_SECONDS", "0"))
    if soak_seconds <= 0:
        run_state_machine_as_test(Machine, settings=settings(
            settings.default, max_examples=12, stateful_step_count=20,
            phases=[Phase.explicit, Phase.reuse, Phase.generate]))
        return
    deadline, rounds = time.monotonic() + soak_seconds, 0
    while time.monotonic() < deadline:
        run_state_machine_as_test(Machine, settings=settings(
            settings.default, max_examples=10, stateful_step_count=40, database=None))
        rounds += 1
    print(f"soak: {rounds * 10} examples of up to 40 steps, {Machine.total_steps} steps in all")

