"""The operator's `user-credits` commands against a running dev server, and the dev server's fallbacks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from test_dev_server import DevServer, auth

pytestmark = pytest.mark.ddblocal


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One server for the tests of this module; each test has its own users."""
    tmp_path = tmp_path_factory.mktemp("cli")
    server = DevServer(tmp_path / "data", tmp_path / "dev.log").start()
    try:
        yield server
    finally:
        server.stop()


def _order(server: DevServer, user: str, offer_id: str, quantity: int = 1) -> dict[str, Any]:
    response = requests.post(f"{server.url}/orders", json={"offerId": offer_id, "quantity": quantity},
                             headers=auth(user), timeout=30)
    assert response.status_code == 201, response.text
    order: dict[str, Any] = response.json()["order"]
    return order


def _status(server: DevServer, user: str, order_id: str) -> str:
    response = requests.get(f"{server.url}/orders/{order_id}", headers=auth(user), timeout=10)
    status: str = response.json()["order"]["status"]
    return status


def _ledger(server: DevServer, user: str) -> list[tuple[str, str, int, int]]:
    items = requests.get(f"{server.url}/users/{user}/ledger", timeout=10).json()["items"]
    return [(e["offerGroup"], e["reason"], e["delta"], e["balanceAfter"]) for e in items]


def test_fail_sends_a_signed_webhook_and_the_order_fails(dev_server: DevServer) -> None:
    user = f"payer-{uuid.uuid4().hex[:8]}"
    declined = _order(dev_server, user, "tokens-100")

    failed = dev_server.cli("fail", declined["orderId"])

    assert failed.returncode == 0, failed.stdout + failed.stderr
    assert _status(dev_server, user, declined["orderId"]) == "failed"
    assert _ledger(dev_server, user) == []


def test_refund_sends_signed_webhooks_that_revoke_tokens_in_proportion(dev_server: DevServer) -> None:
    user = f"refunded-{uuid.uuid4().hex[:8]}"
    bought = _order(dev_server, user, "tokens-100", quantity=2)
    assert dev_server.cli("pay", bought["orderId"]).returncode == 0

    half = dev_server.cli("refund", bought["orderId"], "--amount", "500")
    assert half.returncode == 0, half.stdout + half.stderr
    assert _status(dev_server, user, bought["orderId"]) == "partially_refunded"
    assert _ledger(dev_server, user) == [("ai-tokens", "refund", -100, 100), ("ai-tokens", "purchase", 200, 200)]

    rest = dev_server.cli("refund", bought["orderId"])
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert _status(dev_server, user, bought["orderId"]) == "refunded"
    assert _ledger(dev_server, user)[0] == ("ai-tokens", "refund", -100, 0)


def _grant_expiring(server: DevServer, user: str, seconds: float) -> datetime:
    """A grant expiring soon; soon enough for the test, late enough to be in the future when it lands."""
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    expires = moment.isoformat().replace("+00:00", "Z")
    response = requests.post(f"{server.url}/admin/users/{user}/grants", timeout=10,
                             json={"offerGroup": "trial-tokens", "tokens": 30, "expiresAt": expires})
    assert response.status_code == 201, response.text
    return moment


def test_the_sweep_runs_on_demand(dev_server: DevServer) -> None:
    user = f"demand-{uuid.uuid4().hex[:8]}"
    expires = _grant_expiring(dev_server, user, 3)
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    assert _ledger(dev_server, user)[0][1] == "grant"  # the template's schedule (5 minutes) has not run yet

    swept = dev_server.cli("sweep")

    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert _ledger(dev_server, user)[0] == ("trial-tokens", "expire", -30, 0)


def test_the_dev_server_runs_the_sweep_on_its_schedule(tmp_path: Path) -> None:
    # Every second instead of the template's rate, so the schedule is seen within the test.
    # moto starts faster than a JVM; the sweep is the same code on either engine.
    server = DevServer(tmp_path / "data", tmp_path / "dev.log", "--sweep-every", "1", "--engine", "moto").start()
    try:
        user = f"sched-{uuid.uuid4().hex[:8]}"
        _grant_expiring(server, user, 3)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _ledger(server, user)[0][1] != "expire":
            time.sleep(0.25)
        assert _ledger(server, user)[0] == ("trial-tokens", "expire", -30, 0)
    finally:
        server.stop()


def test_cli_commands_need_a_running_dev_server_or_named_tables(tmp_path: Path) -> None:
    idle = DevServer(tmp_path / "nothing-running", tmp_path / "unused.log")
    result = idle.cli("credits", "someone")
    assert result.returncode == 2
    assert "make dev" in result.stderr and "--stack" in result.stderr


def test_token_prints_a_jwt_whose_sub_is_the_user(tmp_path: Path) -> None:
    import base64

    result = DevServer(tmp_path, tmp_path / "unused.log").cli_plain("token", "alice@example")
    _header, payload, signature = result.stdout.strip().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "alice@example" and signature == ""


def test_without_java_the_dev_server_runs_on_moto(tmp_path: Path) -> None:
    server = DevServer(tmp_path / "data", tmp_path / "dev.log", path_without_java=True).start()
    try:
        offers = requests.get(f"{server.url}/offers", headers=auth("no-java"), timeout=10)
        assert offers.status_code == 200 and offers.json()["offers"]
        assert "moto" in server.log()
    finally:
        server.stop()


