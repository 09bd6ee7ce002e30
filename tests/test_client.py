"""The Python client (client/user_credits_client) against `user-credits dev`, and its retries against a
loopback server that answers 503 first."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import Credentials
from test_dev_server import DevServer
from user_credits_client import (
    ClosedHold,
    CreditsClient,
    HoldClosed,
    HoldNotFound,
    IdempotencyKeyReused,
    InsufficientCredits,
    NotFound,
    ServiceUnavailable,
    ValidationError,
)

from user_credits_dev.server import unsigned_token

KEYS = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    tmp_path: Path = tmp_path_factory.mktemp("client")
    dev = DevServer(tmp_path / "local-data", tmp_path / "dev.log").start()
    try:
        yield dev
    finally:
        dev.stop()


def test_service_calls_give_typed_results_and_named_errors(server: DevServer, ids: Any) -> None:
    client = CreditsClient(server.url, region="us-east-1", credentials=KEYS)
    user, group = ids("u"), ids("g")
    granted = client.grant(user, group, 100, reason="welcome", priority=10)
    assert (granted.balance, granted.lot_id is not None) == (100, True)
    consumed = client.consume(user, group, 30)
    assert (consumed.consumed, consumed.balance, consumed.expires_at) == (30, 70, None)
    with pytest.raises(InsufficientCredits) as refusal:
        client.consume(user, group, 500)
    assert refusal.value.balance == 70 and refusal.value.status == 402
    credits = client.credits(user)
    assert credits.balance(group) == 70 and credits.balance("nothing-here") == 0
    [lot] = credits.groups[group].lots
    assert (lot.lot_id, lot.remaining, lot.priority) == (granted.lot_id, 70, 10)
    with pytest.raises(ValidationError):
        client.grant(user, group, 0)


def test_a_repeated_idempotency_key_replays_and_another_body_is_refused(server: DevServer, ids: Any) -> None:
    client = CreditsClient(server.url, credentials=KEYS)
    user, group = ids("u"), ids("g")
    client.grant(user, group, 10)
    first = client.consume(user, group, 4, idempotency_key="job-1")
    assert client.consume(user, group, 4, idempotency_key="job-1") == first
    with pytest.raises(IdempotencyKeyReused):
        client.consume(user, group, 5, idempotency_key="job-1")
    assert client.credits(user).balance(group) == 6


def test_a_hold_settles_at_the_real_cost_and_a_closed_hold_is_a_named_error(server: DevServer, ids: Any) -> None:
    client = CreditsClient(server.url, credentials=KEYS)
    user, group = ids("u"), ids("g")
    client.grant(user, group, 1000)
    held = client.hold(user, group, 500, ttl_seconds=600, idempotency_key="model-call-1")
    assert (held.user_id, held.offer_group, held.tokens, held.balance) == (user, group, 500, 500)
    expires = datetime.fromisoformat(held.expires_at.replace("Z", "+00:00"))
    assert timedelta(seconds=590) < expires - datetime.now(UTC) <= timedelta(seconds=600)
    assert client.hold(user, group, 500, ttl_seconds=600, idempotency_key="model-call-1") == held
    settled = client.settle(user, held.hold_id, 320)
    assert settled == ClosedHold(held.hold_id, 320, 180, 680, "settled")
    assert client.settle(user, held.hold_id, 320) == settled
    with pytest.raises(HoldClosed) as closed:
        client.release(user, held.hold_id)
    assert (closed.value.status, closed.value.code) == (409, "hold_closed")
    short = client.hold(user, group, 100)
    with pytest.raises(InsufficientCredits):
        client.settle(user, short.hold_id, 10**6)
    assert client.release(user, short.hold_id) == ClosedHold(short.hold_id, 0, 100, 680, "released")
    with pytest.raises(HoldNotFound) as missing:
        client.settle(user, ids("no-such-hold"), 1)
    assert isinstance(missing.value, NotFound) and missing.value.code == "hold_not_found"
    assert client.credits(user).balance(group) == 680


def test_the_ledger_iterates_every_page_newest_first(server: DevServer, ids: Any) -> None:
    client = CreditsClient(server.url, credentials=KEYS)
    user, group = ids("u"), ids("g")
    client.grant(user, group, 50, reason="start")
    for tokens in (1, 2, 3, 4):
        client.consume(user, group, tokens)
    entries = list(client.ledger(user, offer_group=group, page_size=2))
    assert [(e.reason, e.delta, e.seq) for e in entries] == [
        ("consume", -4, 5), ("consume", -3, 4), ("consume", -2, 3), ("consume", -1, 2), ("grant", 50, 1)]
    assert entries[-1].note == "start" and all(e.idempotency_key for e in entries[:4])


def test_user_routes_take_the_users_token(server: DevServer, ids: Any) -> None:
    user = ids("u")
    client = CreditsClient(server.url, user_token=unsigned_token(user))
    offers = client.offers()
    assert offers and all("subscribed" in offer for offer in offers)
    order = client.create_order(offers[0]["offerId"])
    assert order["status"] in ("pending", "paid") and client.order(order["orderId"])["orderId"] == order["orderId"]
    with pytest.raises(NotFound):
        client.order(ids("no-such-order"))
    assert client.credits().user_id == user


class _Flaky(BaseHTTPRequestHandler):
    """503 with Retry-After: 0 on the first request, then the consume's answer; keeps what it saw."""

    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        if len(self.seen) == 1:
            status, body, extra = 503, {"error": "service_unavailable", "message": "busy"}, {"Retry-After": "0"}
        else:
            status, extra = 200, {}
            body = {"userId": "u", "offerGroup": "g", "consumed": 1, "balance": 9, "expiresAt": None}
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)), **extra}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_503_is_retried_with_the_same_idempotency_key_and_signed_each_time() -> None:
    _Flaky.seen = []
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        client = CreditsClient(f"http://127.0.0.1:{http.server_address[1]}", region="eu-west-1", credentials=KEYS)
        assert client.consume("u", "g", 1).balance == 9
        first, second = _Flaky.seen
        assert first["idempotency-key"] == second["idempotency-key"]
        for headers in (first, second):
            assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            assert "/eu-west-1/execute-api/aws4_request" in headers["authorization"]
        _Flaky.seen = []
        one_try = CreditsClient(f"http://127.0.0.1:{http.server_address[1]}", credentials=KEYS, attempts=1)
        with pytest.raises(ServiceUnavailable):
            one_try.consume("u", "g", 1)
    finally:
        http.shutdown()
        http.server_close()
