"""`user-credits dev` as a newcomer runs it: a subprocess on a free port, driven over real HTTP.

The README walkthrough runs end to end (offers -> order -> `user-credits pay` ->
consume -> ledger, with a CreditsLow event in the server's log); a second start on the same data
directory finds everything the first one wrote; its step 8 (Checkout of the monthly plan, the top-up,
a renewal, a failed renewal, a cancellation, the portal, the free trial twice) runs as the README shows
it; bad requests get the handlers' own errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from user_credits_dev.dynamodb_local import free_port
from user_credits_dev.server import unsigned_token
from user_credits_dev.template import REPO_ROOT

pytestmark = pytest.mark.ddblocal

# Variables of the test session that must not leak into the dev server (it picks its own tables).
_SCRUBBED = ("OFFERS_TABLE", "ACCOUNTS_TABLE", "LEDGER_TABLE", "IDEMPOTENCY_TABLE", "STRIPE_API_KEY",
             "STRIPE_WEBHOOK_SECRET", "STRIPE_API_BASE", "AWS_ENDPOINT_URL_DYNAMODB", "USER_CREDITS_DATA_DIR")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(extra)
    return env


APP_ORIGIN = "http://app.localhost:5173"


class DevServer:
    """One `user-credits dev` process; its log goes to a file the test can read."""

    def __init__(self, data_dir: Path, log_path: Path, *extra: str, path_without_java: bool = False) -> None:
        self.data_dir = data_dir
        self.extra = extra
        # PATH with only this Python's folder: no java, so the dev server must fall back to moto.
        self.path = str(Path(sys.executable).parent) if path_without_java else os.environ.get("PATH", "")
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.seconds_to_first_200: float | None = None

    def start(self) -> DevServer:
        started = time.monotonic()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "user_credits_dev.cli", "dev", "--port", str(self.port),
             "--data-dir", str(self.data_dir), *self.extra],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=_env(LOW_BALANCE_THRESHOLDS='{"ai-tokens": 100}', PATH=self.path),
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the dev server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if requests.get(f"{self.url}/offers", headers=auth("probe"), timeout=20).status_code == 200:
                    self.seconds_to_first_200 = time.monotonic() - started
                    return self
            except requests.ConnectionError:
                pass  # not listening yet
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the dev server did not answer within 60 s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A command against this server's data dir."""
        return self.cli_plain(*args, "--data-dir", str(self.data_dir))

    def cli_plain(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "user_credits_dev.cli", *args],
            cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False,
        )


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {unsigned_token(user)}"}


