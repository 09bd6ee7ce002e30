"""A small in-memory Stripe: exactly the endpoints the service calls, plus signed webhook payloads.

Used by the tests and by the local dev server. Point the SDK at it with `STRIPE_API_BASE=<base_url>`.

Endpoints: `POST /v1/payment_intents` (honours `Idempotency-Key` the way Stripe does: the same key and
parameters replay the first response, the same key with other parameters is a 400 `idempotency_error`)
and `GET /v1/payment_intents/{id}`. Webhook helpers build `payment_intent.*` and `charge.refunded`
events shaped like Stripe's and sign them as Stripe does (`t=<unix>,v1=<HMAC-SHA256 of "t.payload">`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

API_VERSION = "2025-09-30.clover"


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` header Stripe would send for `payload` at `timestamp`."""
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def signed_delivery(event: Mapping[str, Any], secret: str, timestamp: int | None = None) -> tuple[bytes, str]:
    """The body and `Stripe-Signature` header of one webhook delivery of `event`."""
    payload = json.dumps(event, separators=(",", ":")).encode()
    return payload, sign(payload, secret, int(time.time()) if timestamp is None else timestamp)


def _event(event_type: str, obj: Mapping[str, Any], event_id: str | None, created: int | None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": {"object": dict(obj)},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def payment_intent_event(
    intent: Mapping[str, Any],
    event_type: str = "payment_intent.succeeded",
    *,
    amount_received: int | None = None,
    currency: str | None = None,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A `payment_intent.succeeded` / `payment_failed` / `canceled` event for `intent`.

    `amount_received` and `currency` override what the intent says, to build inconsistent payments.
    """
    statuses = {
        "payment_intent.succeeded": "succeeded",
        "payment_intent.payment_failed": "requires_payment_method",
        "payment_intent.canceled": "canceled",
    }
    obj = dict(intent)
    obj["status"] = statuses.get(event_type, str(intent.get("status")))
    succeeded = event_type == "payment_intent.succeeded"
    obj["amount_received"] = (intent["amount"] if succeeded else 0) if amount_received is None else amount_received
    if currency is not None:
        obj["currency"] = currency
    if event_type == "payment_intent.payment_failed":
        obj["last_payment_error"] = {
            "code": "card_declined", "message": "Your card was declined.", "type": "card_error",
        }
    if event_type == "payment_intent.canceled":
        obj["canceled_at"] = int(time.time())
        obj["cancellation_reason"] = "requested_by_customer"
    return _event(event_type, obj, event_id, created)


def charge_refunded_event(
    intent: Mapping[str, Any],
    amount_refunded: int,
    *,
    with_metadata: bool = False,
    event_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """A `charge.refunded` event for the intent's charge; `amount_refunded` is cumulative, as in Stripe.

    Stripe does not copy a PaymentIntent's metadata onto its charge, so by default the charge names only
    its `payment_intent`; `with_metadata` adds the metadata for integrations that copy it.
    """
    amount = int(intent["amount"])
    charge: dict[str, Any] = {
        "id": "ch_" + str(intent["id"]).removeprefix("pi_"),
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "captured": True,
        "currency": intent["currency"],
        "livemode": False,
        "metadata": dict(intent.get("metadata") or {}) if with_metadata else {},
        "paid": True,
        "payment_intent": intent["id"],
        "refunded": amount_refunded >= amount,
        "status": "succeeded",
    }
    return _event("charge.refunded", charge, event_id, created)


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (`metadata[orderId]=x`) back into nested dicts."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return out


class FakeStripe:
    """A threaded HTTP server on loopback that keeps created PaymentIntents in memory."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.intents: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._idempotent: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeStripe:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-stripe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ------------------------------------------------------------ inspection and control
    def intent(self, intent_id: str) -> dict[str, Any]:
        with self._lock:
            return dict(self.intents[intent_id])

    def intent_for_order(self, order_id: str) -> dict[str, Any] | None:
        with self._lock:
            for intent in self.intents.values():
                if intent.get("metadata", {}).get("orderId") == order_id:
                    return dict(intent)
        return None

    def created_count(self) -> int:
        with self._lock:
            return len(self.intents)

    def fail_next(self, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` API calls with `status` (a Stripe outage or a card-network error)."""
        with self._lock:
            self._failures.extend([status] * times)

    def set_status(self, intent_id: str, status: str) -> dict[str, Any]:
        """Move an intent on (e.g. to `succeeded` after a simulated payment); returns it."""
        with self._lock:
            intent = self.intents[intent_id]
            intent["status"] = status
            if status == "succeeded":
                intent["amount_received"] = intent["amount"]
            return dict(intent)

    # ------------------------------------------------------------ the HTTP side
    def _create_intent(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            amount = int(params["amount"])
            currency = str(params["currency"]).lower()
        except (KeyError, ValueError):
            return 400, _error("invalid_request_error", "amount and currency are required", "parameter_missing")
        if amount < 1:
            return 400, _error("invalid_request_error", "amount must be at least 1", "parameter_invalid_integer")
        intent_id = f"pi_{secrets.token_hex(12)}"
        intent = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_received": 0,
            "automatic_payment_methods": {"enabled": True},
            "capture_method": "automatic",
            "client_secret": f"{intent_id}_secret_{secrets.token_hex(12)}",
            "confirmation_method": "automatic",
            "created": int(time.time()),
            "currency": currency,
            "livemode": False,
            "metadata": dict(params.get("metadata") or {}),
            "status": "requires_payment_method",
        }
        self.intents[intent_id] = intent
        return 200, dict(intent)

    def _dispatch(self, method: str, path: str, headers: Mapping[str, str], body: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append((method, path, dict(headers)))
            if self._failures:
                status = self._failures.pop(0)
                return status, _error("api_error", "the fake was told to fail this call")
            if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
                return 401, _error("invalid_request_error", "Invalid API Key provided")
            if method == "POST" and path == "/v1/payment_intents":
                params = _nest(parse_qsl(body, keep_blank_values=True))
                key = headers.get("idempotency-key")
                fingerprint = hashlib.sha256(body.encode()).hexdigest()
                if key is not None and key in self._idempotent:
                    seen, status, response = self._idempotent[key]
                    if seen != fingerprint:
                        return 400, _error(
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same parameters they were "
                            "first used with.",
                        )
                    return status, dict(response)
                status, response = self._create_intent(params)
                if key is not None:
                    self._idempotent[key] = (fingerprint, status, response)
                return status, response
            if method == "GET" and path.startswith("/v1/payment_intents/"):
                intent = self.intents.get(path.rsplit("/", 1)[1])
                if intent is None:
                    return 404, _error("invalid_request_error", "No such payment_intent", "resource_missing")
                return 200, dict(intent)
            return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path})")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                path = urlsplit(self.path).path
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, payload = fake._dispatch(method, path, headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
                if status >= 500:
                    # As Stripe does for failures a retry cannot fix; keeps the SDK's own retries short.
                    self.send_header("Stripe-Should-Retry", "false")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, format: str, *args: Any) -> None:  # silence the per-request stderr lines
                return

        return Handler


def _error(kind: str, message: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code is not None:
        error["code"] = code
    return {"error": error}
