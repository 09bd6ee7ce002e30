"""The service against a model: random interleavings of purchases, deliveries (duplicated, failed),
consumes, holds (placed, settled below, at and above what they hold, released, repeated, left to
expire), refunds, grants, sweeps and clock jumps, and a monthly plan (SPEC 2.10: checked out, renewed as
its periods end, renewals failing and retried, canceled at once or at the period end, its Stripe events
delivered in any order, late and more than once, beside a top-up of the same group), through the real
handlers, checked step by step against a small in-memory model of SPEC.md's rules.

The model is written independently of the code under test (months come from dateutil, not from
`domain.durations`), so a shared mistake would have to be made twice.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import time_machine
from dateutil.relativedelta import relativedelta
from hypothesis import Phase, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from user_credits.logic.invariants import check_user
from user_credits.store.expiry import SWEEP_SK, SWEEP_USER
from user_credits.store.models import LedgerRecord, SweepProgressRecord
from user_credits_dev.stripe_fake import payment_intent_event

pytest_plugins = ["stripe_fixtures"]

START = datetime(2027, 1, 31, 12, 0, tzinfo=UTC)  # a month end, so calendar clamping is exercised
OFFERS: dict[str, dict[str, Any]] = {
    "pack": {"offerGroup": "g3", "tokens": 100, "cycle": "once", "prices": {"usd": 500}},
    "monthly": {"offerGroup": "g1", "tokens": 50, "cycle": "monthly", "appendDate": True, "prices": {"usd": 1000}},
    "weekly": {"offerGroup": "g2", "tokens": 20, "cycle": "weekly", "prices": {"usd": 300}, "priority": 20},
    "trial": {"offerGroup": "g2", "tokens": 5, "cycle": "daily", "prices": {"usd": 0}},
    "topup": {"offerGroup": "g1", "tokens": 30, "cycle": "once", "prices": {"usd": 200}, "priority": 80},
}
# SPEC 2.10: a plan renewed monthly, in the group of `monthly` and `topup`; bought with POST /checkout
# only (so not among OFFERS, which place_order samples).
PLAN: dict[str, Any] = {"offerGroup": "g1", "tokens": 40, "cycle": "monthly", "billing": "recurring",
                        "kind": "subscription", "prices": {"usd": 900}, "priority": 40}
PAGES = {"successUrl": "https://shop.example/done", "cancelUrl": "https://shop.example/cart"}
# Stripe retries a delivery for up to three days, then gives the event up: a monthly plan's invoice is
# thus always delivered within the period it pays. (A lot credited after its period ended expires at
# once, as the sweep has passed its time: tests/test_subscription_faults.py, with a daily plan.)
STRIPE_GIVES_UP = timedelta(days=3)
DURATIONS = {"once": None, "daily": relativedelta(days=1), "weekly": relativedelta(weeks=1),
             "monthly": relativedelta(months=1)}
# SPEC 2.9: a hold lives 15 minutes unless asked otherwise (ttlSeconds), at most a day.
DEFAULT_HOLD_TTL = 15 * 60
# A closed hold's outcome is remembered at least this long after it closed (the README's choice).
REMEMBERED = timedelta(days=1)
# Ledger reasons whose sums are compared at every step; `expire` and the total only after a sweep (when
# an expired lot's entry is written before that is the implementation's choice).
EXACT_REASONS = ("purchase", "renewal", "grant", "consume", "hold", "release", "refund")


@dataclass
class Lot:
    granted: int
    remaining: int
    starts: datetime
    expires: datetime | None
    priority: int
    ordinal: int
    order_id: str | None = None
    lot_id: str | None = None  # the service's, learned from its answers

    def live(self, now: datetime) -> bool:
        return self.expires is None or self.expires > now

    def key(self) -> tuple[int, int, datetime, int]:
        return (self.priority, 1 if self.expires is None else 0, self.expires or self.starts, self.ordinal)


@dataclass
class Hold:
    """SPEC 2.9: what a hold took, per lot in the order taken, and what no lot covered (a debt while held)."""

    hold_id: str
    tokens: int
    expires: datetime
    number: int  # placement order
    parts: list[tuple[Lot, int]] = field(default_factory=list)
    uncovered: int = 0


@dataclass
class Closed:
    """A closed hold's outcome (the answer the same call gets again) and when it closed."""

    status: str
    settled: int
    body: dict[str, Any]
    at: datetime