def _built(response: requests.Response, step: str) -> requests.Response:
    """A route whose function has no code yet answers 501: that step cannot run yet."""
    if response.status_code == 501 and response.json().get("error") == "not_implemented":
        pytest.skip(f"walkthrough step '{step}': {response.json()['message']}")
    return response


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[DevServer]:
    """A server of the test's own (the walkthrough stops and restarts it)."""
    server = DevServer(tmp_path / "local-data", tmp_path / "dev.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One server shared by the tests that only send requests (each with its own ids)."""
    tmp_path = tmp_path_factory.mktemp("dev")
    server = DevServer(tmp_path / "local-data", tmp_path / "dev.log", "--allowed-origins", APP_ORIGIN).start()
    try:
        yield server
    finally:
        server.stop()


def test_walkthrough_runs_over_http_and_a_restart_keeps_the_data(own_server: DevServer) -> None:
    dev_server = own_server
    user = f"walker-{uuid.uuid4().hex[:8]}"
    base = dev_server.url

    # 1. Offers: the example catalog, as the public sees it (no unlocked or overridden offers).
    offers = requests.get(f"{base}/offers", headers=auth(user), timeout=10)
    assert offers.status_code == 200
    ids = {o["offerId"] for o in offers.json()["offers"]}
    assert {"tokens-100", "tokens-1000", "pro-monthly", "expert-bundle", "trial"} <= ids
    assert "tokens-250-pro" not in ids

    # 2. Order two packs of 100 tokens: a pending order with a PaymentIntent of the local Stripe fake.
    created = _built(requests.post(f"{base}/orders", json={"offerId": "tokens-100", "quantity": 2},
                                   headers=auth(user), timeout=30), "POST /orders")
    assert created.status_code == 201, created.text
    order = created.json()["order"]
    assert (order["status"], order["amount"], order["currency"]) == ("pending", 1000, "usd")
    assert order["paymentIntentId"].startswith("pi_")

    # 3. Pay it: a signed payment_intent.succeeded webhook to the local API.
    paid = dev_server.cli("pay", order["orderId"])
    assert paid.returncode == 0, paid.stdout + paid.stderr + dev_server.log()[-3000:]
    _built(requests.get(f"{base}/orders/{order['orderId']}", headers=auth(user), timeout=10), "GET /orders/{id}")
    fetched = requests.get(f"{base}/orders/{order['orderId']}", headers=auth(user), timeout=10).json()["order"]
    assert fetched["status"] == "paid"

    # 4. Consume 150 of the 200 tokens: the balance crosses the threshold of 100 -> CreditsLow in the log.
    consumed = _built(requests.post(f"{base}/users/{user}/consume", json={"offerGroup": "ai-tokens", "tokens": 150},
                                    timeout=30), "POST /users/{userId}/consume")
    assert consumed.status_code == 200, consumed.text
    assert (consumed.json()["consumed"], consumed.json()["balance"]) == (150, 50)
    refused = requests.post(f"{base}/users/{user}/consume", json={"offerGroup": "ai-tokens", "tokens": 51},
                            timeout=30)
    refusal = refused.json()
    assert (refused.status_code, refusal["error"], refusal["balance"]) == (402, "insufficient_credits", 50)
    low = [line for line in dev_server.log().splitlines() if "EVENT CreditsLow" in line and user in line]
    assert len(low) == 1, dev_server.log()[-3000:]

    # 5. The ledger, newest first: the consumption, then the purchase.
    ledger = _built(requests.get(f"{base}/credits/ledger", headers=auth(user), timeout=10), "GET /credits/ledger")
    assert ledger.status_code == 200, ledger.text
    entries = [(e["reason"], e["delta"], e["balanceAfter"]) for e in ledger.json()["items"]]
    assert entries == [("consume", -150, 50), ("purchase", 200, 200)]

    # 6. The operator's CLI against the same local tables: grant, credits, ledger, invariant check.
    granted = dev_server.cli("grant", user, "ai-tokens", "25", "--reason", "support gesture")
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout)["balance"] == 75
    credits = dev_server.cli("credits", user)
    assert credits.returncode == 0, credits.stderr
    groups = {g["offerGroup"]: g["balance"] for g in json.loads(credits.stdout)["groups"]}
    assert groups == {"ai-tokens": 75}
    cli_ledger = dev_server.cli("ledger", user, "--group", "ai-tokens", "--limit", "1")
    assert [e["reason"] for e in json.loads(cli_ledger.stdout)["items"]] == ["grant"]
    check = dev_server.cli("check", user)
    assert check.returncode == 0, check.stdout + check.stderr

    # 7. Reserve 500 for a model call, settle at the real cost, 320 (the CLI, as the README shows).
    assert dev_server.cli("grant", user, "ai-tokens", "1000", "--reason", "launch").returncode == 0
    placed = dev_server.cli("hold", user, "ai-tokens", "500", "--ttl", "600")
    assert placed.returncode == 0, placed.stderr
    held = json.loads(placed.stdout)
    assert (held["tokens"], held["balance"]) == (500, 575)
    settled = dev_server.cli("settle", user, held["holdId"], "320")
    assert settled.returncode == 0, settled.stderr
    assert json.loads(settled.stdout) == {"holdId": held["holdId"], "settled": 320, "released": 180,
                                          "balance": 755, "status": "settled"}
    after_hold = dev_server.cli("ledger", user, "--group", "ai-tokens", "--limit", "2")
    assert [(e["reason"], e["delta"]) for e in json.loads(after_hold.stdout)["items"]] == [
        ("release", 180), ("hold", -500)]

    # 8. Stop, start again on the same data directory: everything is still there.
    dev_server.stop()
    dev_server.start()
    again = requests.get(f"{base.rsplit(':', 1)[0]}:{dev_server.port}/credits", headers=auth(user), timeout=10)
    assert again.status_code == 200
    assert {g["offerGroup"]: g["balance"] for g in again.json()["groups"]} == {"ai-tokens": 755}
    assert [o["orderId"] for o in again.json()["orders"]] == [order["orderId"]]


PAGES = {"successUrl": "https://app.example/thanks", "cancelUrl": "https://app.example/pricing"}


