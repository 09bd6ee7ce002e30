"""SPEC 2.8 and 2.6 on DynamoDB Local: the expiry sweep and order creation fail at every DynamoDB call
(killed, TransactionCanceled, throttled; before the call or after DynamoDB applied it), the caller
retries as it would (the scheduler runs the sweep again, a client resends), and nothing is lost or
applied twice: balance == sum of the ledger, one `expire` entry per expiry, orders agree with the ledger.

Webhook, refund, keyed-order (killed after a call), consume and grant crashes are covered by
tests/test_purchase_exactly_once.py, tests/test_consume_faults.py and tests/test_grants.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import time_machine
from conftest import Backend, EventRecorder, Service
from crash_faults import KINDS, PHASES, Died, Fault, dynamodb_faults

from user_credits.domain.clock import to_iso
from user_credits.logic.invariants import check_user
from user_credits.store.balances import read_group
from user_credits.store.models import LedgerRecord
from user_credits.store.orders import list_orders
from user_credits_dev import template as tpl

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
            # The event comes from the expiry's own write (the stream): never lost, never doubled here.
            sent = [e for e in service.events.of_type("CreditsExpired") if e["userId"] == user]
            assert len(sent) == 1, (at, sent)
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


# ---------------------------------------------------------------- Stripe fails during order creation


class SlowStripe:
    """A proxy in front of the Stripe fake that forwards each request (so Stripe does create the
    PaymentIntent) and holds back the answer of the first `slow` requests for `delay` seconds: the
    SDK times out and the function never learns the PaymentIntent's id."""

    def __init__(self, upstream: str, slow: int, delay: float) -> None:
        self.upstream = urlsplit(upstream)
        self.slow, self.delay, self.forwarded = slow, delay, 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SlowStripe:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                connection = http.client.HTTPConnection(proxy.upstream.hostname or "", proxy.upstream.port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request("POST", self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                with proxy.lock:
                    proxy.forwarded += 1
                    hold = proxy.forwarded <= proxy.slow
                if hold:
                    time.sleep(proxy.delay)
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up waiting
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler


def stripe_sdk_timeout(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The SDK's HTTP timeout (80 s by default), made short so that a test can wait for it."""
    import stripe._http_client as http_clients

    from user_credits.payments import gateway

    original = http_clients.RequestsClient.__init__

    def short(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["timeout"] = seconds
        original(self, *args, **kwargs)

    monkeypatch.setattr(http_clients.RequestsClient, "__init__", short)
    monkeypatch.setattr(gateway, "_clients", {})  # clients built with the old timeout


def assert_nothing_stored(shop: Shop, user: str, key: str) -> None:
    from user_credits.logic.purchases import order_id_for

    assert list_orders(user) == []
    reply = shop.service.call("GET", f"/orders/{order_id_for(user, key)}", user=user)
    assert reply.status == 404 and reply.error == "order_not_found", reply.body


def assert_failed_with_error_shape(reply: Any) -> None:
    assert (reply.status, reply.error) in ((502, "payment_provider_error"), (503, "service_unavailable")), reply
    assert isinstance(reply.body.get("message"), str) and reply.body["message"], reply.body
    assert "clientSecret" not in json.dumps(reply.body)


def assert_retry_succeeds_with_one_intent(shop: Shop, user: str, offer_id: str, key: str, created_before: int) -> None:
    retry = shop.order(user, offer_id, key=key)
    assert retry.status == 201, retry.body
    order = retry.body["order"]
    assert shop.fake.created_count() == created_before + 1
    intents = [i for i in shop.fake.intents.values() if i["metadata"].get("userId") == user]
    assert [i["id"] for i in intents] == [order["paymentIntentId"]] == [o.payment_intent_id for o in list_orders(user)]
    assert intents[0]["amount"] == order["amount"] and intents[0]["metadata"]["orderId"] == order["orderId"]
    assert shop.order(user, offer_id, key=key).body == retry.body


@pytest.mark.parametrize("status", [500, 503, 400])
def test_a_stripe_error_is_a_5xx_that_stores_nothing_and_the_retry_with_its_key_creates_one_intent(
    local_shop: Shop, ids: Any, status: int
) -> None:
    shop = local_shop
    offer_id, _ = shop.offer()
    user, key = ids("u"), ids("k")
    created_before = shop.fake.created_count()
    # Stripe says not to retry these (Stripe-Should-Retry: false), so the SDK makes this one call.
    shop.fake.fail_next(status)
    assert_failed_with_error_shape(shop.order(user, offer_id, key=key))
    assert shop.fake.created_count() == created_before
    assert_nothing_stored(shop, user, key)
    assert_retry_succeeds_with_one_intent(shop, user, offer_id, key, created_before)


def test_a_stripe_timeout_after_stripe_created_the_intent_stores_nothing_and_the_retry_gets_that_intent(
    local_shop: Shop, ids: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = local_shop
    offer_id, _ = shop.offer()
    user, key = ids("u"), ids("k")
    created_before = shop.fake.created_count()
    stripe_sdk_timeout(monkeypatch, 0.3)
    # Every attempt the SDK makes (1 + 2 retries) reaches Stripe and times out waiting for the answer.
    with SlowStripe(shop.fake.base_url, slow=3, delay=1.0) as slow:
        shop.service.setenv("STRIPE_API_BASE", slow.base_url)
        began = time.monotonic()
        reply = shop.order(user, offer_id, key=key)
        assert time.monotonic() - began < 15  # inside the function's Timeout
        assert slow.forwarded == 3
        assert_failed_with_error_shape(reply)
        # Stripe did create it (once: the SDK's retries carried the same idempotency key).
        assert shop.fake.created_count() == created_before + 1
        assert_nothing_stored(shop, user, key)
        # The client resends with its key; Stripe answers at once now.
        assert_retry_succeeds_with_one_intent(shop, user, offer_id, key, created_before)


class SilentStripe:
    """Accepts connections and never answers: Stripe (or the network to it) hanging."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.connections.append(self.listener.accept()[0])

    def __enter__(self) -> SilentStripe:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        # Closing frees a request still waiting (its retries then fail fast: connection refused);
        # shutdown first, or the thread blocked in accept() keeps the port listening.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for connection in self.connections:
            connection.close()


def function_timeout_seconds(logical_id: str) -> float:
    template = tpl.load_template()
    props = template["Resources"][logical_id]["Properties"]
    return float(props.get("Timeout") or template["Globals"]["Function"]["Timeout"])


@pytest.mark.slow
def test_a_stripe_that_never_answers_gets_the_error_shape_within_the_functions_timeout(
    local_shop: Shop, ids: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from user_credits.payments import gateway

    shop = local_shop
    offer_id, _ = shop.offer()
    user, key = ids("u"), ids("k")
    budget = function_timeout_seconds("CreateOrderFunction")
    monkeypatch.setattr(gateway, "_clients", {})
    replies: queue.Queue[Any] = queue.Queue()
    with SilentStripe() as silent:
        shop.service.setenv("STRIPE_API_BASE", silent.base_url)
        # The SDK's own timeout and retries, as deployed; the handler runs where the test can stop waiting.
        worker = threading.Thread(target=lambda: replies.put(shop.order(user, offer_id, key=key)), daemon=True)
        worker.start()
        # Less than the Timeout: the function also needs time for its DynamoDB calls.
        worker.join(timeout=budget - 1)
        answered = not worker.is_alive()
    worker.join(timeout=30)
    shop.service.setenv("STRIPE_API_BASE", shop.fake.base_url)
    assert answered, f"no answer within the function's {budget:.0f} s Timeout: Lambda would have killed it"
    assert_failed_with_error_shape(replies.get_nowait())
    assert_nothing_stored(shop, user, key)