@dataclass
class Group:
    """SPEC 1: lots, each with its own life, and a debt; the balance counts live lots only. The open
    holds' tokens are out of their lots; what no lot covered is debt too."""

    lots: list[Lot] = field(default_factory=list)
    debt: int = 0  # left by plain consumes (and by the uncovered part a settle kept)
    exists: bool = False
    holds: dict[str, Hold] = field(default_factory=dict)  # open, in placement order
    closed: dict[str, Closed] = field(default_factory=dict)
    placed: int = 0
    ledger: Counter[str] = field(default_factory=Counter)  # sum of the deltas per reason

    def uncovered(self) -> int:
        return sum(hold.uncovered for hold in self.holds.values())

    def balance(self, now: datetime) -> int:
        return sum(lot.remaining for lot in self.lots if lot.live(now)) - self.debt - self.uncovered()

    def expires_at(self) -> datetime | None:
        if not self.lots or any(lot.expires is None for lot in self.lots):
            return None
        return max(lot.expires for lot in self.lots if lot.expires is not None)

    def all_expired(self, now: datetime) -> bool:
        return bool(self.lots) and not any(lot.live(now) for lot in self.lots)

    def spending_order(self, now: datetime) -> list[Lot]:
        return sorted((lot for lot in self.lots if lot.live(now)), key=Lot.key)

    def expire(self, now: datetime) -> None:
        for lot in self.lots:
            if not lot.live(now):
                self.ledger["expire"] -= lot.remaining
                lot.remaining = 0

    def stored(self) -> int:
        """The balance the service stores: expired lots count until a write expires them."""
        return sum(lot.remaining for lot in self.lots) - self.debt - self.uncovered()

    def touch(self, now: datetime) -> None:
        """What any write to the group does first: expired lots lose their tokens, and the holds past
        their expiresAt are released (sooner first), each answering with the balance just after it."""
        self.expire(now)
        due = sorted((h for h in self.holds.values() if h.expires <= now), key=lambda h: (h.expires, h.number))
        for hold in due:
            self.close(hold, 0, now)
            balance = self.balance(now)
            self.closed[hold.hold_id] = Closed("released", 0, {
                "holdId": hold.hold_id, "settled": 0, "released": hold.tokens, "balance": balance,
                "status": "released"}, now)

    def after_touch(self, now: datetime) -> Group:
        """The group as a write would find it (to decide SPEC 2.5 on; nothing is written if refused)."""
        trial = copy.deepcopy(self)
        trial.touch(now)
        return trial

    def add(self, tokens: int, starts: datetime, expires: datetime | None, priority: int, reason: str,
            order_id: str | None = None, lot_id: str | None = None) -> None:
        """A new lot pays the consumes' debt first, then the holds' uncovered parts (placement order),
        which then count as taken from it."""
        paid = min(self.debt, tokens)
        self.debt -= paid
        lot = Lot(tokens, tokens - paid, starts, expires, priority, len(self.lots), order_id, lot_id)
        for hold in self.holds.values():
            part = min(hold.uncovered, lot.remaining)
            if part:
                hold.uncovered -= part
                hold.parts.append((lot, part))
                lot.remaining -= part
        self.lots.append(lot)
        self.ledger[reason] += tokens
        self.exists = True

    def take(self, tokens: int, lots: list[Lot]) -> int:
        """Take up to `tokens` from `lots` in that order; what they could not cover."""
        return tokens - sum(n for _, n in self.take_parts(tokens, lots))

    def take_parts(self, tokens: int, lots: list[Lot]) -> list[tuple[Lot, int]]:
        parts = []
        for lot in lots:
            part = min(lot.remaining, tokens)
            if part:
                lot.remaining -= part
                tokens -= part
                parts.append((lot, part))
        return parts

    def consume(self, tokens: int, now: datetime, reason: str = "consume") -> None:
        self.debt += self.take(tokens, self.spending_order(now))
        self.ledger[reason] -= tokens
        self.exists = True

    def hold(self, hold_id: str, tokens: int, expires: datetime, now: datetime) -> None:
        parts = self.take_parts(tokens, self.spending_order(now))
        self.holds[hold_id] = Hold(hold_id, tokens, expires, self.placed, parts, tokens - sum(n for _, n in parts))
        self.placed += 1
        self.ledger["hold"] -= tokens
        self.exists = True

    def close(self, hold: Hold, settled: int, now: datetime) -> None:
        """Keep the first `settled` tokens in the order taken; the rest go back to their lots (those of
        an expired lot expire), paying first, as a credit would, the debt that consumes left meanwhile
        (in the spending order of their lots); the uncovered part cancels debt; above the hold, the
        excess is consumed."""
        del self.holds[hold.hold_id]
        keep = min(settled, hold.tokens)
        if hold.tokens > keep:
            self.ledger["release"] += hold.tokens - keep
        back = []
        for lot, n in hold.parts:
            kept = min(keep, n)
            keep -= kept
            if lot.live(now):
                back.append((lot, n - kept))
            else:
                self.ledger["expire"] -= n - kept
        for lot, n in sorted(back, key=lambda part: part[0].key()):
            paying = min(n, self.debt)
            self.debt -= paying
            lot.remaining += n - paying
        self.debt += min(keep, hold.uncovered)
        if settled > hold.tokens:
            self.consume(settled - hold.tokens, now)