def test_walkthrough_step_8_a_plan_its_top_up_a_renewal_and_a_cancellation(dev_server: DevServer) -> None:
    """README step 8, command by command: POST /checkout, `checkout-complete`, the top-up with POST /orders
    and `pay`, `renew`, GET /credits, `fail-renewal`, `cancel`, GET /subscriptions, the portal, the trial."""
    user = f"plan-{uuid.uuid4().hex[:8]}"
    base = dev_server.url
    headers = auth(user)

    def subscriptions() -> list[dict[str, Any]]:
        listed = requests.get(f"{base}/subscriptions", headers=headers, timeout=10)
        assert listed.status_code == 200, listed.text
        found: list[dict[str, Any]] = listed.json()["subscriptions"]
        return found

    def pro_lots() -> list[dict[str, Any]]:
        credits = requests.get(f"{base}/credits", headers=headers, timeout=10).json()
        [group] = [g for g in credits["groups"] if g["offerGroup"] == "pro"]
        found: list[dict[str, Any]] = group["lots"]
        return found

    def events(detail_type: str) -> list[dict[str, Any]]:
        marker = f"EVENT {detail_type} "
        lines = [line.split(marker, 1)[1] for line in dev_server.log().splitlines() if marker in line]
        return [e for e in map(json.loads, lines) if e["userId"] == user]

    # The plan is not sold as a one-off order, and the portal needs a checkout first.
    refused = requests.post(f"{base}/orders", json={"offerId": "pro-monthly"}, headers=headers, timeout=30)
    assert (refused.status_code, refused.json()["error"]) == (422, "validation_error")
    portal = requests.post(f"{base}/billing-portal", json={"returnUrl": "https://app.example/account"},
                           headers=headers, timeout=30)
    assert (portal.status_code, portal.json()["error"]) == (404, "customer_not_found")

    # Check out the monthly plan: the url is the fake's hosted page, which names the command that pays it.
    begun = _built(requests.post(f"{base}/checkout", json={"offerId": "pro-monthly", **PAGES}, headers=headers,
                                 timeout=30), "POST /checkout")
    assert begun.status_code == 201, begun.text
    session = begun.json()
    assert session["sessionId"].startswith("cs_test_")
    assert session["url"].endswith(f"/_fake/checkout/{session['sessionId']}")
    page = requests.get(session["url"], timeout=10)
    assert page.status_code == 200 and f"user-credits checkout-complete {session['sessionId']}" in page.text

    completed = dev_server.cli("checkout-complete", session["sessionId"])
    assert completed.returncode == 0, completed.stdout + completed.stderr + dev_server.log()[-3000:]
    assert [line.split(" ", 1)[0] for line in completed.stdout.splitlines()] == [
        "checkout.session.completed", "customer.subscription.created", "invoice.paid"]
    [subscription] = subscriptions()
    sub = subscription["subscriptionId"]
    assert sub in completed.stdout
    assert (subscription["offerId"], subscription["offerGroup"], subscription["status"]) == (
        "pro-monthly", "pro", "active")
    # The first invoice: the allowance, expiring at the period end; the checkout's order is paid.
    [allowance] = pro_lots()
    assert (allowance["source"], allowance["granted"], allowance["subscriptionId"]) == ("subscription", 2000, sub)
    assert allowance["expiresAt"] == subscription["currentPeriodEnd"]
    order = requests.get(f"{base}/orders/{session['orderId']}", headers=headers, timeout=10).json()["order"]
    assert (order["status"], order["expiresAt"]) == ("paid", subscription["currentPeriodEnd"])

    # The top-up, unlocked by the plan's group, bought like any pack.
    visible = {o["offerId"] for o in requests.get(f"{base}/offers", headers=headers, timeout=10).json()["offers"]}
    assert {"pro-top-up", "tokens-250-pro"} <= visible
    topped = requests.post(f"{base}/orders", json={"offerId": "pro-top-up"}, headers=headers, timeout=30)
    assert topped.status_code == 201, topped.text
    top_up = topped.json()["order"]
    assert (top_up["offerGroup"], top_up["amount"], top_up["status"]) == ("pro", 900, "pending")
    paid = dev_server.cli("pay", top_up["orderId"])
    assert paid.returncode == 0, paid.stdout + paid.stderr

    # A renewal: a new lot for the next period, beside the first month's and the top-up.
    renewed = dev_server.cli("renew", sub)
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    lots = pro_lots()
    assert [(lot["source"], lot["granted"], lot["remaining"]) for lot in lots] == [
        ("subscription", 2000, 2000), ("subscription", 2000, 2000), ("order", 500, 500)]
    assert lots[1]["startsAt"] == lots[0]["expiresAt"] and lots[2]["expiresAt"] is None
    ledger = requests.get(f"{base}/credits/ledger", params={"offerGroup": "pro"}, headers=headers, timeout=10)
    assert [(e["reason"], e["delta"]) for e in ledger.json()["items"]] == [
        ("renewal", 2000), ("purchase", 500), ("purchase", 2000)]

    # A failed renewal: past_due and its event; then a cancellation: canceled and its event, no more renewals.
    failed = dev_server.cli("fail-renewal", sub)
    assert failed.returncode == 0, failed.stdout + failed.stderr
    assert subscriptions()[0]["status"] == "past_due"
    [payment_failed] = events("SubscriptionPaymentFailed")
    assert (payment_failed["subscriptionId"], payment_failed["status"], payment_failed["balance"]) == (
        sub, "past_due", 4500)
    canceled = dev_server.cli("cancel", sub)
    assert canceled.returncode == 0, canceled.stdout + canceled.stderr
    [listed] = subscriptions()
    assert (listed["subscriptionId"], listed["status"], listed["cancelAtPeriodEnd"]) == (sub, "canceled", False)
    [cancellation] = events("SubscriptionCanceled")
    assert (cancellation["subscriptionId"], cancellation["orderId"]) == (sub, session["orderId"])
    again = dev_server.cli("renew", sub)
    assert again.returncode == 2 and f"subscription {sub} is canceled" in again.stderr
    assert len(pro_lots()) == 3  # the lots live on until they expire
    service = requests.get(f"{base}/users/{user}/subscriptions", timeout=10)
    assert service.status_code == 200 and service.json()["subscriptions"] == [listed]
    portal = requests.post(f"{base}/billing-portal", json={"returnUrl": "https://app.example/account"},
                           headers=headers, timeout=30)
    assert portal.status_code == 201 and "/_fake/billing_portal/bps_" in portal.json()["url"]

    # The free trial: once per user; free, so not through Checkout.
    trial = requests.post(f"{base}/orders", json={"offerId": "trial"}, headers=headers, timeout=30)
    assert trial.status_code == 201, trial.text
    assert (trial.json()["order"]["status"], trial.json()["order"]["amount"]) == ("paid", 0)
    second = requests.post(f"{base}/orders", json={"offerId": "trial"}, headers=headers, timeout=30)
    assert (second.status_code, second.json()["error"]) == (409, "purchase_limit_reached")
    free_checkout = requests.post(f"{base}/checkout", json={"offerId": "trial", **PAGES}, headers=headers, timeout=30)
    assert (free_checkout.status_code, free_checkout.json()["error"]) == (422, "validation_error")


