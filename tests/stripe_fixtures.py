"""The local Stripe fake as fixtures, and a `Shop` that drives offers, orders and webhook deliveries.

A test module gets the fixtures with `pytest_plugins = ["stripe_fixtures"]`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pytest

from user_credits.store.balances import GroupState, read_group
from user_credits.store.models import LedgerRecord, OrderRecord, order_sk
from user_credits_dev import template as tpl
from user_credits_dev.lambda_events import LambdaContext, http_api_event
from user_credits_dev.stripe_fake import FakeStripe, charge_refunded_event, payment_intent_event, signed_delivery

API_KEY = "sk_test_local_fake"
WEBHOOK_SECRET = "whsec_local_fake_secret"
WEBHOOK_PATH = "/webhooks/stripe"


@pytest.fixture(scope="session")
def stripe_fake() -> Iterator[FakeStripe]:
    with FakeStripe(api_key=API_KEY) as fake:
        yield fake


class Shop:
    """Given/When helpers over the service: offers, orders, signed deliveries, and what they left."""

    def __init__(self, service: Any, fake: FakeStripe, ids: Any) -> None:
        self.service, self.fake, self.ids = service, fake, ids

    def offer(self, group: str | None = None, **fields: Any) -> tuple[str, str]:
        offer_id, group = self.ids("offer"), group or self.ids("grp")
        body: dict[str, Any] = {"offerGroup": group, "tokens": 100, "cycle": "monthly", "prices": {"usd": 1000}}
        body.update(fields)
        reply = self.service.call("PUT", f"/admin/offers/{offer_id}", body, iam=True)
        assert reply.status == 201, reply.body
        return offer_id, group

    def order(self, user: str, offer_id: str, key: str | None = None, **fields: Any) -> Any:
        headers = {"Idempotency-Key": key} if key else None
        return self.service.call("POST", "/orders", {"offerId": offer_id, **fields}, user=user, headers=headers)

    def placed(self, user: str, offer_id: str, **fields: Any) -> dict[str, Any]:
        reply = self.order(user, offer_id, **fields)
        assert reply.status == 201, reply.body
        order: dict[str, Any] = reply.body["order"]
        return order

    def intent(self, order: Mapping[str, Any]) -> dict[str, Any]:
        return self.fake.intent(order["paymentIntentId"])

    def deliver(
        self, event: Mapping[str, Any], *, timestamp: int | None = None, secret: str = WEBHOOK_SECRET,
        header: str | None = None, body: bytes | None = None,
    ) -> Any:
        payload, signature = signed_delivery(event, secret, timestamp)
        headers = {"Stripe-Signature": header if header is not None else signature,
                   "Content-Type": "application/json; charset=utf-8"}
        if header == "":
            headers.pop("Stripe-Signature")
        raw = (body if body is not None else payload).decode()
        return self.service.call("POST", WEBHOOK_PATH, raw_body=raw, headers=headers)

    def pay(self, order: Mapping[str, Any], **overrides: Any) -> Any:
        return self.deliver(payment_intent_event(self.intent(order), **overrides))

    def refund(self, order: Mapping[str, Any], amount_refunded: int, **kwargs: Any) -> Any:
        return self.deliver(charge_refunded_event(self.intent(order), amount_refunded, **kwargs))

    def bought(self, user: str, offer_id: str, **fields: Any) -> dict[str, Any]:
        order = self.placed(user, offer_id, **fields)
        reply = self.pay(order)
        assert reply.status == 200, reply.body
        return order

    # ---------------------------------------------------------------- what it left
    def group(self, user: str, group: str) -> GroupState:
        return read_group(user, group)

    def ledger(self, user: str, group: str | None = None) -> list[LedgerRecord]:
        records = [r for r in LedgerRecord.query(user, consistent_read=True) if group is None or r.offerGroup == group]
        return sorted(records, key=lambda r: (r.offerGroup, int(r.seq)))

    def order_record(self, user: str, order_id: str) -> OrderRecord:
        record = OrderRecord.get(user, order_sk(order_id), consistent_read=True)
        assert isinstance(record, OrderRecord)
        return record

    def status(self, user: str, order_id: str) -> str:
        return str(self.order_record(user, order_id).status)

    def assert_ledger_explains_balances(self, user: str, groups: Iterable[str]) -> None:
        """SPEC 1: for every (user, group), balance == sum of its ledger deltas."""
        for group in groups:
            entries = self.ledger(user, group)
            assert self.group(user, group).balance == sum(int(e.delta) for e in entries), group
            running = 0
            for entry in entries:
                running += int(entry.delta)
                assert int(entry.balanceAfter) == running, (group, entry.seq)


@pytest.fixture
def shop(service: Any, stripe_fake: FakeStripe, ids: Any) -> Shop:
    service.setenv("STRIPE_API_BASE", stripe_fake.base_url)
    service.setenv("STRIPE_API_KEY", API_KEY)
    service.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    return Shop(service, stripe_fake, ids)


@pytest.fixture
def local_shop(local_service: Any, stripe_fake: FakeStripe, ids: Any) -> Shop:
    local_service.setenv("STRIPE_API_BASE", stripe_fake.base_url)
    local_service.setenv("STRIPE_API_KEY", API_KEY)
    local_service.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    return Shop(local_service, stripe_fake, ids)


# ---------------------------------------------------------------- a delivery from another process


class _Recorder:
    def __init__(self) -> None:
        self.detail_types: list[str] = []

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.detail_types.extend(e["DetailType"] for e in Entries)
        return {"FailedEntryCount": 0, "Entries": [{"EventId": "local"} for _ in Entries]}


def deliver_from_process(env: Mapping[str, str], payload: bytes, signature: str, start: Any, results: Any) -> None:
    """Runs in a spawned process: its own imports, clients and connections, like another Lambda instance.

    Every process waits on `start` so that the deliveries hit DynamoDB Local at the same moment.
    """
    os.environ.update(env)
    from user_credits.events import publisher

    recorder = _Recorder()
    publisher.client_factory = lambda: recorder
    tables = json.loads(env["TEST_TABLES"])
    spec = next(s for s in tpl.functions(tables) if s.logical_id == "StripeWebhookFunction")
    handler = tpl.load_handler(spec)
    event = http_api_event("POST", WEBHOOK_PATH, body=payload.decode(),
                           headers={"Stripe-Signature": signature, "Content-Type": "application/json"})
    start.wait(timeout=60)
    began = time.monotonic()
    result = handler(event, LambdaContext(function_name=spec.logical_id))
    results.put((result["statusCode"], json.loads(result["body"]), recorder.detail_types, time.monotonic() - began))