@dataclass
class Order:
    order: dict[str, Any]
    offer: str
    quantity: int
    credited: dict[str, int] = field(default_factory=dict)
    refunded: int = 0
    revoked: dict[str, int] = field(default_factory=dict)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


class Model:
    """SPEC 1 and 2.4-2.6 and the documented choices, in the plainest Python."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {"g1": Group(), "g2": Group(), "g3": Group()}

    def credit(self, offer_name: str, quantity: int, now: datetime, order_id: str) -> dict[str, int]:
        offer = OFFERS[offer_name]
        group = self.groups[offer["offerGroup"]]
        group.touch(now)
        start = now
        current = group.expires_at()
        if offer.get("appendDate") and current is not None:
            start = max(now, current)
        step = DURATIONS[offer["cycle"]]
        expiry = None if step is None else start + step * quantity
        group.add(offer["tokens"] * quantity, start, expiry, offer.get("priority", 50), "purchase", order_id)
        return {offer["offerGroup"]: offer["tokens"] * quantity}

    def refusal(self, name: str, tokens: int, overdraft: int, now: datetime) -> tuple[int, str] | None:
        """SPEC 2.5 on the group as the write finds it (due holds released)."""
        group = self.groups[name].after_touch(now)
        if group.balance(now) - tokens < -overdraft:
            return 402, "credits_expired" if group.all_expired(now) else "insufficient_credits"
        return None

    def consume(self, name: str, tokens: int, overdraft: int, now: datetime) -> tuple[int, str | None]:
        refused = self.refusal(name, tokens, overdraft, now)
        if refused is not None:
            return refused
        group = self.groups[name]
        group.touch(now)
        group.consume(tokens, now)
        return 200, None

    def place_hold(self, name: str, hold_id: str, tokens: int, now: datetime, ttl: int) -> int:
        """The hold takes its tokens like a consume (the caller checked SPEC 2.5); the balance after."""
        group = self.groups[name]
        group.touch(now)
        group.hold(hold_id, tokens, now + timedelta(seconds=ttl), now)
        return group.balance(now)

    def close(self, name: str, hold_id: str, status: str, settled: int, overdraft: int,
              now: datetime) -> tuple[int, str | None, dict[str, Any] | None]:
        """A settle (`settled` kept) or a release of a hold: status, error, body."""
        group = self.groups[name]
        hold = group.holds.get(hold_id)
        if hold is not None and hold.expires > now:
            excess = settled - hold.tokens
            if excess > 0:
                after = group.after_touch(now)
                if after.balance(now) - excess < -overdraft:
                    return 402, "insufficient_credits", {"balance": after.balance(now)}
            group.touch(now)
            group.close(hold, settled, now)
            body = {"holdId": hold_id, "settled": settled, "released": max(0, hold.tokens - settled),
                    "balance": group.balance(now), "status": status}
            group.closed[hold_id] = Closed(status, settled, body, now)
            return 200, None, body
        if hold is not None:
            group.touch(now)  # past its expiresAt: this touch releases it before the call
        closed = group.closed[hold_id]
        if closed.status == status and (status == "released" or closed.settled == settled):
            return 200, None, closed.body
        return 409, "hold_closed", None

    def refund(self, order: Order, amount_refunded: int, now: datetime) -> None:
        # Stripe's amount_refunded is cumulative: an event that does not grow it is a duplicate and
        # changes nothing (not even the expiry of a lot). Found by `make soak`.
        if amount_refunded <= order.refunded:
            return
        order.refunded = amount_refunded
        amount = order.order["amount"]
        for name, credited in order.credited.items():
            group = self.groups[name]
            group.touch(now)
            target = math.floor(credited * amount_refunded / amount)
            due = max(0, target - order.revoked.get(name, 0))
            own = [lot for lot in group.lots if lot.order_id == order.order["orderId"] and lot.live(now)]
            others = [lot for lot in group.spending_order(now) if lot not in own]
            # Never below 0: what no lot holds (held tokens included) is shortfall.
            group.ledger["refund"] -= due - group.take(due, own + others)
            order.revoked[name] = order.revoked.get(name, 0) + due

    def grant(self, name: str, tokens: int, now: datetime, priority: int | None, expires: datetime | None,
              lot_id: str) -> int:
        group = self.groups[name]
        group.touch(now)
        group.add(tokens, now, expires, 50 if priority is None else priority, "grant", lot_id=lot_id)
        return group.balance(now)

    def sweep(self, now: datetime) -> None:
        for group in self.groups.values():
            group.touch(now)

    def invoice_paid(self, invoice: dict[str, Any], now: datetime, order_id: str) -> None:
        """SPEC 2.10: a lot of the plan's tokens x quantity from the start to the end of the period the
        invoice pays (its lines' period), named after the invoice; `purchase` for the subscription's
        first invoice, `renewal` after. Added as any credit is (expired lots first, debt paid from it)."""
        periods = [line["period"] for line in invoice["lines"]["data"]]
        starts = datetime.fromtimestamp(min(p["start"] for p in periods), UTC)
        ends = datetime.fromtimestamp(max(p["end"] for p in periods), UTC)
        quantity = sum(line["quantity"] for line in invoice["lines"]["data"])
        reason = "purchase" if invoice["billing_reason"] == "subscription_create" else "renewal"
        group = self.groups[PLAN["offerGroup"]]
        group.touch(now)
        group.add(PLAN["tokens"] * quantity, starts, ends, PLAN["priority"], reason, order_id, invoice["id"])


def test_service_agrees_with_the_model(fresh_service: Any, stripe_fake: Any, ids: Any) -> None:
    from stripe_fixtures import API_KEY, WEBHOOK_SECRET, Shop

    fresh_service.setenv("STRIPE_API_BASE", stripe_fake.base_url)
    fresh_service.setenv("STRIPE_API_KEY", API_KEY)
    fresh_service.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    fresh_service.setenv("WARN_BEFORE_EXPIRY_SECONDS", "0")
    shop = Shop(fresh_service, stripe_fake, ids)
    catalog: dict[str, str] = {}
    with time_machine.travel(START, tick=False):
        for name, body in {**OFFERS, "plan": PLAN}.items():
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
            # Each example's clock starts again at START: the sweep's stored position (table-wide), left
            # ahead of it by an earlier example, would pass over this example's lots due before it.
            SweepProgressRecord(SWEEP_USER, SWEEP_SK).delete()
            self.steps = 0
            self.swept = False
            # SPEC 2.10: the plan's subscription (the latest checked out), its order, and Stripe's side:
            # events sent and not yet delivered (in no promised order), and those delivered (Stripe may
            # deliver them again); the invoices credited, the subscriptions whose deletion was delivered.
            self.subscription: str | None = None
            self.subscription_orders: dict[str, str] = {}
            self.outbox: list[dict[str, Any]] = []
            self.delivered: list[dict[str, Any]] = []
            self.credited_invoices: set[str] = set()
            self.deleted: set[str] = set()

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
                order.credited = self.model.credit(offer, quantity, self.now(), order.order["orderId"])
                self.paid.append(order)
            else:
                assert order.order["status"] == "pending"
                self.pending.append(order)

        @precondition(lambda self: self.pending)
        @rule(data=st.data())
        def pay(self, data: st.DataObject) -> None:
            order = self.pending.pop(data.draw(st.integers(0, len(self.pending) - 1)))
            assert shop.pay(order.order).status == 200
            order.credited = self.model.credit(order.offer, order.quantity, self.now(), order.order["orderId"])
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
            if status == 200:
                assert reply.body["balance"] == self.model.groups[group].balance(self.now()), reply.body

        @rule(group=st.sampled_from(["g1", "g2", "g3"]), tokens=st.integers(1, 100),
              priority=st.sampled_from([None, 0, 90]), days=st.sampled_from([None, 1, 10]))
        def grant(self, group: str, tokens: int, priority: int | None, days: int | None) -> None:
            body: dict[str, Any] = {"offerGroup": group, "tokens": tokens}
            expires = None if days is None else self.now() + timedelta(days=days)
            if priority is not None:
                body["priority"] = priority
            if expires is not None:
                body["expiresAt"] = _iso(expires)
            reply = fresh_service.call("POST", f"/admin/users/{self.user}/grants", body, iam=True)
            assert reply.status == 201, reply.body
            balance = self.model.grant(group, tokens, self.now(), priority, expires, reply.body["lotId"])
            assert reply.body["balance"] == balance, reply.body

        @rule()
        def sweep(self) -> None:
            fresh_service.invoke_schedule()
            self.model.sweep(self.now())
            # Every expired lot has its `expire` entry now: the ledger's sums all agree with the model.
            self.swept = True

        @rule(hours=st.integers(1, 24 * 40))
        def time_passes(self, hours: int) -> None:
            self.traveller.shift(timedelta(hours=hours))

        # -- holds (SPEC 2.9)

        def holds(self, which: str) -> list[tuple[str, str]]:
            return [(name, hold_id) for name, group in self.model.groups.items()
                    for hold_id in getattr(group, which)]

        @precondition(lambda self: len(self.holds("holds")) < 6)
        @rule(group=st.sampled_from(["g1", "g2", "g3"]), tokens=st.integers(1, 80),
              overdraft=st.sampled_from([0, 0, 15]), ttl=st.sampled_from([None, 60, 3600, 24 * 3600]))
        def place_hold(self, group: str, tokens: int, overdraft: int, ttl: int | None) -> None:
            body: dict[str, Any] = {"offerGroup": group, "tokens": tokens, "maxOverdraft": overdraft}
            if ttl is not None:
                body["ttlSeconds"] = ttl
            reply = fresh_service.call("POST", f"/users/{self.user}/holds", body, iam=True)
            now = self.now()
            refused = self.model.refusal(group, tokens, overdraft, now)
            if refused is not None:
                assert (reply.status, reply.error) == refused, reply.body
                assert reply.body["balance"] == self.model.groups[group].after_touch(now).balance(now), reply.body
                return
            assert reply.status == 201, reply.body
            hold_id = reply.body["holdId"]
            seconds = DEFAULT_HOLD_TTL if ttl is None else ttl
            balance = self.model.place_hold(group, hold_id, tokens, now, seconds)
            assert reply.body == {"holdId": hold_id, "userId": self.user, "offerGroup": group, "tokens": tokens,
                                  "balance": balance, "expiresAt": _iso(now + timedelta(seconds=seconds))}

        def close(self, name: str, hold_id: str, status: str, tokens: int, overdraft: int) -> None:
            if status == "settled":
                reply = fresh_service.call("POST", f"/users/{self.user}/holds/{hold_id}/settle",
                                           {"tokens": tokens, "maxOverdraft": overdraft}, iam=True)
            else:
                reply = fresh_service.call("POST", f"/users/{self.user}/holds/{hold_id}/release", {}, iam=True)
            now = self.now()
            closed = self.model.groups[name].closed.get(hold_id)
            if closed is not None and now - closed.at >= REMEMBERED and reply.status == 404:
                return  # remembered a day after it was folded into the book, or forgotten since
            status_code, error, body = self.model.close(name, hold_id, status, tokens, overdraft, now)
            assert (reply.status, reply.error) == (status_code, error), reply.body
            if status_code == 402:
                assert reply.body["balance"] == body["balance"], reply.body
            elif status_code == 200:
                assert reply.body == body

        @precondition(lambda self: self.holds("holds"))
        @rule(data=st.data(), how=st.sampled_from(["below", "at", "above"]), amount=st.integers(0, 40),
              overdraft=st.sampled_from([0, 20]))
        def settle(self, data: st.DataObject, how: str, amount: int, overdraft: int) -> None:
            name, hold_id = data.draw(st.sampled_from(self.holds("holds")))
            held = self.model.groups[name].holds[hold_id].tokens
            tokens = amount % held if how == "below" else held if how == "at" else held + 1 + amount
            self.close(name, hold_id, "settled", tokens, overdraft)

        @precondition(lambda self: self.holds("holds"))
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            name, hold_id = data.draw(st.sampled_from(self.holds("holds")))
            self.close(name, hold_id, "released", 0, 0)

        @precondition(lambda self: self.holds("closed"))
        @rule(data=st.data(), same=st.booleans(), other=st.integers(0, 30))
        def close_again(self, data: st.DataObject, same: bool, other: int) -> None:
            """The same call again answers its first outcome; any other call is 409 hold_closed."""
            name, hold_id = data.draw(st.sampled_from(self.holds("closed")))
            closed = self.model.groups[name].closed[hold_id]
            if same:
                self.close(name, hold_id, closed.status, closed.settled, 0)
            elif closed.status == "released" or other % 2:
                self.close(name, hold_id, "settled", closed.settled + 1 + other, 0)
            else:
                self.close(name, hold_id, "released", 0, 0)

        @rule(minutes=st.sampled_from([1, 10, 16, 61, 600]))
        def minutes_pass(self, minutes: int) -> None:
            self.traveller.shift(timedelta(minutes=minutes))

        # -- the plan (SPEC 2.10)

        def live_subscription(self) -> dict[str, Any] | None:
            """The plan's subscription as Stripe holds it, unless there is none or it has ended."""
            if self.subscription is None:
                return None
            found = shop.fake.subscription(self.subscription)
            return None if found["status"] == "canceled" else found

        def subscribe(self) -> None:
            """Checkout of the plan, and the customer paying on Stripe's page at once."""
            reply = fresh_service.call("POST", "/checkout", {"offerId": catalog["plan"], **PAGES}, user=self.user)
            assert reply.status == 201, reply.body
            self.outbox += shop.fake.complete_session(reply.body["sessionId"])
            self.subscription = shop.fake.session(reply.body["sessionId"])["subscription"]
            self.subscription_orders[self.subscription] = reply.body["orderId"]

        @rule(paid=st.sampled_from([True, True, False]))
        def the_plan_bills(self, paid: bool) -> None:
            """Without a live subscription, the user subscribes. Else the clock passes the end of the
            current period and Stripe bills the next one: paid, or not (past_due); a past_due
            subscription's open invoice is retried a day later (paid, or failing again), and once the
            period it bills is over Stripe gives up and cancels. One set to cancel at the period end
            ends there instead."""
            found = self.live_subscription()
            if found is None:
                self.subscribe()
                return
            end = datetime.fromtimestamp(found["items"]["data"][0]["current_period_end"], UTC)
            if found["status"] == "past_due":
                self.traveller.shift(timedelta(days=1))
                if self.now() >= end:
                    self.outbox += shop.fake.cancel(found["id"])
                    return
            else:
                if self.now() < end:
                    self.traveller.shift(end - self.now() + timedelta(minutes=1))
                # Stripe's periods are calendar months counted from the anchor (Jan 31 -> Feb 28 -> Mar 31).
                anchor = datetime.fromtimestamp(found["billing_cycle_anchor"], UTC)
                assert any(anchor + relativedelta(months=n) == end for n in range(1, 60)), (anchor, end)
            if paid or found["cancel_at_period_end"]:
                self.outbox += shop.fake.renew(found["id"])
            else:
                self.outbox += shop.fake.fail_renewal(found["id"])

        @precondition(lambda self: self.live_subscription() is not None)
        @rule(at_period_end=st.booleans())
        def customer_cancels(self, at_period_end: bool) -> None:
            found = self.live_subscription()
            assert found is not None
            at_period_end = at_period_end and not found["cancel_at_period_end"]
            self.outbox += shop.fake.cancel(found["id"], at_period_end=at_period_end)

        def deliverable(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """Those Stripe has not given up yet."""
            now = self.now()
            return [e for e in events if now - datetime.fromtimestamp(e["created"], UTC) <= STRIPE_GIVES_UP]

        @precondition(lambda self: self.outbox)
        @rule(data=st.data())
        def stripe_delivers(self, data: st.DataObject) -> None:
            """Any one event not yet delivered (Stripe promises no order)."""
            self.outbox = self.deliverable(self.outbox)
            if self.outbox:
                event = self.outbox.pop(data.draw(st.integers(0, len(self.outbox) - 1)))
                self.deliver_stripe_event(event)
                self.delivered.append(event)

        @precondition(lambda self: self.outbox)
        @rule(data=st.data())
        def stripe_catches_up(self, data: st.DataObject) -> None:
            """Everything not yet delivered, in any order."""
            for event in data.draw(st.permutations(self.deliverable(self.outbox))):
                self.deliver_stripe_event(event)
                self.delivered.append(event)
            self.outbox = []

        @precondition(lambda self: self.delivered)
        @rule(data=st.data())
        def stripe_delivers_again(self, data: st.DataObject) -> None:
            again = self.deliverable(self.delivered)
            if again:
                self.deliver_stripe_event(data.draw(st.sampled_from(again)))

        def deliver_stripe_event(self, event: dict[str, Any]) -> None:
            reply = shop.deliver(event)
            assert reply.status == 200, (event["type"], reply.body)
            obj = event["data"]["object"]
            if event["type"] == "customer.subscription.deleted":
                self.deleted.add(obj["id"])
                mine = fresh_service.call("GET", "/subscriptions", user=self.user).body["subscriptions"]
                assert [s["status"] for s in mine if s["subscriptionId"] == obj["id"]] == ["canceled"], mine
            elif event["type"] == "invoice.paid":
                subscription = obj["parent"]["subscription_details"]["subscription"]
                # Once per invoice; nothing once the subscription's end is known (SPEC 2.10).
                if obj["id"] in self.credited_invoices or subscription in self.deleted:
                    return
                self.credited_invoices.add(obj["id"])
                self.model.invoice_paid(obj, self.now(), self.subscription_orders[subscription])

        @invariant()
        def balances_and_ledger_agree(self) -> None:
            self.steps += 1
            Machine.total_steps += 1
            credits = fresh_service.call("GET", f"/users/{self.user}/credits", iam=True)
            assert credits.status == 200, credits.body
            seen = {g["offerGroup"]: g for g in credits.body["groups"]}
            now = self.now()
            sums: Counter[tuple[str, str]] = Counter()
            for entry in LedgerRecord.query(self.user, consistent_read=True):
                sums[(entry.offerGroup, entry.reason)] += int(entry.delta)
            for name, group in self.model.groups.items():
                if not group.exists:
                    continue
                note(f"{name}: model {group}, service {seen.get(name)}")
                self.learn_lot_ids(group, seen[name]["lots"], now)
                assert seen[name]["balance"] == group.balance(now), name
                assert seen[name]["expiresAt"] == _iso(group.expires_at()), name
                # SPEC 3: the live lots in spending order, each with what it still holds.
                assert [(lot["lotId"], lot["remaining"], lot["expiresAt"], lot["priority"])
                        for lot in seen[name]["lots"]] == [
                    (lot.lot_id, lot.remaining, _iso(lot.expires), lot.priority)
                    for lot in group.spending_order(now)], name
                # The stream has drained (every call drains it): the ledger's sums per reason.
                for reason in EXACT_REASONS:
                    assert sums[(name, reason)] == group.ledger[reason], (name, reason, sums)
                if self.swept:
                    assert sums[(name, "expire")] == group.ledger["expire"], (name, sums)
                    assert sum(n for (g, _), n in sums.items() if g == name) == sum(group.ledger.values()), name
            self.swept = False
            report = check_user(self.user)
            assert not report.mismatches and not report.unsound_books, (report.mismatches, report.unsound_books)

        def learn_lot_ids(self, group: Group, lots: list[dict[str, Any]], now: datetime) -> None:
            """An order's lot is named by the service: the live lots it shows that the model cannot name
            yet are the new ones (in spending order, as both list them)."""
            known = {lot.lot_id for lot in group.lots}
            unnamed = [lot for lot in group.spending_order(now) if lot.lot_id is None]
            new = [lot["lotId"] for lot in lots if lot["lotId"] not in known]
            assert len(new) == len(unnamed), (new, unnamed)
            for lot, lot_id in zip(unnamed, new, strict=True):
                lot.lot_id = lot_id

    # ci: a bounded run of about a minute, without shrinking (a failure prints its steps; shrinking a
    # long interleaving can take longer than the test's time limit). soak (`make soak`): new seeds
    # until SOAK_SECONDS have passed, with shrinking.
    soak_seconds = float(os.environ.get("SOAK_SECONDS", "0"))
    if soak_seconds <= 0:
        run_state_machine_as_test(Machine, settings=settings(
            settings.default, max_examples=16, stateful_step_count=25,
            phases=[Phase.explicit, Phase.reuse, Phase.generate]))
        return
    deadline, rounds = time.monotonic() + soak_seconds, 0
    while time.monotonic() < deadline:
        run_state_machine_as_test(Machine, settings=settings(
            settings.default, max_examples=10, stateful_step_count=40, database=None))
        rounds += 1
    print(f"soak: {rounds * 10} examples of up to 40 steps, {Machine.total_steps} steps in all")

