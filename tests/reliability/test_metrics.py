"""Observability (issue 8): grants, consumes, refusals, expiries and every webhook outcome each emit a
Powertools metric, read from the CloudWatch EMF JSON that `metrics.log_metrics` prints to stdout.

The metrics must not depend on EventBridge: they are counted with EventBridge down.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
import time_machine
from conftest import Backend, EventRecorder, Service

from user_credits.domain.clock import to_iso
from user_credits_dev import template as tpl
from user_credits_dev.stripe_fake import charge_refunded_event, payment_intent_event

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

pytestmark = pytest.mark.ddblocal

T0 = datetime(2033, 1, 20, 8, 0, 0, tzinfo=UTC)


class Emitted:
    """The metrics flushed since the last read: name -> summed value, and the namespaces used."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def read(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for line in self.capsys.readouterr().out.splitlines():
            try:
                blob = json.loads(line)
            except ValueError:
                continue
            if not isinstance(blob, dict) or "_aws" not in blob:
                continue
            for directive in blob["_aws"]["CloudWatchMetrics"]:
                assert directive["Namespace"] == "UserCredits", directive
                for metric in directive["Metrics"]:
                    value = blob[metric["Name"]]
                    totals[metric["Name"]] += int(sum(value) if isinstance(value, list) else value)
        return totals


@pytest.fixture
def emitted(capsys: pytest.CaptureFixture[str], events: EventRecorder) -> Emitted:
    return Emitted(capsys)


def grant(service: Any, user: str, group: str, tokens: int, *, key: str | None = None,
          expires_at: datetime | None = None) -> Any:
    body: dict[str, Any] = {"offerGroup": group, "tokens": tokens}
    if expires_at is not None:
        body["expiresAt"] = to_iso(expires_at)
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/admin/users/{user}/grants", body, iam=True, headers=headers)


def consume(service: Any, user: str, group: str, tokens: int, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": tokens}, iam=True,
                        headers=headers)


def test_a_grant_emits_a_grants_metric_and_its_replay_does_not(
    local_service: Service, emitted: Emitted, ids: Any
) -> None:
    user, group = ids("u"), ids("g")
    emitted.read()
    assert grant(local_service, user, group, 10, key="g-1").status == 201
    assert emitted.read()["Grants"] == 1
    assert grant(local_service, user, group, 10, key="g-1").status == 201  # a replay: nothing granted
    assert emitted.read()["Grants"] == 0
    assert grant(local_service, user, group, 5).status == 201
    assert emitted.read()["Grants"] == 1


def test_a_consume_emits_consumes_and_a_refused_one_emits_consume_refusals(
    local_service: Service, emitted: Emitted, ids: Any
) -> None:
    user, group = ids("u"), ids("g")
    assert grant(local_service, user, group, 10).status == 201
    emitted.read()
    assert consume(local_service, user, group, 3).status == 200
    assert consume(local_service, user, group, 3, key="c-1").status == 200
    assert (got := emitted.read())["Consumes"] == 2 and got["ConsumeRefusals"] == 0, got
    assert consume(local_service, user, group, 3, key="c-1").status == 200  # a replay consumes nothing
    assert emitted.read()["Consumes"] == 0
    assert consume(local_service, user, group, 50).error == "insufficient_credits"
    assert consume(local_service, user, group, 50, key="c-2").error == "insufficient_credits"
    assert (got := emitted.read())["ConsumeRefusals"] == 2 and got["Consumes"] == 0, got


def test_consumes_and_holds_placed_are_counted_from_the_stream_not_by_the_handler(
    local_service: Service, emitted: Emitted, ids: Any
) -> None:
    """A successful consume or hold prints no EMF line of its own: it is counted where its ledger entry
    is written, from its stream record (logic.stream), so nothing shows until the stream delivers it."""
    user, group = ids("u"), ids("g")
    assert grant(local_service, user, group, 10).status == 201
    emitted.read()
    with local_service.stream_late():
        assert consume(local_service, user, group, 3).status == 200
        assert local_service.call("POST", f"/users/{user}/holds", {"offerGroup": group, "tokens": 2},
                                  iam=True).status == 201
        assert consume(local_service, user, group, 50).error == "insufficient_credits"
        got = emitted.read()
        assert got["Consumes"] == 0 and got["HoldsPlaced"] == 0 and got["ConsumeRefusals"] == 1, got
    got = emitted.read()
    assert got["Consumes"] == 1 and got["HoldsPlaced"] == 1 and got["LedgerEntries"] == 2, got


def test_a_consume_of_expired_credits_emits_consume_refusals(
    local_service: Service, emitted: Emitted, ids: Any
) -> None:
    user, group = ids("u"), ids("g")
    with time_machine.travel(T0, tick=True):
        assert grant(local_service, user, group, 10, expires_at=T0 + timedelta(hours=1)).status == 201
    emitted.read()
    with time_machine.travel(T0 + timedelta(hours=2), tick=True):
        assert consume(local_service, user, group, 1).error == "credits_expired"
    assert (got := emitted.read())["ConsumeRefusals"] == 1 and got["Consumes"] == 0, got


