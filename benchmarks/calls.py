"""Calls and capacity per request: DynamoDB calls, consumed RCU/WCU and Stripe calls for each route.

Every route's success path and main failure paths run in this process against DynamoDB Local, through
the function's real handler and an API Gateway HTTP API v2 event. DynamoDB calls are counted by wrapping
`botocore.client.BaseClient._make_api_call` (inside this process only): pynamodb builds its botocore
clients from per-thread sessions, and the consume path calls the client of pynamodb's connection
directly, so the one place every call passes is the client class. The wrapper adds
`ReturnConsumedCapacity=TOTAL` and sums `ConsumedCapacity` from the responses (DynamoDB Local reports it).
Stripe calls are the requests the local Stripe fake received.

The whole suite runs twice with fresh ids; the second (warm) pass is reported, and any call the first
pass made on top (a cold-start read) is listed apart.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from benchmarks import capacity
from benchmarks.common import (
    CapturedOutput,
    Drained,
    Engine,
    Reply,
    Service,
    StreamRunner,
    function_ready,
    markdown_table,
    new_id,
    percentile,
)

READ_OPS = {"GetItem", "Query", "Scan", "BatchGetItem", "TransactGetItems"}
CAPACITY_OPS = READ_OPS | {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
TRANSACTION_OPS = {"TransactWriteItems", "TransactGetItems"}


@dataclass
class DynamoCall:
    operation: str
    rcu: float | None
    wcu: float | None
    error: str | None
    ms: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    index_wcu: float | None = None  # of `wcu`, what DynamoDB Local charged to indexes
    touched: list[Any] | None = None  # capacity.Touched, while an ImageObserver is attached


def balance_transaction(call: DynamoCall, accounts_table: str) -> bool:
    """A TransactWriteItems that includes a balance item (`GROUP#<group>` in the Accounts table): on AWS
    it would make every concurrent plain write to that item fail with TransactionConflictException."""
    if call.operation != "TransactWriteItems":
        return False
    for entry in call.params.get("TransactItems", []):
        (_action, body), = entry.items()
        key = body.get("Key") or body.get("Item") or {}
        if body.get("TableName") == accounts_table and str(key.get("sk", {}).get("S", "")).startswith("GROUP#"):
            return True
    return False


@dataclass
class CallRecorder:
    """Counts DynamoDB calls made by any botocore client in this process while installed."""

    calls: list[DynamoCall] = field(default_factory=list)
    observer: Any = None  # capacity.ImageObserver: reads each written item before and after its write
    _original: Any = None

    def install(self) -> None:
        from botocore.client import BaseClient
        from botocore.exceptions import ClientError

        original = BaseClient._make_api_call  # type: ignore[attr-defined]
        recorder = self

        def counted(client: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
            if client.meta.service_model.service_name != "dynamodb":
                return original(client, operation_name, api_params)
            params = dict(api_params)
            if operation_name in CAPACITY_OPS:
                params.setdefault("ReturnConsumedCapacity", "INDEXES")
            observer = recorder.observer
            touched = observer.before(original, client, operation_name, api_params) if observer else None
            started = time.perf_counter()
            try:
                response = original(client, operation_name, params)
            except ClientError as error:
                ms = (time.perf_counter() - started) * 1000
                if observer:
                    observer.after(original, client, touched)
                code = str(error.response.get("Error", {}).get("Code", "error"))
                rcu, wcu, index = _capacity(operation_name, error.response.get("ConsumedCapacity"))
                recorder.calls.append(DynamoCall(operation_name, rcu, wcu, code, ms, api_params, index, touched))
                raise
            ms = (time.perf_counter() - started) * 1000
            if observer:
                observer.after(original, client, touched)
            rcu, wcu, index = _capacity(operation_name, response.get("ConsumedCapacity"))
            recorder.calls.append(DynamoCall(operation_name, rcu, wcu, None, ms, api_params, index, touched))
            return response

        self._original = original
        BaseClient._make_api_call = counted  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        from botocore.client import BaseClient

        if self._original is not None:
            BaseClient._make_api_call = self._original  # type: ignore[attr-defined]
            self._original = None

    def take(self) -> list[DynamoCall]:
        taken, self.calls = self.calls, []
        return taken


def drain_attributed(stream: StreamRunner, recorder: CallRecorder) -> tuple[Drained, list[DynamoCall]]:
    """Run the stream function on what the table's stream holds; the DynamoDB calls it made (the pump's
    own reads of the stream go to the `dynamodbstreams` service and are not counted)."""
    made: list[DynamoCall] = []

    def around(invoke: Callable[[], Any]) -> Any:
        recorder.take()  # anything before the handler (the pump's DescribeTable) is not the function's
        try:
            return invoke()
        finally:
            made.extend(recorder.take())

    drained = stream.drain(around)
    recorder.take()
    return drained, made


def _capacity(operation: str, consumed: Any) -> tuple[float | None, float | None, float | None]:
    """(RCU, WCU, of which to indexes) of one response; None when the response reported no capacity."""
    if not consumed:
        return None, None, None
    entries = consumed if isinstance(consumed, list) else [consumed]
    rcu = wcu = index = 0.0
    for entry in entries:
        reads = operation in READ_OPS
        if not reads:
            for gsi in (entry.get("GlobalSecondaryIndexes") or {}).values():
                index += float(gsi.get("WriteCapacityUnits", gsi.get("CapacityUnits", 0.0)))
        if "ReadCapacityUnits" in entry or "WriteCapacityUnits" in entry:
            rcu += float(entry.get("ReadCapacityUnits", 0.0))
            wcu += float(entry.get("WriteCapacityUnits", 0.0))
        elif reads:
            rcu += float(entry.get("CapacityUnits", 0.0))
        else:
            wcu += float(entry.get("CapacityUnits", 0.0))
    return rcu, wcu, index


# ---------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    route: str
    case: str
    function: str  # CodeUri folder name; the scenario is skipped until its handler exists
    run: Callable[[Bench], Reply]
    expect: int
    target: str = ""
    check: Callable[[list[DynamoCall], int], bool] | None = None


@dataclass
class Bench:
    """The state a pass of scenarios shares: the service, the Stripe fake, fresh ids."""

    service: Service
    stripe: Any
    webhook_secret: str
    ids: dict[str, Any] = field(default_factory=dict)

    def id(self, name: str, prefix: str | None = None) -> str:
        if name not in self.ids:
            self.ids[name] = new_id(prefix or name)
        return str(self.ids[name])


def _offer(group: str, *, tokens: int = 100, price: int = 999, cycle: str = "monthly", **extra: Any) -> dict[str, Any]:
    return {"name": "Bench pack", "offerGroup": group, "tokens": tokens, "cycle": cycle,
            "prices": {"usd": price}, **extra}


def _setup(b: Bench) -> None:
    """Offers, a granted balance and an expired group for the pass (not counted)."""
    s = b.service
    if function_ready("admin_offers"):
        s.call("PUT", f"/admin/offers/{b.id('paid', 'offer')}", _offer(b.id("group")), iam=True)
        s.call("PUT", f"/admin/offers/{b.id('free', 'offer')}", _offer(b.id("group"), price=0), iam=True)
        s.call("PUT", f"/admin/offers/{b.id('locked', 'offer')}",
               _offer(b.id("vipgroup"), unlockedBy=[b.id("vip")]), iam=True)
    if function_ready("admin_grants"):
        s.call("POST", f"/admin/users/{b.id('user')}/grants", {"offerGroup": b.id("group"), "tokens": 1_000},
               iam=True)
        # A group of 10 lots: a consume pays for the whole balance item, book included (issue 11).
        for number in range(10):
            s.call("POST", f"/admin/users/{b.id('user')}/grants",
                   {"offerGroup": b.id("biggroup"), "tokens": 100 + number}, iam=True)
    _write_expired_group(b.id("user"), b.id("oldgroup"))
    if function_ready("create_order"):
        for name in ("get-order", "paid-order", "odd-order", "failed-order", "sig-order"):
            _ordered(b, name)
    if function_ready("stripe_webhook"):
        _succeeded(b, "paid-order")
        _succeeded(b, "odd-order", amount_received=1)
        _succeeded(b, "failed-order", event_type="payment_intent.payment_failed")
        _succeeded(b, "sig-order")
    if function_ready("holds") and function_ready("admin_grants"):
        _setup_holds(b)


def max_pending() -> int:
    """Holds with an event not yet in the book, at most, before a hold write forces a rewrite of the group."""
    try:
        from user_credits.store.holds import MAX_PENDING
    except ImportError:
        return 16
    return int(MAX_PENDING)


def _setup_holds(b: Bench) -> None:
    """Groups for the hold scenarios (not counted): `holdgroup` with holds to settle and release; `foldgroup`
    with MAX_PENDING - 1 pairs done and one more hold placed (its settle is the one that must fold the
    holds into the book); `fullgroup` with MAX_PENDING holds open (the next hold must fold them first)."""
    s, user = b.service, b.id("user")
    for group in ("holdgroup", "foldgroup", "fullgroup"):
        s.call("POST", f"/admin/users/{user}/grants", {"offerGroup": b.id(group), "tokens": 1_000}, iam=True)
    for name in ("settle-hold", "excess-hold", "release-hold"):
        b.ids[name] = _placed(_hold(b, "holdgroup", 5))
    for number in range(max_pending() - 1):
        hold_id = _placed(_hold(b, "foldgroup", 2))
        if number == 0:
            b.ids["folded-hold"] = hold_id
        _settle(b, hold_id, 1)
    b.ids["fold-hold"] = _placed(_hold(b, "foldgroup", 2))
    for _ in range(max_pending()):
        _placed(_hold(b, "fullgroup", 2))


def _placed(reply: Reply) -> str:
    if reply.status != 201:
        raise RuntimeError(f"a hold for the hold scenarios answered {reply.status}: {reply.body}")
    return str(reply.body["holdId"])


def _hold(b: Bench, group: str, tokens: int, key: str | None = None) -> Reply:
    headers = {"Idempotency-Key": key} if key else None
    return b.service.call("POST", f"/users/{b.id('user')}/holds", {"offerGroup": b.id(group), "tokens": tokens},
                          iam=True, headers=headers)


def _settle(b: Bench, hold_id: str, tokens: int) -> Reply:
    return b.service.call("POST", f"/users/{b.id('user')}/holds/{hold_id}/settle", {"tokens": tokens}, iam=True)


def _release(b: Bench, hold_id: str) -> Reply:
    return b.service.call("POST", f"/users/{b.id('user')}/holds/{hold_id}/release", iam=True)


def _write_expired_group(user_id: str, group: str) -> None:
    """A group whose one lot of 5 expired an hour ago, written directly (the sweep has not run yet)."""
    from user_credits.domain.lots import Book, NewLot
    from user_credits.store.models import BalanceRecord, BookRecord, book_sk, group_sk

    expired = datetime.now(UTC) - timedelta(hours=1)
    book, _ = Book(group).credit(NewLot("bench", "grant", 5, expired - timedelta(days=1), expired), "grant")
    BalanceRecord(user_id, group_sk(group), offerGroup=group, balance=5, expiresAt=expired, nextExp=expired,
                  bookVer=1).save()
    BookRecord(user_id, book_sk(group), offerGroup=group, book=book.to_record(), ver=1).save()


def _create_order(b: Bench, offer: str, key: str | None = None) -> Reply:
    headers = {"Idempotency-Key": key} if key else None
    return b.service.call("POST", "/orders", {"offerId": b.id(offer, "offer")}, user=b.id("user"), headers=headers)


def _ordered(b: Bench, name: str) -> dict[str, Any]:
    """An order of the paid offer made outside the counted request (for webhook scenarios)."""
    if name not in b.ids:
        b.ids[name] = _create_order(b, "paid").body["order"]
    order: dict[str, Any] = b.ids[name]
    return order


def _webhook(b: Bench, event: dict[str, Any], *, signature: str | None = None) -> Reply:
    from user_credits_dev.stripe_fake import signed_delivery

    payload, header = signed_delivery(event, b.webhook_secret)
    return b.service.call("POST", "/webhooks/stripe", raw_body=payload.decode(),
                          headers={"Stripe-Signature": signature or header})


def _succeeded(b: Bench, order_name: str, **overrides: Any) -> dict[str, Any]:
    from user_credits_dev.stripe_fake import payment_intent_event

    order = _ordered(b, order_name)
    intent = b.stripe.intent(order["paymentIntentId"])
    key = f"{order_name}-event"
    if key not in b.ids:
        b.ids[key] = payment_intent_event(intent, **overrides)
    event: dict[str, Any] = b.ids[key]
    return event


def _refund_event(b: Bench) -> dict[str, Any]:
    from user_credits_dev.stripe_fake import charge_refunded_event

    order = _ordered(b, "paid-order")
    intent = b.stripe.intent(order["paymentIntentId"])
    return charge_refunded_event(intent, amount_refunded=int(intent["amount"]) // 2)


def _consume(b: Bench, body: dict[str, Any], *, user: str | None = None, key: str | None = None) -> Reply:
    headers = {"Idempotency-Key": key} if key else None
    return b.service.call("POST", f"/users/{user or b.id('user')}/consume", body, iam=True, headers=headers)


def _calls_at_most(limit: int) -> Callable[[list[DynamoCall], int], bool]:
    return lambda calls, _stripe: len(calls) <= limit


def _calls_exactly(count: int) -> Callable[[list[DynamoCall], int], bool]:
    return lambda calls, _stripe: len(calls) == count and not any(c.operation in TRANSACTION_OPS for c in calls)


def _no_transaction_within(limit: int) -> Callable[[list[DynamoCall], int], bool]:
    return lambda calls, _stripe: len(calls) <= limit and not any(c.operation in TRANSACTION_OPS for c in calls)


def _webhook_target(calls: list[DynamoCall], _stripe: int) -> bool:
    plain = [c for c in calls if c.operation not in TRANSACTION_OPS]
    tx = [c for c in calls if c.operation in TRANSACTION_OPS]
    return len(plain) <= 3 and len(tx) <= 1


def scenarios() -> list[Scenario]:
    g = "group"
    return [
        Scenario("PUT /admin/offers/{offerId}", "create", "admin_offers",
                 lambda b: b.service.call("PUT", f"/admin/offers/{b.id('new', 'offer')}", _offer(b.id(g)), iam=True),
                 201),
        Scenario("PUT /admin/offers/{offerId}", "update", "admin_offers",
                 lambda b: b.service.call("PUT", f"/admin/offers/{b.id('new', 'offer')}",
                                          _offer(b.id(g), tokens=200), iam=True), 200),
        Scenario("PUT /admin/offers/{offerId}", "invalid body (422)", "admin_offers",
                 lambda b: b.service.call("PUT", f"/admin/offers/{b.id('bad', 'offer')}", {"tokens": "2"}, iam=True),
                 422, "0 calls", _calls_at_most(0)),
        Scenario("GET /admin/offers", "all offers", "admin_offers",
                 lambda b: b.service.call("GET", "/admin/offers", iam=True), 200),
        Scenario("GET /offers", "visible offers", "list_offers",
                 lambda b: b.service.call("GET", "/offers", user=b.id("user")), 200),
        Scenario("GET /offers", "no JWT (401)", "list_offers",
                 lambda b: b.service.call("GET", "/offers"), 401, "0 calls", _calls_at_most(0)),
        Scenario("POST /orders", "paid offer", "create_order", lambda b: _create_order(b, "paid"), 201,
                 "1 Stripe call", lambda _c, stripe: stripe == 1),
        Scenario("POST /orders", "Idempotency-Key first", "create_order",
                 lambda b: _create_order(b, "paid", key=b.id("order-key")), 201),
        Scenario("POST /orders", "Idempotency-Key replay", "create_order",
                 lambda b: _create_order(b, "paid", key=b.id("order-key")), 201, "0 Stripe calls",
                 lambda _c, stripe: stripe == 0),
        Scenario("POST /orders", "free offer (paid at once)", "create_order", lambda b: _create_order(b, "free"), 201,
                 "0 Stripe calls", lambda _c, stripe: stripe == 0),
        Scenario("POST /orders", "locked offer (409)", "create_order", lambda b: _create_order(b, "locked"), 409,
                 "0 Stripe calls", lambda _c, stripe: stripe == 0),
        Scenario("POST /orders", "unknown offer (404)", "create_order", lambda b: _create_order(b, "nosuch"), 404,
                 "0 Stripe calls", lambda _c, stripe: stripe == 0),
        Scenario("POST /orders", "bad currency (422)", "create_order",
                 lambda b: b.service.call("POST", "/orders", {"offerId": b.id("paid", "offer"), "currency": "xyz"},
                                          user=b.id("user")), 422, "0 Stripe calls", lambda _c, stripe: stripe == 0),
        Scenario("GET /orders/{orderId}", "own order", "create_order",
                 lambda b: b.service.call("GET", f"/orders/{_ordered(b, 'get-order')['orderId']}", user=b.id("user")),
                 200),
        Scenario("GET /orders/{orderId}", "someone else's (404)", "create_order",
                 lambda b: b.service.call("GET", f"/orders/{_ordered(b, 'get-order')['orderId']}",
                                          user=b.id("other")), 404),
        Scenario("POST /webhooks/stripe", "payment_intent.succeeded (purchase)", "stripe_webhook",
                 lambda b: _webhook(b, _succeeded(b, "paid-order")), 200, "<= 3 calls + 1 transaction",
                 _webhook_target),
        Scenario("POST /webhooks/stripe", "same event again (duplicate)", "stripe_webhook",
                 lambda b: _webhook(b, _succeeded(b, "paid-order")), 200),
        Scenario("POST /webhooks/stripe", "amount mismatch (inconsistent)", "stripe_webhook",
                 lambda b: _webhook(b, _succeeded(b, "odd-order", amount_received=1)), 200),
        Scenario("POST /webhooks/stripe", "payment_failed", "stripe_webhook",
                 lambda b: _webhook(b, _succeeded(b, "failed-order", event_type="payment_intent.payment_failed")),
                 200),
        Scenario("POST /webhooks/stripe", "charge.refunded (half)", "stripe_webhook",
                 lambda b: _webhook(b, _refund_event(b)), 200),
        Scenario("POST /webhooks/stripe", "bad signature (400)", "stripe_webhook",
                 lambda b: _webhook(b, _succeeded(b, "sig-order"), signature="t=1,v1=00"), 400, "0 calls",
                 _calls_at_most(0)),
        Scenario("POST /users/{userId}/consume", "success", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id(g), "tokens": 1}), 200, "1 call, no transaction",
                 _calls_exactly(1)),
        Scenario("POST /users/{userId}/consume", "success, group of 10 lots", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id("biggroup"), "tokens": 1}), 200, "1 call, no transaction",
                 _calls_exactly(1)),
        Scenario("POST /users/{userId}/consume", "insufficient (402)", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id(g), "tokens": 1_000_000}), 402, "<= 2 calls",
                 _calls_at_most(2)),
        Scenario("POST /users/{userId}/consume", "unknown group (402)", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id("nogroup"), "tokens": 1}), 402, "<= 2 calls",
                 _calls_at_most(2)),
        Scenario("POST /users/{userId}/consume", "expired group (402)", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id("oldgroup"), "tokens": 1}), 402, "<= 2 calls",
                 _calls_at_most(2)),
        Scenario("POST /users/{userId}/consume", "Idempotency-Key first", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id(g), "tokens": 1}, key=b.id("consume-key")), 200,
                 "<= 2 calls, no transaction", _no_transaction_within(2)),
        Scenario("POST /users/{userId}/consume", "Idempotency-Key replay", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id(g), "tokens": 1}, key=b.id("consume-key")), 200,
                 "1 call", _calls_exactly(1)),
        Scenario("POST /users/{userId}/consume", "key reused, other body (422)", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id(g), "tokens": 2}, key=b.id("consume-key")), 422),
        Scenario("POST /users/{userId}/consume", "key retried before the stream ran (rare path)", "consume",
                 _consume_retried_early, 200),
        Scenario("POST /users/{userId}/consume", "with overdraft", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id(g), "tokens": 1_010, "maxOverdraft": 100}), 200,
                 "1 call, no transaction", _calls_exactly(1)),
        Scenario("POST /users/{userId}/consume", "invalid body (422)", "consume",
                 lambda b: _consume(b, {"offerGroup": b.id(g), "tokens": 0}), 422, "0 calls", _calls_at_most(0)),
        Scenario("GET /credits", "own credits", "get_credits",
                 lambda b: b.service.call("GET", "/credits", user=b.id("user")), 200, "1 call", _calls_at_most(1)),
        Scenario("GET /users/{userId}/credits", "service", "get_credits",
                 lambda b: b.service.call("GET", f"/users/{b.id('user')}/credits", iam=True), 200, "1 call",
                 _calls_at_most(1)),
        Scenario("GET /users/{userId}/credits", "without IAM (403)", "get_credits",
                 lambda b: b.service.call("GET", f"/users/{b.id('user')}/credits"), 403, "0 calls",
                 _calls_at_most(0)),
        Scenario("GET /credits/ledger", "newest first", "get_credits",
                 lambda b: b.service.call("GET", "/credits/ledger", user=b.id("user")), 200),
        Scenario("GET /users/{userId}/ledger", "one group, limit 10", "get_credits",
                 lambda b: b.service.call("GET", f"/users/{b.id('user')}/ledger", iam=True,
                                          query={"offerGroup": b.id(g), "limit": "10"}), 200),
        Scenario("POST /admin/users/{userId}/grants", "grant", "admin_grants",
                 lambda b: b.service.call("POST", f"/admin/users/{b.id('user')}/grants",
                                          {"offerGroup": b.id(g), "tokens": 50}, iam=True), 201),
        Scenario("POST /admin/users/{userId}/grants", "Idempotency-Key replay", "admin_grants",
                 _grant_twice, 201),
        *hold_scenarios(),
    ]


HOLD, SETTLE, RELEASE = ("POST /users/{userId}/holds", "POST /users/{userId}/holds/{holdId}/settle",
                         "POST /users/{userId}/holds/{holdId}/release")
HOLD_ROUTES = (HOLD, SETTLE, RELEASE)
HOLD_TARGET = "<= 2 calls, no transaction"


def hold_scenarios() -> list[Scenario]:
    """Issue 12: a hold and its settle each at most 2 DynamoDB calls, never a transaction that includes the
    balance item. The last three cases are the ones a group reaches after MAX_PENDING holds: the write that
    would make it MAX_PENDING + 1 pending holds rewrites the group first: plain writes since the fold is made
    without a transaction (`store.balances.rewrite_group`: the closed holds' outcomes archived, the new book
    prepared on the book item, the balance item swung to it, the book promoted), so more than 2 calls."""
    limit = _no_transaction_within(2)
    pending = max_pending()
    return [
        Scenario(HOLD, "unkeyed", "holds", lambda b: _hold(b, "holdgroup", 2), 201, HOLD_TARGET, limit),
        Scenario(HOLD, "Idempotency-Key first", "holds", lambda b: _hold(b, "holdgroup", 2, key=b.id("hold-key")),
                 201, HOLD_TARGET, limit),
        Scenario(HOLD, "Idempotency-Key replay", "holds", lambda b: _hold(b, "holdgroup", 2, key=b.id("hold-key")),
                 201, HOLD_TARGET, limit),
        Scenario(HOLD, "insufficient (402)", "holds", lambda b: _hold(b, "holdgroup", 1_000_000), 402, HOLD_TARGET,
                 limit),
        Scenario(SETTLE, "below the hold (returns the rest)", "holds", lambda b: _settle(b, b.ids["settle-hold"], 3),
                 200, HOLD_TARGET, limit),
        Scenario(SETTLE, "same settle again (replay)", "holds", lambda b: _settle(b, b.ids["settle-hold"], 3), 200,
                 HOLD_TARGET, limit),
        Scenario(SETTLE, "other tokens on a settled hold (409)", "holds",
                 lambda b: _settle(b, b.ids["settle-hold"], 4), 409, HOLD_TARGET, limit),
        Scenario(SETTLE, "above the hold (consumes the excess)", "holds",
                 lambda b: _settle(b, b.ids["excess-hold"], 8), 200, HOLD_TARGET, limit),
        Scenario(SETTLE, "unknown hold (404)", "holds",
                 lambda b: _settle(b, f"{'0' * 20}-5-{b.id('holdgroup')}", 5), 404, HOLD_TARGET, limit),
        Scenario(RELEASE, "release", "holds", lambda b: _release(b, b.ids["release-hold"]), 200, HOLD_TARGET, limit),
        Scenario(RELEASE, "release again (replay)", "holds", lambda b: _release(b, b.ids["release-hold"]), 200,
                 HOLD_TARGET, limit),
        Scenario(SETTLE, f"settle of the {pending}th hold since the group's last rewrite (forced rewrite)", "holds",
                 lambda b: _settle(b, b.ids["fold-hold"], 1), 200, HOLD_TARGET, limit),
        Scenario(SETTLE, "replay of a settle the rewrite folded out of the item (remembered outcome)", "holds",
                 lambda b: _settle(b, b.ids["folded-hold"], 1), 200, HOLD_TARGET, limit),
        Scenario(HOLD, f"with {pending} holds open (forced rewrite)", "holds", lambda b: _hold(b, "fullgroup", 2),
                 201, HOLD_TARGET, limit),
    ]


def _consume_retried_early(b: Bench) -> Reply:
    """A keyed consume retried before the stream completed its record (the first attempt is made
    uncounted; no drain runs between the two): the one path of a consume with a transaction."""
    body = {"offerGroup": b.id("group"), "tokens": 1}
    if "early-key-first" not in b.ids:
        b.ids["early-key-first"] = True
        b.ids["_reset"] = True
    return _consume(b, body, key=b.id("early-key"))


def _grant_twice(b: Bench) -> Reply:
    """The first grant with the key is made before counting, so the counted request is the replay."""
    body = {"offerGroup": b.id("group"), "tokens": 7}
    headers = {"Idempotency-Key": b.id("grant-key")}
    path = f"/admin/users/{b.id('user')}/grants"
    if "grant-key-first" not in b.ids:
        b.ids["grant-key-first"] = True
        b.service.call("POST", path, body, iam=True, headers=headers)
        b.ids["_reset"] = True
    return b.service.call("POST", path, body, iam=True, headers=headers)


def summarise(calls: list[DynamoCall], accounts_table: str) -> dict[str, Any]:
    """Counts and capacity of a list of calls (one request's, or the stream function's for it)."""
    ops: dict[str, int] = {}
    for call in calls:
        label = call.operation + (f"!{call.error}" if call.error else "")
        ops[label] = ops.get(label, 0) + 1
    return {
        "dynamodb_calls": len(calls),
        "transactions": sum(1 for c in calls if c.operation in TRANSACTION_OPS),
        "balance_transactions": sum(1 for c in calls if balance_transaction(c, accounts_table)),
        "operations": ops,
        "call_detail": [[c.operation, c.rcu, c.wcu, c.error] for c in calls],
        "wcu_aws_estimate": sum((c.wcu or 0.0) / (_TX_FACTOR if c.operation in TRANSACTION_OPS else 1.0)
                                for c in calls),
        "rcu": sum(c.rcu or 0.0 for c in calls),
        "wcu": sum(c.wcu or 0.0 for c in calls),
        "calls_without_capacity": sum(1 for c in calls if c.rcu is None and c.wcu is None),
        "dynamodb_ms": sum(c.ms for c in calls),
    }


def _run_pass(service: Service, stripe: Any, recorder: CallRecorder, secret: str,
              stream: StreamRunner) -> list[dict[str, Any]]:
    accounts = service.tables["AccountsTable"]
    b = Bench(service, stripe, secret)
    try:
        _setup(b)
    except Exception as error:  # setup needs features that may not have landed; scenarios report it
        b.ids["_setup_error"] = f"{type(error).__name__}: {error}"
    rows = []
    for scenario in scenarios():
        row: dict[str, Any] = {"route": scenario.route, "case": scenario.case, "function": scenario.function,
                               "target": scenario.target, "expected_status": scenario.expect}
        if not function_ready(scenario.function):
            rows.append({**row, "measured": False, "note": f"functions/{scenario.function} not landed"})
            continue
        drain_attributed(stream, recorder)  # what the setup or the previous scenario left is not this one's
        recorder.take()
        stripe_before = len(stripe.requests) if stripe is not None else 0
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            reply = scenario.run(b)
            if b.ids.pop("_reset", False):  # the scenario made an uncounted warm-up request first
                recorder.take()
                stripe_before = len(stripe.requests) if stripe is not None else 0
                wall, cpu = time.perf_counter(), time.process_time()
                reply = scenario.run(b)
            wall_ms, cpu_ms = (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000
        except Exception as error:
            rows.append({**row, "measured": False, "note": f"error: {type(error).__name__}: {error}",
                         "trace": traceback.format_exc(limit=3)})
            recorder.take()
            continue
        calls = recorder.take()
        stripe_calls = (len(stripe.requests) - stripe_before) if stripe is not None else 0
        # Then Lambda's event source mapping: the stream function on the records this request wrote.
        drained, stream_calls = drain_attributed(stream, recorder)
        rows.append({
            **row,
            "measured": True,
            "status": reply.status,
            "error_code": reply.body.get("error") if isinstance(reply.body, dict) else None,
            "status_ok": reply.status == scenario.expect,
            **summarise(calls, accounts),
            "stripe_calls": stripe_calls,
            "wall_ms": wall_ms,
            "cpu_ms": cpu_ms,
            "target_met": scenario.check(calls, stripe_calls) if scenario.check else None,
            "stream": {"records": drained.records, "changes": drained.changes, "failed_items": drained.failed_items,
                       "ms": drained.seconds * 1000, **summarise(stream_calls, accounts)},
        })
    if "_setup_error" in b.ids:
        rows.append({"route": "(setup)", "case": "offers/grant/expired group", "measured": False,
                     "note": b.ids["_setup_error"]})
    return rows


# How much more than AWS's documented price DynamoDB Local reports for a transactional write; set by
# `calibrate` (AWS documents 2 WCU per transactional write of an item up to 1 KB).
_TX_FACTOR = 1.0


def calibrate(engine: Engine) -> dict[str, Any]:
    """DynamoDB Local's capacity accounting for known requests, next to AWS's documented figures."""
    global _TX_FACTOR
    client = engine.client()
    # The idempotency table: a key-only table whose items are only ever read by their exact key.
    table = engine.tables["IdempotencyTable"]
    plain = client.put_item(TableName=table, Item={"key": {"S": new_id("calibration")}},
                            ReturnConsumedCapacity="TOTAL")["ConsumedCapacity"]["CapacityUnits"]
    tx = client.transact_write_items(
        TransactItems=[{"Put": {"TableName": table, "Item": {"key": {"S": new_id("calibration")}}}}],
        ReturnConsumedCapacity="TOTAL",
    )["ConsumedCapacity"][0]["CapacityUnits"]
    read = client.get_item(TableName=table, Key={"key": {"S": new_id("calibration")}}, ConsistentRead=True,
                           ReturnConsumedCapacity="TOTAL")["ConsumedCapacity"]["CapacityUnits"]
    _TX_FACTOR = float(tx) / 2.0 if tx else 1.0
    return {
        "rows": [
            ["PutItem, item < 1 KB, no index", plain, 1.0],
            ["TransactWriteItems, one Put < 1 KB, no index", tx, 2.0],
            ["GetItem, strongly consistent, no item", read, 1.0],
        ],
        "transaction_factor": _TX_FACTOR,
    }


def consume_breakdown(engine: Engine, service: Service, recorder: CallRecorder, requests: int) -> dict[str, Any]:
    """Where one uncontended consume's time goes: sequential requests in this process, each DynamoDB
    call timed, next to the same number of bare conditional UpdateItems on the same engine."""
    from user_credits_dev.lambda_events import LambdaContext

    user = new_id("breakdown")
    service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": "bd", "tokens": 10**9}, iam=True)
    handler, spec, _route = service.handler_for("POST", f"/users/{user}/consume")
    totals: list[float] = []
    per_op: dict[str, list[float]] = {}
    outside: list[float] = []
    recorder.take()
    for _ in range(requests):
        event = service.event("POST", f"/users/{user}/consume", {"offerGroup": "bd", "tokens": 1}, iam=True)
        started = time.perf_counter()
        status = handler(event, LambdaContext(function_name=spec.logical_id))["statusCode"]
        total = (time.perf_counter() - started) * 1000
        calls = recorder.take()
        if status != 200:
            continue
        totals.append(total)
        outside.append(total - sum(c.ms for c in calls))
        for call in calls:
            per_op.setdefault(call.operation, []).append(call.ms)
    client = engine.client()
    key = {"userId": {"S": new_id("floor")}, "sk": {"S": "GROUP#bd"}}
    table = engine.tables["AccountsTable"]
    client.put_item(TableName=table, Item={**key, "balance": {"N": str(10**9)}})
    recorder.take()
    floor: list[float] = []
    for _ in range(requests):
        started = time.perf_counter()
        client.update_item(TableName=table, Key=key, UpdateExpression="ADD #b :m", ConditionExpression="#b >= :t",
                           ExpressionAttributeNames={"#b": "balance"},
                           ExpressionAttributeValues={":m": {"N": "-1"}, ":t": {"N": "1"}})
        floor.append((time.perf_counter() - started) * 1000)
    recorder.take()
    return {
        "requests": requests,
        "consume_ms": {"p50": percentile(totals, 50), "p99": percentile(totals, 99), "n": len(totals)},
        "operations_ms": {op: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
                          for op, v in per_op.items()},
        "outside_dynamodb_ms": {"p50": percentile(outside, 50), "p99": percentile(outside, 99)},
        "floor_ms": {"p50": percentile(floor, 50), "p99": percentile(floor, 99), "n": len(floor)},
    }


def run(engine: Engine, *, breakdown_requests: int = 200) -> dict[str, Any]:
    import warnings

    from user_credits_dev import stripe_fake

    warnings.filterwarnings("ignore", message="No application metrics to publish")
    calibration = calibrate(engine)

    secret = "whsec_bench"
    fake = stripe_fake.FakeStripe().start()
    import os

    os.environ["STRIPE_API_BASE"] = fake.base_url
    os.environ["STRIPE_WEBHOOK_SECRET"] = secret
    service = Service(engine.endpoint, engine.tables)
    os.environ["STRIPE_API_BASE"] = fake.base_url
    stream = StreamRunner(engine.endpoint, engine.tables)
    stream.skip_to_now()
    recorder = CallRecorder()
    recorder.install()
    output = CapturedOutput()
    try:
        started = time.perf_counter()
        with output:
            cold = _run_pass(service, fake, recorder, secret, stream)
            warm = _run_pass(service, fake, recorder, secret, stream)
            ready = function_ready("consume") and function_ready("admin_grants")
            model = capacity.model(service, recorder, stream) if ready else None
            breakdown = consume_breakdown(engine, service, recorder, breakdown_requests) if ready else None
        elapsed = time.perf_counter() - started
    finally:
        recorder.uninstall()
        fake.stop()
    extra = []
    for first, second in zip(cold, warm, strict=True):
        if first.get("measured") and second.get("measured") and first["dynamodb_calls"] != second["dynamodb_calls"]:
            extra.append({"route": first["route"], "case": first["case"], "cold_calls": first["dynamodb_calls"],
                          "warm_calls": second["dynamodb_calls"], "cold_operations": first["operations"]})
    return {"rows": warm, "cold_differences": extra, "seconds": elapsed, "calibration": calibration,
            "handler_errors": output.error_lines(), "consume_breakdown": breakdown, "capacity": model,
            "stream_total": vars(stream.total), "stream_errors": stream.errors}


CONSUME = "POST /users/{userId}/consume"
CONSUME_TARGETS: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "success": ("1", lambda r: r["dynamodb_calls"] == 1 and r["transactions"] == 0),
    "success, group of 10 lots": ("1", lambda r: r["dynamodb_calls"] == 1 and r["transactions"] == 0),
    "Idempotency-Key first": ("<= 2", lambda r: r["dynamodb_calls"] <= 2 and r["transactions"] == 0),
    "Idempotency-Key replay": ("1", lambda r: r["dynamodb_calls"] == 1 and r["transactions"] == 0),
    "insufficient (402)": ("<= 2", lambda r: r["dynamodb_calls"] <= 2 and r["transactions"] == 0),
}


def _ops(operations: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in operations.items()) or "none"


def hold_table(result: dict[str, Any]) -> str:
    """Calls per hold, settle and release (issue 12): the request's, and the stream function's for it."""
    rows = []
    for r in result["rows"]:
        if r.get("route") not in HOLD_ROUTES or not r.get("measured"):
            continue
        st = r["stream"]
        verdict = "-" if r["target_met"] is None else ("met" if r["target_met"] else "**NOT MET**")
        if not r["status_ok"]:
            verdict += f" (status {r['status']}, expected {r['expected_status']})"
        rows.append([r["route"].removeprefix("POST /users/{userId}/holds") or "POST .../holds", r["case"],
                     r["status"], r["dynamodb_calls"], _ops(r["operations"]), r["transactions"],
                     r["balance_transactions"], st["dynamodb_calls"], _ops(st["operations"]),
                     st["balance_transactions"], r["dynamodb_calls"] + st["dynamodb_calls"], r["target"], verdict])
    return markdown_table(
        ["route", "case", "status", "request: calls", "request: ops", "request: transactions",
         "request: tx incl. a balance item", "stream: calls", "stream: ops", "stream: tx incl. a balance item",
         "calls in all", "target (request)", "met"], rows)


def consume_table(result: dict[str, Any]) -> str:
    """Calls per consume: the request's, and the stream function's for the records it wrote."""
    rows = []
    for r in result["rows"]:
        if r.get("route") != CONSUME or not r.get("measured"):
            continue
        st = r["stream"]
        target = CONSUME_TARGETS.get(r["case"])
        limit = target[0] if target else "-"
        verdict = "-" if target is None else ("met" if target[1](r) else "**NOT MET**")
        rows.append([r["case"], r["status"], r["dynamodb_calls"], _ops(r["operations"]), r["transactions"],
                     r["balance_transactions"], st["dynamodb_calls"], _ops(st["operations"]),
                     st["balance_transactions"], r["dynamodb_calls"] + st["dynamodb_calls"], limit, verdict])
    return markdown_table(
        ["consume case", "status", "request: calls", "request: ops", "request: transactions",
         "request: tx incl. a balance item", "stream: calls", "stream: ops", "stream: tx incl. a balance item",
         "calls in all", "target (request calls, no tx)", "met"], rows)


def markdown(result: dict[str, Any]) -> str:
    out = [
        "Calls per consume: the request (through the consume handler), then the stream function on the records "
        "that request wrote (a StreamPump delivering the Accounts table's stream to functions/ledger_stream in "
        "this process, with the same call recorder). `tx incl. a balance item` counts TransactWriteItems that "
        "include a `GROUP#` item of the Accounts table: each would make concurrent consumes of that balance fail "
        "with TransactionConflictException on AWS.",
        "",
        consume_table(result),
        "",
        "Calls per hold, settle and release (issue 12: each at most 2 DynamoDB calls and never a transaction that "
        f"includes the balance item). A group's holds wait on its balance item until a rewrite folds them into the "
        f"book; the write that would make more than {max_pending()} of them wait rewrites the group first: the "
        f"last cases, reached once every {max_pending()} pairs of a balance with nothing else rewriting it.",
        "",
        hold_table(result),
        "",
        "Every route. Warm pass (the second of two with fresh ids). `ops` lists DynamoDB operations (`!Code` = "
        "the call failed with that error; DynamoDB Local reports no capacity for failed calls, although real "
        "DynamoDB charges conditional-check failures as writes). Capacity as reported by DynamoDB Local with "
        "`ReturnConsumedCapacity=INDEXES`; `WCU (AWS)` divides transactional WCU by the factor measured below, "
        "the rest is as reported. `ms` = one request's wall time (all / inside DynamoDB calls) and `CPU ms` "
        "= this process's CPU time for it (one sample each, on a shared machine: indicative only). A row "
        "`-> stream` follows every request whose records made the stream function do something: its calls, and "
        "`ms` = the drain's wall time.",
        "",
    ]
    rows = []
    for r in result["rows"]:
        if not r.get("measured"):
            rows.append([r["route"], r["case"], "not measured", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         r.get("note", ""), r.get("target", ""), "-"])
            continue
        status = f"{r['status']}" + (f" {r['error_code']}" if r["error_code"] else "")
        if not r["status_ok"]:
            status += f" (expected {r['expected_status']})"
        target = r["target"] or ""
        verdict = "-" if r["target_met"] is None else ("met" if r["target_met"] else "**NOT MET**")
        rows.append([r["route"], r["case"], status, r["dynamodb_calls"], r["transactions"],
                     r["balance_transactions"], f"{r['rcu']:.1f}", f"{r['wcu']:.1f}", f"{r['wcu_aws_estimate']:.1f}",
                     r["stripe_calls"], f"{r['wall_ms']:.0f} / {r['dynamodb_ms']:.0f}", f"{r['cpu_ms']:.1f}",
                     _ops(r["operations"]), target, verdict])
        st = r["stream"]
        if st["dynamodb_calls"] or st["changes"] or st["failed_items"]:
            note = f"{st['records']} record(s), {st['changes']} with a change"
            if st["failed_items"]:
                note += f", **{st['failed_items']} failed**"
            rows.append(["-> stream (LedgerStreamFunction)", note, "-", st["dynamodb_calls"], st["transactions"],
                         st["balance_transactions"], f"{st['rcu']:.1f}", f"{st['wcu']:.1f}",
                         f"{st['wcu_aws_estimate']:.1f}", "-", f"{st['ms']:.0f} / {st['dynamodb_ms']:.0f}", "-",
                         _ops(st["operations"]), "", "-"])
    out.append(markdown_table(
        ["route", "case", "status", "DynamoDB calls", "of which tx", "tx incl. a balance item", "RCU",
         "WCU (Local)", "WCU (AWS)", "Stripe calls", "ms (all / in DynamoDB)", "CPU ms", "ops", "target", "met"],
        rows,
    ))
    if result.get("capacity"):
        out += ["", "Capacity model of a consume (issue 11):", "", capacity.markdown(result["capacity"])]
    if result["handler_errors"]:
        out += ["", "ERROR records the handlers logged during the two passes (expected for the failure cases "
                "that log, e.g. an inconsistent payment; anything else is a product problem):", ""]
        counts: dict[str, int] = {}
        for line in result["handler_errors"]:
            counts[line] = counts.get(line, 0) + 1
        out += [f"- {line} (x{n})" for line, n in counts.items()]
    if result.get("stream_errors"):
        out += ["", "ERROR records the stream function logged: "
                + "; ".join(f"{k} (x{v})" for k, v in result["stream_errors"].items())]
    bd = result.get("consume_breakdown")
    if bd:
        out += ["", f"Where an uncontended consume's time goes ({bd['requests']} sequential requests in one "
                "process, milliseconds; `floor` = a bare conditional UpdateItem on the same engine):", ""]
        lines = [["consume handler, whole request", bd["consume_ms"]["p50"], bd["consume_ms"]["p99"]]]
        lines += [[f"  DynamoDB {op}", v["p50"], v["p99"]] for op, v in bd["operations_ms"].items()]
        lines.append(["  outside DynamoDB (routing, validation, logging, metrics)", bd["outside_dynamodb_ms"]["p50"],
                      bd["outside_dynamodb_ms"]["p99"]])
        lines.append(["floor: conditional UpdateItem", bd["floor_ms"]["p50"], bd["floor_ms"]["p99"]])
        out.append(markdown_table(["what", "p50 ms", "p99 ms"],
                                  [[a, f"{b:.2f}", f"{c:.2f}"] for a, b, c in lines]))
    cal = result["calibration"]
    out += ["", "DynamoDB Local's capacity accounting against AWS's documented figures (transaction factor "
            f"{cal['transaction_factor']:.1f}):", ""]
    out.append(markdown_table(["request", "DynamoDB Local reports", "AWS documents"], cal["rows"]))
    if result["cold_differences"]:
        out += ["", "Extra calls on the first (cold) pass:", ""]
        out.append(markdown_table(
            ["route", "case", "cold calls", "warm calls", "cold ops"],
            [[d["route"], d["case"], d["cold_calls"], d["warm_calls"], json.dumps(d["cold_operations"])]
             for d in result["cold_differences"]],
        ))
    return "\n".join(out)