def _http(server: DevServer, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = requests.request(method, f"{server.url}{path}", timeout=30, **kwargs)
    return response.status_code, response.json()


def _direct(service: Any, method: str, path: str, kwargs: dict[str, Any]) -> Any:
    """The same request straight to the function's handler, as the conftest's outside tests send it."""
    raw = kwargs.get("data", json.dumps(kwargs["json"]).encode() if "json" in kwargs else None)
    headers = dict(kwargs.get("headers", {}))
    if "json" in kwargs:
        headers["Content-Type"] = "application/json"
    raw_body = raw.decode() if isinstance(raw, bytes) else raw
    return service.call(method, path, raw_body=raw_body, headers=headers,
                        iam=path.startswith(("/admin/", "/users/")))


def test_bad_requests_get_the_handlers_errors_and_the_server_keeps_serving(
    dev_server: DevServer, local_service: Any
) -> None:
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("malformed JSON", "PUT", "/admin/offers/broken", {"data": b"{not json", "headers": json_type},
         400, "validation_error"),
        ("wrong types", "PUT", "/admin/offers/broken",
         {"json": {"offerGroup": "g", "tokens": "2", "cycle": "once", "prices": {"usd": 1}}}, 422, "validation_error"),
        ("unknown field", "PUT", "/admin/offers/broken",
         {"json": {"offerGroup": "g", "tokens": 2, "cycle": "once", "prices": {"usd": 1}, "colour": "red"}},
         422, "validation_error"),
        ("no token", "GET", "/offers", {}, 401, "unauthorized"),
        ("not a JWT", "GET", "/offers", {"headers": {"Authorization": "Bearer alice"}}, 401, "unauthorized"),
        ("huge body", "PUT", "/admin/offers/huge", {"data": b'{"x": "' + b"a" * 300_000 + b'"}', "headers": json_type},
         413, "payload_too_large"),
        ("unknown route", "GET", "/nowhere", {}, 404, "not_found"),
        ("unknown method", "DELETE", "/offers", {}, 404, "not_found"),
    ]
    for name, method, path, kwargs, status, code in cases:
        got = _http(dev_server, method, path, **kwargs)
        assert (got[0], got[1]["error"]) == (status, code), name
        assert isinstance(got[1]["message"], str), name
        if code != "not_found":  # a route no function serves has no handler to compare with
            direct = _direct(local_service, method, path, kwargs)
            assert (direct.status, direct.error) == (got[0], got[1]["error"]), f"{name}: HTTP differs from the handler"
    # A body over API Gateway's own 10 MB limit is refused without being read.
    response = requests.put(f"{dev_server.url}/admin/offers/x", data=b"a" * (11 * 1024 * 1024),
                            headers=json_type, timeout=30)
    assert (response.status_code, response.json()["error"]) == (413, "payload_too_large")
    # Nothing of the bad requests was written, and the server still serves.
    listed = requests.get(f"{dev_server.url}/admin/offers", timeout=10)
    assert listed.status_code == 200
    assert not {"broken", "huge", "x"} & {o["offerId"] for o in listed.json()["offers"]}
    assert requests.get(f"{dev_server.url}/offers", headers=auth("still-here"), timeout=10).status_code == 200
    assert dev_server.process is not None and dev_server.process.poll() is None


