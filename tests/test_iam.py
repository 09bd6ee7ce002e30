"""Least privilege (issue 14.10): each function is granted exactly the DynamoDB calls it makes.

Every route and the sweep run once through their handlers on DynamoDB Local, down every path that
reaches DynamoDB in another way (keyed and unkeyed, replays, refusals, each webhook outcome, refunds
found through the PaymentIntent index, the ledger through its group index, expiry and warnings).
A botocore hook records each call as the IAM action it needs, on which table or index (a transaction
needs the action of each of its items). Then, for every function, what template.yaml grants must be
what was recorded: no call may be refused in AWS, and no grant may go unused.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import time_machine
from conftest import Service, hook_dynamodb_clients

from user_credits.store.holds import MAX_PENDING
from user_credits_dev import template as tpl
from user_credits_dev.stripe_fake import charge_refunded_event, payment_intent_event

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

Grant = tuple[str, str, str | None]  # (IAM action, table logical id, index name or None)

_TRANSACT_ACTIONS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                     "ConditionCheck": "ConditionCheckItem"}


@dataclass
class CallRecorder:
    """What each function asked of DynamoDB, as IAM sees it."""

    tables: dict[str, str]  # physical name -> logical id
    current: str | None = None
    calls: dict[str, set[Grant]] = field(default_factory=lambda: defaultdict(set))

    def before(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        assert self.current is not None, f"a DynamoDB call outside any function: {model.name}"
        for action, table, index in self._grants(model.name, params):
            self.calls[self.current].add((f"dynamodb:{action}", self.tables[table], index))

    @staticmethod
    def _grants(operation: str, params: dict[str, Any]) -> Iterator[tuple[str, str, str | None]]:
        if operation == "TransactWriteItems":
            for item in params["TransactItems"]:
                [(kind, request)] = item.items()
                yield _TRANSACT_ACTIONS[kind], request["TableName"], None
        elif operation == "TransactGetItems":
            for item in params["TransactItems"]:
                yield "GetItem", item["Get"]["TableName"], None
        elif operation in ("BatchWriteItem", "BatchGetItem"):
            for table in params["RequestItems"]:
                yield operation, table, None
        else:
            yield operation, params["TableName"], params.get("IndexName")


class Killed(Exception):
    """The function died right after a call DynamoDB applied."""


@dataclass
class Killer:
    """Kills the function once, right after its next PutItem (a keyed consume's claim of its key)."""

    armed: bool = False

    def after_put(self, **_: Any) -> None:
        if self.armed:
            self.armed = False
            raise Killed("after PutItem")


KILLER = Killer()


@pytest.fixture
def recorder(local_shop: Shop, monkeypatch: pytest.MonkeyPatch) -> CallRecorder:
    service = local_shop.service
    meter = CallRecorder({name: logical for logical, name in service.backend.tables.items()})
    hook_dynamodb_clients(monkeypatch, service, {"before-parameter-build.dynamodb": meter.before,
                                                 "after-call.dynamodb.PutItem": KILLER.after_put})
    real_call, real_schedule, real_deliver = Service.call, Service.invoke_schedule, Service.deliver

    def call(self: Service, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        meter.current = self.spec_for(method, path)[0].logical_id
        try:
            return real_call(self, method, path, *args, **kwargs)
        finally:
            meter.current = None

    def invoke_schedule(self: Service, logical_id: str = "ExpirySweepFunction", **kwargs: Any) -> Any:
        meter.current = logical_id
        try:
            return real_schedule(self, logical_id, **kwargs)
        finally:
            meter.current = None

    def deliver(self: Service, event: dict[str, Any]) -> Any:
        # The stream function runs after the request, as its own function (as Lambda runs it).
        caller, meter.current = meter.current, self.stream_spec.logical_id
        try:
            return real_deliver(self, event)
        finally:
            meter.current = caller

    monkeypatch.setattr(Service, "call", call)
    monkeypatch.setattr(Service, "invoke_schedule", invoke_schedule)
    monkeypatch.setattr(Service, "deliver", deliver)
    return meter


def _resource(value: Any) -> tuple[str, str | None]:
    """(table logical id, index name or None) of `!GetAtt T.Arn` or `!Sub "${T.Arn}/index/NAME"`."""
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        logical, attribute = value["Fn::GetAtt"] if isinstance(value["Fn::GetAtt"], list) else \
            value["Fn::GetAtt"].split(".")
        assert attribute == "Arn", value
        return logical, None
    if isinstance(value, dict) and "Fn::Sub" in value:
        text: str = value["Fn::Sub"]
        head, _, index = text.partition("/index/")
        assert head.startswith("${") and head.endswith(".Arn}") and index, value
        return head[2:-5], index
    raise AssertionError(f"a DynamoDB resource written another way: {value!r}")


def granted(logical_id: str) -> set[Grant]:
    """The DynamoDB grants of one function in template.yaml (explicit statements only)."""
    policies = tpl.resources("AWS::Serverless::Function")[logical_id]["Properties"].get("Policies", [])
    grants: set[Grant] = set()
    for policy in policies:
        [(kind, body)] = policy.items()
        assert not kind.startswith("DynamoDB"), f"{logical_id}: {kind} grants more than the code uses"
        if kind != "Statement":
            continue
        for statement in body:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            for action in actions:
                if not action.startswith("dynamodb:"):
                    continue
                assert statement["Effect"] == "Allow"
                grants.update((action, *_resource(resource)) for resource in resources)
    return grants


def _consume(shop: Shop, user: str, group: str, tokens: int, key: str | None = None, **extra: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return shop.service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens, **extra},
                             iam=True, headers=headers)


def _grant(shop: Shop, user: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return shop.service.call("POST", f"/admin/users/{user}/grants", body, iam=True, headers=headers)


def _hold(shop: Shop, user: str, group: str, tokens: int, key: str | None = None, **extra: Any) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return shop.service.call("POST", f"/users/{user}/holds", {"offerGroup": group, "tokens": tokens, **extra},
                             iam=True, headers=headers)


def _settle(shop: Shop, user: str, hold_id: str, tokens: int, **extra: Any) -> Any:
    return shop.service.call("POST", f"/users/{user}/holds/{hold_id}/settle", {"tokens": tokens, **extra}, iam=True)


def _release(shop: Shop, user: str, hold_id: str) -> Any:
    return shop.service.call("POST", f"/users/{user}/holds/{hold_id}/release", iam=True)


def run_holds(shop: Shop, ids: Any, user: str, group: str) -> None:
    """The hold routes down each of their ways (the group has tokens to hold)."""
    # Holds: unkeyed, keyed and its replay, a refusal, a keyed refusal (which gives its claim back).
    below, above, refused = (_hold(shop, user, group, 5).body["holdId"] for _ in range(3))
    keyed = _hold(shop, user, group, 5, key="hold-key")
    assert keyed.status == 201
    assert _hold(shop, user, group, 5, key="hold-key").body == keyed.body
    assert _hold(shop, user, group, 10**9).status == 402
    assert _hold(shop, user, group, 10**9, key="refused-hold-key").status == 402
    # Retries that find their key unfinished, as for consume: one whose first attempt held, one whose
    # first attempt died after claiming its key.
    with shop.service.stream_late():
        assert _hold(shop, user, group, 1, key="late-hold-key").status == 201
        assert _hold(shop, user, group, 1, key="late-hold-key").status == 201
        KILLER.armed = True
        with contextlib.suppress(Killed):
            assert _hold(shop, user, group, 1, key="died-hold-key").status == 500
        assert _hold(shop, user, group, 1, key="died-hold-key").status == 503  # too soon: it may still land
        with time_machine.travel(datetime.now(UTC) + timedelta(minutes=2), tick=True):
            assert _hold(shop, user, group, 1, key="died-hold-key").status == 201
    # Settles: below the hold and its repeat, above it (the excess consumed), refused (the hold stays
    # open, then is released), and on a closed hold.
    assert _settle(shop, user, below, 3).status == 200
    assert _settle(shop, user, below, 3).status == 200
    assert _settle(shop, user, below, 4).status == 409
    assert _settle(shop, user, above, 8).status == 200
    assert _settle(shop, user, refused, 10**9).status == 402
    # Releases: the one left open and its repeat, one after a settle, an unknown hold.
    assert _release(shop, user, refused).status == 200
    assert _release(shop, user, refused).status == 200
    assert _release(shop, user, keyed.body["holdId"]).status == 200
    assert _release(shop, user, below).status == 409
    assert _settle(shop, user, ids("no-hold"), 1).status == 404
    assert _release(shop, user, ids("no-hold")).status == 404
    # At the gate of 16 holds waiting for the book (settled since the last rewrite) a consume, then a
    # hold, folds them first: the closed holds' outcomes archived in one BatchWriteItem.
    gate = ids("g")
    assert _grant(shop, user, {"offerGroup": gate, "tokens": 100}).status == 201
    for writer in ("consume", "hold"):
        for _ in range(MAX_PENDING - 1):
            held = _hold(shop, user, gate, 2).body["holdId"]
            assert _settle(shop, user, held, 1).status == 200
        assert _hold(shop, user, gate, 1).status == 201
        reply = _consume(shop, user, gate, 1) if writer == "consume" else _hold(shop, user, gate, 1)
        assert reply.status in (200, 201), reply.body


def run_every_path(shop: Shop, ids: Any) -> None:
    """Each function down each of its ways to DynamoDB (the statuses only check the path was taken)."""
    call = shop.service.call
    now = datetime.now(UTC)
    user, group = ids("u"), ids("g")
    # Offers, and what a user sees (their paid orders unlock offers).
    offer_id, group = shop.offer(group=group, tokens=100, cycle="monthly")
    free_id, _ = shop.offer(group=group, tokens=5, cycle="daily", prices={"usd": 0})
    assert call("GET", "/admin/offers", iam=True).status == 200
    assert call("GET", "/offers", user=user).status == 200
    # Orders: free (paid at once), keyed (and its replay), unknown.
    assert shop.order(user, free_id).status == 201
    assert shop.order(user, offer_id, key="order-key").status == 201
    assert shop.order(user, offer_id, key="order-key").status == 201
    order = shop.placed(user, offer_id)
    assert call("GET", f"/orders/{order['orderId']}", user=user).status == 200
    assert call("GET", f"/orders/{ids('missing')}", user=user).status == 404
    # The webhook: paid, duplicate, failed then canceled, inconsistent, refunds (through the index too),
    # a refund before its payment.
    assert shop.pay(order).status == 200
    assert shop.pay(order).status == 200
    failed = shop.placed(user, offer_id)
    event = payment_intent_event(shop.intent(failed), event_type="payment_intent.payment_failed")
    assert shop.deliver(event).status == 200
    event = payment_intent_event(shop.intent(failed), event_type="payment_intent.canceled")
    assert shop.deliver(event).status == 200
    odd = shop.placed(user, offer_id)
    assert shop.pay(odd, amount_received=1).status == 200
    assert shop.refund(order, 250).status == 200
    assert shop.refund(order, 500, with_metadata=True).status == 200
    early = shop.placed(user, offer_id)
    assert shop.refund(early, 1000).status == 200
    assert shop.pay(early).status == 200
    # Consume: unkeyed, keyed and its replay, a refusal, a refusal on a due lot, one that expires it.
    assert _consume(shop, user, group, 3).status == 200
    assert _consume(shop, user, group, 3, key="consume-key").status == 200
    assert _consume(shop, user, group, 3, key="consume-key").status == 200
    assert _consume(shop, user, group, 10**9).status == 402
    # Retries that find their key unfinished, before the stream completed it: one whose first attempt
    # debited (the marker answers), one whose first attempt died after claiming its key.
    with shop.service.stream_late():
        assert _consume(shop, user, group, 3, key="late-key").status == 200
        assert _consume(shop, user, group, 3, key="late-key").status == 200
        KILLER.armed = True
        with contextlib.suppress(Killed):
            assert _consume(shop, user, group, 3, key="died-key").status == 500
        assert _consume(shop, user, group, 3, key="died-key").status == 503  # too soon: it may still land
        with time_machine.travel(datetime.now(UTC) + timedelta(minutes=2), tick=True):
            assert _consume(shop, user, group, 3, key="died-key").status == 200
    # A keyed refusal gives its claim back.
    assert _consume(shop, user, group, 10**9, key="refused-key").status == 402
    run_holds(shop, ids, user, group)
    # Holds that expire: one released as its group is next touched, one the sweep releases.
    touched = _hold(shop, user, group, 2, ttlSeconds=60).body["holdId"]
    held = ids("held")
    _grant(shop, user, {"offerGroup": held, "tokens": 10})
    assert _hold(shop, user, held, 4, ttlSeconds=60).status == 201
    # Holds whose lot expires while they are open: closing them rewrites the group.
    fading = ids("fading")
    _grant(shop, user, {"offerGroup": fading, "tokens": 6, "expiresAt": (now + timedelta(hours=1)).isoformat()})
    faded = [_hold(shop, user, fading, 3, ttlSeconds=86400).body["holdId"] for _ in range(2)]
    # Grants: keyed and its replay, negative, and one that expires soon (for the sweep).
    assert _grant(shop, user, {"offerGroup": group, "tokens": 10}, key="grant-key").status == 201
    assert _grant(shop, user, {"offerGroup": group, "tokens": 10}, key="grant-key").status == 201
    assert _grant(shop, user, {"offerGroup": group, "tokens": -1}).status == 201
    soon = ids("soon")
    dated = {"offerGroup": soon, "tokens": 7, "expiresAt": (now + timedelta(days=1)).isoformat()}
    assert _grant(shop, user, dated).status == 201
    # A closed hold waiting for the book there: the sweep's warning folds it, its outcome archived.
    waiting = _hold(shop, user, soon, 1).body["holdId"]
    assert _settle(shop, user, waiting, 1).status == 200
    # Credits and the ledger: whole, per group (a filtered Query), and a second page.
    for path in ("/credits", "/credits/ledger"):
        assert call("GET", path, user=user).status == 200
    assert call("GET", f"/users/{user}/credits", iam=True).status == 200
    page = call("GET", f"/users/{user}/ledger", iam=True, query={"limit": "2"}).body
    second = {"limit": "2", "cursor": page["nextCursor"]}
    assert call("GET", f"/users/{user}/ledger", iam=True, query=second).status == 200
    assert call("GET", f"/users/{user}/ledger", iam=True, query={"offerGroup": group}).status == 200
    # The sweep: a warning now, an expiry two days on, then consumes that find the due lot.
    with time_machine.travel(now, tick=True):
        assert shop.service.invoke_schedule()["warned"] >= 1
    due = ids("due")
    _grant(shop, user, {"offerGroup": due, "tokens": 4, "expiresAt": (now + timedelta(hours=1)).isoformat()})
    with time_machine.travel(now + timedelta(hours=2), tick=True):
        assert _consume(shop, user, due, 1).status == 402
        assert _consume(shop, user, due, 1, maxOverdraft=5).status == 200
        assert _consume(shop, user, group, 1).status == 200
        assert _settle(shop, user, touched, 2).status == 409  # released when it expired
        assert _release(shop, user, faded[0]).status == 200
        assert _settle(shop, user, faded[1], 1, maxOverdraft=5).status == 200
    with time_machine.travel(now + timedelta(days=2), tick=True):
        assert shop.service.invoke_schedule()["expired"] >= 1


def _checkout(shop: Shop, user: str, offer_id: str, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    body = {"offerId": offer_id, "successUrl": "https://shop.example/done", "cancelUrl": "https://shop.example/cart"}
    return shop.service.call("POST", "/checkout", body, user=user, headers=headers)


def _deliver(shop: Shop, events: list[dict[str, Any]]) -> None:
    for event in events:
        assert shop.deliver(event).status == 200, event["type"]


def _renamed(event: dict[str, Any], suffix: str, **changes: Any) -> dict[str, Any]:
    """Another event (a new id) with the same object, some of its fields changed."""
    obj = {**event["data"]["object"], **changes}
    return {**event, "id": f"{event['id']}_{suffix}", "data": {**event["data"], "object": obj}}


def run_subscription_paths(shop: Shop, ids: Any) -> None:
    """Checkout, the portal, the subscription routes, and the webhook's subscription and Checkout events
    down each of their ways (SPEC 2.10, 2.11)."""
    call = shop.service.call
    user, later = ids("u"), ids("u")
    portal = {"returnUrl": "https://shop.example/me"}
    plan_id, group = shop.offer(tokens=1000, cycle="monthly", billing="recurring", kind="subscription",
                                prices={"usd": 2000}, perUserLimit=1)
    once_id, _ = shop.offer(group=group, tokens=50, cycle="once", prices={"usd": 500})
    # The portal before any checkout; GET of no subscriptions.
    assert call("POST", "/billing-portal", portal, user=user).status == 404
    assert call("GET", "/subscriptions", user=user).status == 200
    # Checkout: the first (a Customer is created and stored), keyed and its replay, one that finds the
    # Customer, one refused by the purchase limit, one of a free offer refused (no write).
    plan = _checkout(shop, user, plan_id, key="checkout-key")
    assert plan.status == 201
    assert _checkout(shop, user, plan_id, key="checkout-key").body == plan.body
    once = _checkout(shop, user, once_id)
    assert once.status == 201
    assert _checkout(shop, user, plan_id).status == 409
    free_id, _ = shop.offer(group=group, tokens=5, cycle="once", prices={"usd": 0})
    assert _checkout(shop, user, free_id).status == 422
    assert call("POST", "/billing-portal", portal, user=user).status == 201
    # The plan's page paid: checkout.session.completed (subscription mode: ignored),
    # customer.subscription.created (not used), invoice.paid (the first), and a duplicate.
    started = shop.fake.complete_session(plan.body["sessionId"])
    _deliver(shop, started)
    first_paid = next(e for e in started if e["type"] == "invoice.paid")
    _deliver(shop, [first_paid])
    sub_id = shop.fake.session(plan.body["sessionId"])["subscription"]
    # A renewal (invoice.paid, then customer.subscription.updated), a failed one and its retry paid, an
    # invoice of another amount (inconsistent), an update older than what is known (stale).
    renewal = shop.fake.renew(sub_id)
    _deliver(shop, renewal)
    _deliver(shop, [_renamed(renewal[0], "odd", id="in_odd", amount_paid=1)])
    failing = shop.fake.fail_renewal(sub_id)
    _deliver(shop, failing)
    _deliver(shop, [_renamed(failing[1], "stale", status="active") | {"created": failing[1]["created"] - 60}])
    _deliver(shop, shop.fake.renew(sub_id))
    # Canceled at the period end (updated), then ended (deleted, and its duplicate); a late invoice of
    # the canceled subscription, and a late update.
    cancel = shop.fake.cancel(sub_id, at_period_end=True)
    _deliver(shop, cancel)
    ended = shop.fake.renew(sub_id)
    _deliver(shop, ended + ended)
    _deliver(shop, [_renamed(renewal[0], "late", id="in_late"), _renamed(cancel[0], "late")])
    # Subscription events for no order of ours (no metadata), and for an order that is not a checkout.
    _deliver(shop, [_renamed(renewal[1], "foreign", metadata={}),
                    _renamed(renewal[1], "unknown", metadata={"userId": user, "orderId": ids("o")})])
    # The one-time page: a session that is not ours, the session paid (then its PaymentIntent, a
    # duplicate), a refund of it; another user's one paid with another amount (inconsistent).
    paid = shop.fake.complete_session(once.body["sessionId"])
    completed = next(e for e in paid if e["type"] == "checkout.session.completed")
    _deliver(shop, [_renamed(completed, "foreign", id="cs_test_not_ours")])
    _deliver(shop, paid + paid)
    intent = shop.fake.intent(completed["data"]["object"]["payment_intent"])
    # (With its metadata: a charge without is found through the index only once the order records its
    # PaymentIntent, which a Checkout payment does not yet: tests/test_subscription_faults.py.)
    _deliver(shop, [charge_refunded_event(intent, 200, with_metadata=True)])
    odd = _checkout(shop, later, once_id)
    odd_completed = next(e for e in shop.fake.complete_session(odd.body["sessionId"])
                         if e["type"] == "checkout.session.completed")
    _deliver(shop, [_renamed(odd_completed, "odd", amount_total=1)])
    # What a user and the service read of it.
    assert call("GET", "/subscriptions", user=user).status == 200
    assert call("GET", f"/users/{user}/subscriptions", iam=True).status == 200


def test_each_function_is_granted_exactly_the_dynamodb_calls_it_makes(
    local_shop: Shop, recorder: CallRecorder, ids: Any,
) -> None:
    run_every_path(local_shop, ids)
    run_subscription_paths(local_shop, ids)
    functions = sorted(tpl.resources("AWS::Serverless::Function"))
    problems = []
    for logical_id in functions:
        used, allowed = recorder.calls.get(logical_id, set()), granted(logical_id)
        refused = sorted(used - allowed)
        unused = sorted(allowed - used)
        if refused or unused:
            problems.append(f"{logical_id}: refused in AWS {refused}; granted but unused {unused}")
    assert not problems, "\n".join(problems)