@pytest.fixture
def sweep_service(
    ddblocal_backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder
) -> Iterator[Service]:
    """Tables of its own: the sweep's stored position and its expiry index are table-wide."""
    client = ddblocal_backend.client()
    tables = tpl.create_tables(client, f"metrics-{uuid.uuid4().hex[:8]}")
    yield Service(Backend("ddblocal", ddblocal_backend.endpoint, tables), monkeypatch, events)
    for name in tables.values():
        client.delete_table(TableName=name)


def test_the_sweep_emits_lots_expired(sweep_service: Service, emitted: Emitted, ids: Any) -> None:
    users, group = [ids("u") for _ in range(3)], ids("g")
    with time_machine.travel(T0, tick=True):
        for user in users:
            assert grant(sweep_service, user, group, 10, expires_at=T0 + timedelta(hours=1)).status == 201
    emitted.read()
    with time_machine.travel(T0 + timedelta(hours=3), tick=True):
        assert sweep_service.invoke_schedule()["expired"] == 3
        assert emitted.read()["LotsExpired"] == 3
        assert sweep_service.invoke_schedule()["expired"] == 0
        assert emitted.read()["LotsExpired"] == 0


def test_every_webhook_outcome_emits_a_metric(local_shop: Shop, emitted: Emitted, ids: Any) -> None:
    shop = local_shop
    offer_id, _ = shop.offer(tokens=100)
    user = ids("u")
    order = shop.placed(user, offer_id)
    emitted.read()
    intent = shop.intent(order)
    deliveries = [
        (payment_intent_event(intent, "payment_intent.payment_failed"), "StripeEvent_failed"),
        (payment_intent_event(intent), "StripeEvent_paid"),
        (payment_intent_event(intent), "StripeEvent_duplicate"),
        (charge_refunded_event(intent, 250), "StripeEvent_partially_refunded"),
        (payment_intent_event({**intent, "metadata": {}, "id": "pi_unknown"}), "StripeEvent_ignored_no_order"),
        ({**payment_intent_event(intent), "type": "customer.created"}, "StripeEvent_ignored"),
    ]
    for event, metric in deliveries:
        reply = shop.deliver(event)
        assert reply.status == 200, reply.body
        got = emitted.read()
        assert got[metric] == 1, (metric, got)
    inconsistent = shop.placed(user, offer_id)
    emitted.read()
    assert shop.pay(inconsistent, amount_received=1).status == 200
    assert emitted.read()["StripeEvent_inconsistent"] == 1
    # Refused deliveries are never logged as failures (4xx): the metric is what shows them.
    assert shop.deliver(payment_intent_event(intent), secret="whsec_other").error == "invalid_signature"
    assert emitted.read()["StripeEvent_invalid_signature"] == 1


def test_a_5xx_answer_emits_server_errors_per_function(
    local_service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, ids: Any,
) -> None:
    """The webhook alarm's metric: Lambda's Errors never counts a failure turned into a response."""
    from user_credits.logic import credits as credits_logic

    def broken(user_id: str) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "stack-GetCreditsFunction-abc")
    monkeypatch.setattr(credits_logic, "credits_of", broken)
    capsys.readouterr()
    reply = local_service.call("GET", f"/users/{ids('u')}/credits", iam=True)
    assert reply.status == 500 and reply.body == {"error": "internal_error", "message": reply.body["message"]}
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    [server_errors] = [b for b in blobs if any(m["Name"] == "ServerErrors"
                                               for d in b["_aws"]["CloudWatchMetrics"] for m in d["Metrics"])]
    assert server_errors["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service", "FunctionName"]]
    assert server_errors["FunctionName"] == "stack-GetCreditsFunction-abc" and server_errors["ServerErrors"] == [1.0]


def test_the_alarms_watch_metrics_the_code_emits() -> None:
    from user_credits import observability
    from user_credits_dev import template as tpl

    alarms = tpl.resources("AWS::CloudWatch::Alarm")
    for name, metric in (("WebhookErrorsAlarm", "ServerErrors"), ("SweepFailuresAlarm", "SweepFailures")):
        props = alarms[name]["Properties"]
        assert (props["Namespace"], props["MetricName"]) == (observability.NAMESPACE, metric), name
        assert {"Name": "service", "Value": observability.SERVICE} in props["Dimensions"], name
    webhook = {d["Name"]: d["Value"] for d in alarms["WebhookErrorsAlarm"]["Properties"]["Dimensions"]}
    assert webhook["FunctionName"] == {"Ref": "StripeWebhookFunction"}