def test_docs_and_openapi_are_served(dev_server: DevServer) -> None:
    docs = requests.get(f"{dev_server.url}/docs", timeout=10)
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    document = requests.get(f"{dev_server.url}/openapi.json", timeout=10).json()
    assert "/offers" in document["paths"] and "/admin/offers/{offerId}" in document["paths"]
    # The link Swagger UI shows for the document.
    linked = requests.get(f"{dev_server.url}/docs?format=json", timeout=10)
    assert linked.headers["Content-Type"] == "application/json" and linked.json() == document
    # Someone who opens the bare URL is told where to look.
    index = requests.get(f"{dev_server.url}/", timeout=10).json()
    assert index["docs"] == "/docs" and "POST /users/{userId}/consume" in index["routes"]


def test_the_state_file_says_which_stripe_the_server_uses(dev_server: DevServer) -> None:
    state = json.loads((dev_server.data_dir / "dev.json").read_text(encoding="utf-8"))
    assert state["stripe_mode"] == "local" and state["stripe_api_base"].startswith("http://127.0.0.1:")
    assert f"the local Stripe fake at {state['stripe_api_base']}" in dev_server.log()


def test_cors_preflights_are_answered_as_the_http_api_answers_them(dev_server: DevServer) -> None:
    """SPEC 3: with AllowedOrigins set, a browser front-end on that origin can call the user routes."""
    asked = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type,idempotency-key"}
    preflight = requests.options(f"{dev_server.url}/orders", headers=asked, timeout=10)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert set(preflight.headers["Access-Control-Allow-Methods"].split(",")) >= {"GET", "POST", "PUT"}
    assert set(preflight.headers["Access-Control-Allow-Headers"].split(",")) == {
        "authorization", "content-type", "idempotency-key"}
    assert preflight.headers["Access-Control-Max-Age"] == "600"
    # The call itself carries the origin back, so the browser hands the answer to the page.
    offers = requests.get(f"{dev_server.url}/offers", headers={**auth("cors-user"), "Origin": APP_ORIGIN},
                          timeout=10)
    assert offers.status_code == 200 and offers.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    # Another origin gets no Access-Control headers at all: the browser refuses.
    stranger = requests.options(f"{dev_server.url}/orders", headers={**asked, "Origin": "http://evil.localhost"},
                                timeout=10)
    assert stranger.status_code == 204 and "Access-Control-Allow-Origin" not in stranger.headers
    plain = requests.get(f"{dev_server.url}/offers", headers={**auth("cors-user"), "Origin": "http://evil.localhost"},
                         timeout=10)
    assert "Access-Control-Allow-Origin" not in plain.headers