def play_the_stream(monkeypatch: pytest.MonkeyPatch, endpoint: str, tables: dict[str, str], bus: str) -> None:
    """What Lambda's event source mapping does in a deployed stack: the stream function, fed the stream."""
    from user_credits.store.models import bind_tables
    from user_credits_dev import template as tpl
    from user_credits_dev.server import function_environment
    from user_credits_dev.streams import StreamPump

    spec = tpl.stream_function(tpl.functions(tables))
    assert spec is not None and spec.stream is not None
    for key, value in {**function_environment(tables, {"EVENT_BUS_NAME": bus}),
                       "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    from conftest import EventRecorder

    from user_credits.config import load_settings
    from user_credits.events import publisher

    bind_tables(load_settings())
    # EventBridge is not what this test is about (and moto's bus from the stack refuses PutEvents).
    monkeypatch.setattr(publisher, "client_factory", EventRecorder)
    publisher.reset_client()
    handler = tpl.load_handler(spec)
    assert StreamPump(endpoint, tables[spec.stream]).drain(handler) >= 1


def test_against_a_stack_the_cli_finds_the_tables_in_its_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--stack NAME`, with moto standing in for CloudFormation and DynamoDB (no network)."""
    import os
    import subprocess
    import sys

    import boto3

    from user_credits_dev import template as tpl
    from user_credits_dev.dynamodb_local import free_port
    from user_credits_dev.moto_server import serial_moto_server

    port = free_port()
    moto = serial_moto_server(port)
    moto.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        tables = tpl.resources("AWS::DynamoDB::Table")
        stack_template = {
            "Resources": {
                **{name: {"Type": r["Type"], "Properties": r["Properties"]} for name, r in tables.items()},
                "EventBus": {"Type": "AWS::Events::EventBus", "Properties": {"Name": "stack-test-events"}},
            },
            "Outputs": {
                **{f"{name}Name": {"Value": {"Ref": name}} for name in tables},
                "EventBusName": {"Value": {"Ref": "EventBus"}},
            },
        }
        cfn = boto3.client("cloudformation", endpoint_url=endpoint, region_name="us-east-1")
        cfn.create_stack(StackName="credits-test", TemplateBody=json.dumps(stack_template))
        env = {k: v for k, v in os.environ.items() if not k.endswith("_TABLE") and k != "AWS_ENDPOINT_URL_DYNAMODB"}
        env["AWS_ENDPOINT_URL"] = endpoint

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "user_credits_dev.cli", *args, "--stack", "credits-test",
                 "--region", "us-east-1", "--data-dir", str(tmp_path)],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )

        granted = cli("grant", "stack-user", "ai-tokens", "5", "--reason", "welcome")
        # In the stack, Lambda runs the stream function on the grant's write: played here.
        outputs = {o["OutputKey"]: o["OutputValue"]
                   for o in cfn.describe_stacks(StackName="credits-test")["Stacks"][0]["Outputs"]}
        play_the_stream(monkeypatch, endpoint, {name: outputs[f"{name}Name"] for name in tables},
                        outputs["EventBusName"])
        shown = cli("credits", "stack-user")
        checked = cli("check")

        assert granted.returncode == 0, granted.stdout + granted.stderr
        groups = json.loads(shown.stdout)["groups"]
        assert [(g["offerGroup"], g["balance"], g["expiresAt"]) for g in groups] == [("ai-tokens", 5, None)]
        assert checked.returncode == 0 and json.loads(checked.stdout)["ok"] is True, checked.stdout + checked.stderr
        dynamodb = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")
        names = set(dynamodb.list_tables()["TableNames"])
        assert not any(name.startswith("local-") for name in names)
    finally:
        moto.stop()


def test_the_example_catalog_unlocks_the_pro_pack_and_gives_the_trial_for_free(dev_server: DevServer) -> None:
    user = f"pro-{uuid.uuid4().hex[:8]}"

    def visible() -> dict[str, bool]:
        offers = requests.get(f"{dev_server.url}/offers", headers=auth(user), timeout=10).json()["offers"]
        return {o["offerId"]: o["subscribed"] for o in offers}

    assert "tokens-100" in visible() and "tokens-250-pro" not in visible()
    trial = _order(dev_server, user, "trial")
    assert (trial["status"], trial["amount"], trial["paymentIntentId"]) == ("paid", 0, None)

    # A plan is a subscription: bought through Checkout, paid by its first invoice.
    pro = requests.post(f"{dev_server.url}/checkout", json={
        "offerId": "pro-monthly", "successUrl": "https://app.example/thanks",
        "cancelUrl": "https://app.example/pricing"}, headers=auth(user), timeout=30).json()
    paid = dev_server.cli("checkout-complete", pro["sessionId"])
    assert paid.returncode == 0, paid.stdout + paid.stderr

    after = visible()
    assert "tokens-250-pro" in after and "tokens-100" not in after  # same overridingKey, unlocked wins
    assert after["pro-monthly"] is True and after["trial"] is True
