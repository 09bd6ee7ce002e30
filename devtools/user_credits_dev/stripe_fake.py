"""A small in-memory Stripe: exactly the endpoints the service calls, plus signed webhook payloads.

Used by the tests and by the local dev server. Point the SDK at it with `STRIPE_API_BASE=<base_url>`.

Endpoints (Stripe's paths and form encoding):
- `POST /v1/payment_intents`, `GET /v1/payment_intents/{id}`;
- `POST /v1/customers`, `GET /v1/customers/{id}`;
- `POST /v1/checkout/sessions` (modes `payment` and `subscription`, prices inline with `price_data`),
  `GET /v1/checkout/sessions/{id}`;
- `POST /v1/billing_portal/sessions`;
- `GET /v1/subscriptions/{id}`, `GET /v1/invoices/{id}`.
Every request is checked against the parameters Stripe documents for that endpoint, read from the typed
params of the installed stripe-python (`stripe.params`, generated from Stripe's OpenAPI spec): a name
Stripe does not document is refused as Stripe refuses it (400 `parameter_unknown`, "Received unknown
parameter: line_items[0][foo]"), and so are a missing required sub-parameter (`parameter_missing`), a
non-integer where Stripe wants an integer (`parameter_invalid_integer`), a boolean that is not
`true`/`false` and a value outside a documented enum. Every POST honours `Idempotency-Key` the way
Stripe does: the same key and parameters replay the first answer (header `Idempotent-Replayed: true`),
the same key with other parameters or on another endpoint is a 400 `idempotency_error`; a request
refused for its parameters is not remembered.

What a customer does on Stripe's pages, and time passing, are played by control methods that change
the fake's objects and return the webhook events Stripe would send (`complete_session`, `renew`,
`fail_renewal`, `cancel`), also reachable over HTTP under `/_fake/...` (outside Stripe's API paths) for
the `user-credits` commands, which talk to the dev server's fake from another process. Events have the
shapes of API version `2025-09-30.clover` (stripe/openapi's fixtures): an invoice names its subscription
under `parent.subscription_details`, a subscription's period lives on its items. Webhook helpers build
`payment_intent.*` and `charge.refunded` events and sign them as Stripe does
(`t=<unix>,v1=<HMAC-SHA256 of "t.payload">`).
"""

from __future__ import annotations

import calendar
import copy
import functools
import hashlib
import hmac
import importlib
import json
import re
import secrets
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import typing_extensions

API_VERSION = "2025-09-30.clover"
DAY = 86_400


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` header Stripe would send for `payload` at `timestamp`."""
    signed = f"{timestamp}.".encode() + payload
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def signed_delivery(event: Mapping[str, Any], secret: str, timestamp: int | None = None) -> tuple[bytes, str]:
    """The body and `Stripe-Signature` header of one webhook delivery of `event`."""
    payload = json.dumps(event, separators=(",", ":")).encode()
    return payload, sign(payload, secret, int(time.time()) if timestamp is None else timestamp)


def _event(
    event_type: str,
    obj: Mapping[str, Any],
    event_id: str | None,
    created: int | None,
    previous_attributes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": copy.deepcopy(dict(obj))}
    if previous_attributes is not None:  # Stripe sends it on `*.updated` events only
        data["previous_attributes"] = copy.deepcopy(dict(previous_attributes))
    return {
        "id": event_id or f"evt_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": API_VERSION,
        "created": int(time.time()) if created is None else created,
        "data": data,
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
    """Stripe's form encoding (`metadata[orderId]=x`, `line_items[0][quantity]=1`) back into nested dicts
    (list indexes stay keys: `{"line_items": {"0": {...}}}`)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        target = out
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):  # `metadata=` (unset all) then `metadata[k]=v`
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return out


# ---------------------------------------------------------------- billing periods, as Stripe counts them


def add_months(timestamp: int, months: int) -> int:
    """`timestamp` plus whole calendar months (UTC), the day clamped to the month's last: Jan 31 + 1 month
    is Feb 28 (29 in a leap year)."""
    start = datetime.fromtimestamp(timestamp, UTC)
    years, month0 = divmod(start.month - 1 + months, 12)
    year, month = start.year + years, month0 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return int(start.replace(year=year, month=month, day=day).timestamp())


def period_boundary(anchor: int, interval: str, interval_count: int, periods: int) -> int:
    """The end of the `periods`-th billing period of a subscription anchored at `anchor`.

    Counted from the anchor, not from the previous boundary, as Stripe bills: a monthly subscription
    anchored on Jan 31 renews on Feb 28 (or 29), then Mar 31, Apr 30, ...
    """
    if interval == "day":
        return anchor + periods * interval_count * DAY
    if interval == "week":
        return anchor + periods * interval_count * 7 * DAY
    if interval == "month":
        return add_months(anchor, periods * interval_count)
    if interval == "year":
        return add_months(anchor, periods * interval_count * 12)
    raise ValueError(f"unknown interval {interval!r}")


# ---------------------------------------------------------------- the documented parameters


@dataclass(frozen=True)
class _Scalar:
    kinds: frozenset[str]  # of "str", "int", "bool", "float", "decimal", "any"
    choices: frozenset[str] = frozenset()  # the documented values of a `Literal[...]`


@dataclass(eq=False)
class _Object:
    name: str
    fields: dict[str, _Node] = field(default_factory=dict)
    required: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _List:
    item: _Node


@dataclass(frozen=True)
class _Map:  # free keys (metadata, currency_options, ...)
    value: _Node


@dataclass(frozen=True)
class _Union:
    options: tuple[_Node, ...]


_Node = _Scalar | _Object | _List | _Map | _Union

# stripe-python's typed params for each endpoint: `stripe.params` is generated from Stripe's OpenAPI spec,
# one TypedDict per endpoint, nested TypedDicts for sub-parameters (what https://docs.stripe.com/api lists).
ENDPOINT_PARAMS: dict[str, tuple[str, str]] = {
    "POST /v1/customers": ("stripe.params", "CustomerCreateParams"),
    "GET /v1/customers/{id}": ("stripe.params", "CustomerRetrieveParams"),
    "POST /v1/checkout/sessions": ("stripe.params.checkout", "SessionCreateParams"),
    "GET /v1/checkout/sessions/{id}": ("stripe.params.checkout", "SessionRetrieveParams"),
    "POST /v1/billing_portal/sessions": ("stripe.params.billing_portal", "SessionCreateParams"),
    "POST /v1/payment_intents": ("stripe.params", "PaymentIntentCreateParams"),
    "GET /v1/payment_intents/{id}": ("stripe.params", "PaymentIntentRetrieveParams"),
    "GET /v1/subscriptions/{id}": ("stripe.params", "SubscriptionRetrieveParams"),
    "GET /v1/invoices/{id}": ("stripe.params", "InvoiceRetrieveParams"),
}
# Keys of stripe-python's RequestOptions, which every endpoint's params class inherits: options of the
# client (sent as headers), never parameters.
_REQUEST_OPTIONS = frozenset({"api_key", "stripe_version", "stripe_account", "stripe_context",
                              "max_network_retries", "idempotency_key", "content_type", "headers"})
_WRAPPERS = {typing.NotRequired, typing.Required, typing_extensions.NotRequired, typing_extensions.Required}
_LITERALS = {typing.Literal, typing_extensions.Literal}
_KINDS: dict[Any, str] = {str: "str", int: "int", bool: "bool", float: "float", Decimal: "decimal"}


@functools.cache
def documented_params(endpoint: str) -> _Object:
    """The parameter tree Stripe documents for `endpoint` (a key of ENDPOINT_PARAMS)."""
    module_name, class_name = ENDPOINT_PARAMS[endpoint]
    params_class = getattr(importlib.import_module(module_name), class_name)
    return _typed_dict(params_class, {}, top=True)


def documented_names(endpoint: str) -> set[str]:
    """Every parameter path `endpoint` documents, in Stripe's spelling (`line_items[][price_data][currency]`,
    `metadata[*]`): for reading, and for tests."""
    names: set[str] = set()

    def walk(node: _Node, path: str, seen: frozenset[int]) -> None:
        if isinstance(node, _Union):
            for option in node.options:
                walk(option, path, seen)
        elif isinstance(node, _Object):
            if id(node) in seen:
                return
            for key, child in node.fields.items():
                walk(child, f"{path}[{key}]" if path else key, seen | {id(node)})
        elif isinstance(node, _List):
            walk(node.item, f"{path}[]", seen)
        elif isinstance(node, _Map):
            walk(node.value, f"{path}[*]", seen)
        else:
            names.add(path)

    walk(documented_params(endpoint), "", frozenset())
    return names


def _typed_dict(params_class: Any, memo: dict[Any, _Object], *, top: bool = False) -> _Object:
    if params_class in memo:
        return memo[params_class]
    node = _Object(params_class.__name__, required=frozenset(getattr(params_class, "__required_keys__", ())))
    memo[params_class] = node  # before the fields: sub-parameters may refer back to it
    namespace = vars(sys.modules[params_class.__module__])
    for name, annotation in params_class.__annotations__.items():
        if top and name in _REQUEST_OPTIONS:
            continue
        node.fields[name] = _type_node(annotation, namespace, memo)
    node.required -= _REQUEST_OPTIONS if top else frozenset()
    return node


def _type_node(annotation: Any, namespace: dict[str, Any], memo: dict[Any, _Object]) -> _Node:
    if isinstance(annotation, typing.ForwardRef):
        annotation = annotation.__forward_arg__
    if isinstance(annotation, str):  # a type expression of stripe-python's generated code, in its module
        annotation = eval(annotation, namespace)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in _WRAPPERS:
        return _type_node(args[0], namespace, memo)
    if origin in (typing.Union, types.UnionType):
        return _union([_type_node(a, namespace, memo) for a in args if a is not type(None)])
    if origin in _LITERALS:
        return _Scalar(frozenset(), frozenset(str(a).lower() if isinstance(a, bool) else str(a) for a in args))
    if origin is list:
        return _List(_type_node(args[0], namespace, memo))
    if origin is dict or getattr(origin, "__name__", "") == "UntypedStripeObject":
        return _Map(_type_node(args[-1], namespace, memo) if args else _Scalar(frozenset({"any"})))
    if typing_extensions.is_typeddict(annotation):
        return _typed_dict(annotation, memo)
    return _Scalar(frozenset({_KINDS.get(annotation, "any")}))


def _union(options: list[_Node]) -> _Node:
    flat: list[_Node] = []
    for option in options:
        flat.extend(option.options if isinstance(option, _Union) else [option])
    scalars = [o for o in flat if isinstance(o, _Scalar)]
    others = [o for o in flat if not isinstance(o, _Scalar)]
    merged: list[_Node] = []
    if scalars:
        merged.append(_Scalar(frozenset().union(*(s.kinds for s in scalars)),
                              frozenset().union(*(s.choices for s in scalars))))
    merged.extend(others)
    return merged[0] if len(merged) == 1 else _Union(tuple(merged))


class _Refusal(Exception):
    """An answer other than success; `remember` says whether an Idempotency-Key keeps it."""

    def __init__(self, status: int, body: dict[str, Any], *, remember: bool = True) -> None:
        super().__init__(body["error"]["message"])
        self.status, self.body, self.remember = status, body, remember


def _invalid(message: str, param: str, code: str | None = None) -> _Refusal:
    return _Refusal(400, _error("invalid_request_error", message, code, param), remember=False)


def check_params(endpoint: str, params: Mapping[str, Any]) -> None:
    """Refuse, as Stripe does, a parameter `endpoint` does not document or a value of the wrong type."""
    _check(documented_params(endpoint), params, "")


def _check(node: _Node, value: Any, path: str) -> None:
    if isinstance(node, _Union):
        node = _pick(node, value)
    if isinstance(node, _Scalar):
        _check_scalar(node, value, path)
    elif isinstance(node, _Object):
        if not isinstance(value, dict):
            raise _invalid(f"Invalid object: {path} takes sub-parameters ({path}[...])", path)
        for key, sub in value.items():
            child_path = f"{path}[{key}]" if path else key
            child = node.fields.get(key)
            if child is None:
                raise _invalid(f"Received unknown parameter: {child_path}", child_path, "parameter_unknown")
            _check(child, sub, child_path)
        for key in sorted(node.required - value.keys()):
            missing = f"{path}[{key}]" if path else key
            raise _invalid(f"Missing required param: {missing}.", missing, "parameter_missing")
    elif isinstance(node, _List):
        if not isinstance(value, dict) or not all(k.isdigit() or k == "" for k in value):
            raise _invalid(f"Invalid array: {path} takes a list ({path}[0], {path}[1], ...)", path)
        for key, sub in value.items():
            _check(node.item, sub, f"{path}[{key}]")
    elif isinstance(node, _Map):
        if not isinstance(value, dict):
            if value == "":  # `metadata=`: unset every key
                return
            raise _invalid(f"Invalid hash: {path} takes keys ({path}[key])", path)
        if path.endswith("metadata"):
            _check_metadata(value, path)
        for key, sub in value.items():
            _check(node.value, sub, f"{path}[{key}]")


def _pick(node: _Union, value: Any) -> _Node:
    """The alternative of a union that the value's form fits (a string, a list, sub-parameters)."""
    if isinstance(value, str):
        scalar = next((o for o in node.options if isinstance(o, _Scalar)), None)
        return scalar if scalar is not None else node.options[0]
    if isinstance(value, dict) and value and all(k.isdigit() or k == "" for k in value):
        listed = next((o for o in node.options if isinstance(o, _List)), None)
        if listed is not None:
            return listed
    structured = [o for o in node.options if isinstance(o, _Object | _Map)]
    return structured[0] if structured else node.options[0]


def _check_scalar(node: _Scalar, value: Any, path: str) -> None:
    if not isinstance(value, str):
        raise _invalid(f"Invalid value: {path} takes a single value, not sub-parameters", path)
    if value in node.choices or (node.kinds & {"str", "any"} and not node.choices - {""}):
        return
    documented = sorted(node.choices - {""})
    if documented and node.kinds <= {"str"}:  # stripe-python adds `str` to enums only for new values
        raise _invalid(f"Invalid {path}: must be one of {', '.join(documented)}", path)
    if "int" in node.kinds and re.fullmatch(r"-?\d+", value):
        return
    if "bool" in node.kinds and value in ("true", "false"):
        return
    if node.kinds & {"float", "decimal"}:
        try:
            Decimal(value)
            return
        except InvalidOperation:
            pass
    if "int" in node.kinds:
        raise _invalid(f"Invalid integer: {value}", path, "parameter_invalid_integer")
    if "bool" in node.kinds:
        raise _invalid(f"Invalid boolean: {value}", path)
    raise _invalid(f"Invalid decimal: {value}", path)


def _check_metadata(metadata: Mapping[str, Any], path: str) -> None:
    """Stripe's metadata limits: 50 keys, keys up to 40 characters, values up to 500."""
    if len(metadata) > 50:
        raise _invalid("You can specify up to 50 keys in metadata.", path)
    for key, value in metadata.items():
        if len(key) > 40:
            raise _invalid(f"Metadata keys can have up to 40 characters, but you passed in {key!r}.", f"{path}[{key}]")
        if isinstance(value, str) and len(value) > 500:
            raise _invalid("Metadata values can have up to 500 characters.", f"{path}[{key}]")


# ---------------------------------------------------------------- the fake


def _id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


def _listed(items: list[dict[str, Any]], url: str) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": False, "url": url}


def _indexed(value: Any) -> list[Any]:
    """A form-encoded list (`{"0": a, "1": b}`) in index order."""
    if not isinstance(value, dict):
        return []
    return [value[k] for k in sorted(value, key=lambda k: int(k) if k.isdigit() else -1)]


@dataclass
class _Line:
    """One line of a Checkout Session, with the Price and Product Stripe makes of its `price_data`."""

    quantity: int
    currency: str
    unit_amount: int
    product_id: str
    product_name: str
    price_id: str
    interval: str | None
    interval_count: int

    @property
    def amount(self) -> int:
        return self.quantity * self.unit_amount


@dataclass
class _Billing:
    """How a subscription's periods fall: period n runs from boundary(n) to boundary(n + 1)."""

    anchor: int
    interval: str
    interval_count: int
    period: int = 0

    def boundary(self, n: int) -> int:
        return period_boundary(self.anchor, self.interval, self.interval_count, n)


_Answer = tuple[int, Any, dict[str, str]]
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern.replace("{id}", "(?P<id>[A-Za-z0-9_]+)") + r"\Z"), pattern)
    for method, pattern in (endpoint.split(" ", 1) for endpoint in ENDPOINT_PARAMS)
]
_CONTROL = re.compile(r"/_fake/(?:(?P<kind>checkout/sessions|subscriptions)/(?P<id>[A-Za-z0-9_]+)/(?P<action>\w+))\Z")
_PAGE = re.compile(r"/_fake/(?P<kind>checkout|billing_portal|invoices)/(?P<id>[A-Za-z0-9_]+)\Z")


class FakeStripe:
    """A threaded HTTP server on loopback that keeps what the service creates in memory.

    `clock` (default `time.time`) is when things happen: object and event times, billing period starts.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.api_key = api_key
        self.clock: Callable[[], float] = clock or time.time
        self.intents: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.portal_sessions: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        # The decoded parameters of each API request, in the order of `requests`.
        self.request_params: list[tuple[str, str, dict[str, Any]]] = []
        # Every event a control method returned, in order.
        self.events: list[dict[str, Any]] = []
        self._session_lines: dict[str, list[_Line]] = {}
        self._session_params: dict[str, dict[str, Any]] = {}
        self._billing: dict[str, _Billing] = {}
        self._idempotent: dict[str, tuple[str, str, _Answer]] = {}
        self._failures: list[int] = []
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeStripe:
        # A short poll: stop() waits for the loop to notice, and tests start and stop many fakes.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-stripe", daemon=True)
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

    def now(self) -> int:
        return int(self.clock())

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

    def session(self, session_id: str) -> dict[str, Any]:
        """A Checkout Session as `GET /v1/checkout/sessions/{id}` answers it."""
        with self._lock:
            return copy.deepcopy(self.sessions[session_id])

    def subscription(self, subscription_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.subscriptions[subscription_id])

    def customer(self, customer_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.customers[customer_id])

    def invoice(self, invoice_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.invoices[invoice_id])

    def invoices_of(self, subscription_id: str) -> list[dict[str, Any]]:
        """The subscription's invoices, oldest first."""
        with self._lock:
            return [copy.deepcopy(i) for i in self.invoices.values()
                    if i["parent"]["subscription_details"]["subscription"] == subscription_id]

    def session_for_order(self, order_id: str) -> dict[str, Any] | None:
        """The Checkout Session whose `metadata.orderId` is `order_id`, if any."""
        with self._lock:
            for found in self.sessions.values():
                if found.get("metadata", {}).get("orderId") == order_id:
                    return copy.deepcopy(found)
        return None

    def complete_session(self, session_id: str) -> list[dict[str, Any]]:
        """The customer pays on the Checkout page; returns the events Stripe sends.

        Mode `payment`: a succeeded PaymentIntent (with `payment_intent_data.metadata`), the session
        complete and paid: `checkout.session.completed`, then `payment_intent.succeeded` (Stripe sends
        both; the intent carries the order's metadata too). Mode `subscription`: an active subscription
        (metadata from `subscription_data.metadata`) whose first period starts now, its first invoice paid
        (`billing_reason` `subscription_create`): `checkout.session.completed`,
        `customer.subscription.created`, `invoice.paid`. Stripe does not promise any order.
        """
        with self._lock:
            found = self.sessions[session_id]
            if found["status"] != "open":
                raise ValueError(f"checkout session {session_id} is {found['status']}, not open")
            now = self.now()
            lines = self._session_lines[session_id]
            customer_id = found["customer"]
            if customer_id is None and found["mode"] == "subscription":  # Stripe makes one for the subscription
                customer_id = self._new_customer({}, now)["id"]
            customer = self.customers.get(customer_id) if customer_id else None
            found.update({
                "status": "complete", "payment_status": "paid", "customer": customer_id,
                "customer_details": {
                    "address": None, "business_name": None, "email": customer and customer["email"],
                    "individual_name": None, "name": customer and customer["name"], "phone": None,
                    "tax_exempt": "none", "tax_ids": [],
                },
            })
            if found["mode"] == "payment":
                intent = self._paid_intent(found, now)
                found["payment_intent"] = intent["id"]
                events = [self._emit("checkout.session.completed", found, now),
                          self._record(payment_intent_event(intent, created=now))]
                return copy.deepcopy(events)
            subscription = self._new_subscription(found, lines, now)
            invoice = self._new_invoice(subscription, "subscription_create", "paid", now, (now, now))
            subscription["latest_invoice"] = invoice["id"]
            found.update({"subscription": subscription["id"], "invoice": invoice["id"]})
            events = [self._emit("checkout.session.completed", found, now),
                      self._emit("customer.subscription.created", subscription, now),
                      self._emit("invoice.paid", invoice, now)]
            return copy.deepcopy(events)

    def renew(self, subscription_id: str) -> list[dict[str, Any]]:
        """The current period ends and the next one's invoice is paid (`billing_reason`
        `subscription_cycle`): `invoice.paid`, `customer.subscription.updated` (period advanced).

        On a `past_due` subscription the open invoice's retry succeeds instead (`invoice.paid`, then
        `customer.subscription.updated` back to `active`); on one set to cancel at period end the period
        ends and so does the subscription (`customer.subscription.deleted`, no invoice).
        """
        with self._lock:
            subscription = self._live_subscription(subscription_id)
            now = self.now()
            before = copy.deepcopy(subscription)
            if subscription["cancel_at_period_end"]:
                subscription.update({"status": "canceled", "ended_at": subscription["cancel_at"]})
                return copy.deepcopy([self._emit("customer.subscription.deleted", subscription, now)])
            open_invoice = self._open_invoice(subscription)
            if open_invoice is not None:
                self._pay(open_invoice, now)
                subscription["status"] = "active"
                events = [self._emit("invoice.paid", open_invoice, now),
                          self._emit("customer.subscription.updated", subscription, now, {"status": before["status"]})]
                return copy.deepcopy(events)
            invoice = self._next_period(subscription, "paid", now)
            events = [self._emit("invoice.paid", invoice, now),
                      self._emit("customer.subscription.updated", subscription, now, _changed(before, subscription))]
            return copy.deepcopy(events)

    def fail_renewal(self, subscription_id: str) -> list[dict[str, Any]]:
        """The current period ends and the next one's invoice cannot be paid: the invoice stays `open`
        (attempted), the subscription goes `past_due`: `invoice.payment_failed`,
        `customer.subscription.updated`. On a subscription already `past_due`, another retry of its open
        invoice fails: `invoice.payment_failed` only."""
        with self._lock:
            subscription = self._live_subscription(subscription_id)
            if subscription["cancel_at_period_end"]:
                raise ValueError(f"subscription {subscription_id} ends at its period end: it bills no renewal")
            now = self.now()
            open_invoice = self._open_invoice(subscription)
            if open_invoice is not None:
                open_invoice["attempt_count"] += 1
                open_invoice["next_payment_attempt"] = now + 3 * DAY
                return copy.deepcopy([self._emit("invoice.payment_failed", open_invoice, now)])
            before = copy.deepcopy(subscription)
            invoice = self._next_period(subscription, "open", now)
            subscription["status"] = "past_due"
            events = [self._emit("invoice.payment_failed", invoice, now),
                      self._emit("customer.subscription.updated", subscription, now, _changed(before, subscription))]
            return copy.deepcopy(events)

    def cancel(self, subscription_id: str, at_period_end: bool = False) -> list[dict[str, Any]]:
        """The customer cancels (in the portal): at once (`customer.subscription.deleted`, status
        `canceled`) or at the end of the current period (`customer.subscription.updated`,
        `cancel_at_period_end` true; a later `renew` ends it)."""
        with self._lock:
            subscription = self._live_subscription(subscription_id)
            now = self.now()
            before = copy.deepcopy(subscription)
            details = {"comment": None, "feedback": None, "reason": "cancellation_requested"}
            if not at_period_end:
                subscription.update({"status": "canceled", "canceled_at": now, "ended_at": now,
                                     "cancellation_details": details})
                return copy.deepcopy([self._emit("customer.subscription.deleted", subscription, now)])
            if subscription["cancel_at_period_end"]:
                raise ValueError(f"subscription {subscription_id} already cancels at its period end")
            period_end = subscription["items"]["data"][0]["current_period_end"]
            subscription.update({"cancel_at_period_end": True, "cancel_at": period_end, "canceled_at": now,
                                 "cancellation_details": details})
            return copy.deepcopy([self._emit("customer.subscription.updated", subscription, now,
                                             _changed(before, subscription))])

    # ------------------------------------------------------------ building Stripe's objects
    def _emit(self, event_type: str, obj: Mapping[str, Any], now: int,
              previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self._record(_event(event_type, obj, None, now, previous))

    def _record(self, event: dict[str, Any]) -> dict[str, Any]:
        self.events.append(event)
        return event

    def _live_subscription(self, subscription_id: str) -> dict[str, Any]:
        subscription = self.subscriptions[subscription_id]
        if subscription["status"] == "canceled":
            raise ValueError(f"subscription {subscription_id} is canceled")
        return subscription

    def _open_invoice(self, subscription: Mapping[str, Any]) -> dict[str, Any] | None:
        latest = self.invoices.get(subscription.get("latest_invoice") or "")
        return latest if latest is not None and latest["status"] == "open" else None

    def _new_customer(self, params: Mapping[str, Any], now: int) -> dict[str, Any]:
        customer: dict[str, Any] = {
            "id": _id("cus", 7), "object": "customer", "address": None, "balance": 0, "created": now,
            "currency": None, "default_source": None, "delinquent": False,
            "description": params.get("description"), "discount": None, "email": params.get("email"),
            "invoice_prefix": secrets.token_hex(4).upper(),
            "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                                 "rendering_options": None},
            "livemode": False, "metadata": dict(params.get("metadata") or {}), "name": params.get("name"),
            "next_invoice_sequence": 1, "phone": params.get("phone"), "preferred_locales": [],
            "shipping": None, "tax_exempt": "none", "test_clock": None,
        }
        self.customers[customer["id"]] = customer
        return customer

    def _paid_intent(self, found: Mapping[str, Any], now: int) -> dict[str, Any]:
        """The PaymentIntent of a paid `payment` session (Stripe makes it when the customer pays)."""
        intent_id = _id("pi")
        metadata = (self._session_params[found["id"]].get("payment_intent_data") or {}).get("metadata") or {}
        intent = {
            "id": intent_id, "object": "payment_intent", "amount": found["amount_total"],
            "amount_received": found["amount_total"], "automatic_payment_methods": None,
            "capture_method": "automatic", "client_secret": f"{intent_id}_secret_{secrets.token_hex(12)}",
            "confirmation_method": "automatic", "created": now, "currency": found["currency"],
            "customer": found["customer"], "latest_charge": _id("ch"), "livemode": False,
            "metadata": dict(metadata), "payment_method": _id("pm"), "payment_method_types": ["card"],
            "status": "succeeded",
        }
        self.intents[intent_id] = intent
        return intent

    def _new_subscription(self, found: Mapping[str, Any], lines: list[_Line], now: int) -> dict[str, Any]:
        subscription_id = _id("sub")
        first = lines[0]
        assert first.interval is not None
        billing = _Billing(now, first.interval, first.interval_count)
        self._billing[subscription_id] = billing
        items = [self._subscription_item(subscription_id, line, billing, now) for line in lines]
        metadata = (self._session_params[found["id"]].get("subscription_data") or {}).get("metadata") or {}
        subscription = {
            "id": subscription_id, "object": "subscription", "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": now, "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": {"proration_discounts": "included"}, "type": "flexible", "updated_at": now},
            "billing_thresholds": None, "cancel_at": None, "cancel_at_period_end": False, "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically", "created": now, "currency": first.currency,
            "customer": found["customer"], "days_until_due": None, "default_payment_method": _id("pm"),
            "default_source": None, "default_tax_rates": [], "description": None, "discounts": [],
            "ended_at": None, "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
            "items": _listed(items, f"/v1/subscription_items?subscription={subscription_id}"),
            "latest_invoice": None, "livemode": False, "metadata": dict(metadata),
            "next_pending_invoice_item_invoice": None, "on_behalf_of": None, "pause_collection": None,
            "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                                 "save_default_payment_method": "off"},
            "pending_invoice_item_interval": None, "pending_setup_intent": None, "pending_update": None,
            "schedule": None, "start_date": now, "status": "active", "test_clock": None, "transfer_data": None,
            "trial_end": None, "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": None,
        }
        self.subscriptions[subscription_id] = subscription
        return subscription

    def _subscription_item(self, subscription_id: str, line: _Line, billing: _Billing, now: int) -> dict[str, Any]:
        recurring = {"interval": line.interval, "interval_count": line.interval_count, "meter": None,
                     "trial_period_days": None, "usage_type": "licensed"}
        price = {
            "id": line.price_id, "object": "price", "active": False, "billing_scheme": "per_unit", "created": now,
            "currency": line.currency, "custom_unit_amount": None, "livemode": False, "lookup_key": None,
            "metadata": {}, "nickname": None, "product": line.product_id, "recurring": recurring,
            "tax_behavior": "unspecified", "tiers_mode": None, "transform_quantity": None, "type": "recurring",
            "unit_amount": line.unit_amount, "unit_amount_decimal": str(line.unit_amount),
        }
        plan = {
            "id": line.price_id, "object": "plan", "active": False, "amount": line.unit_amount,
            "amount_decimal": str(line.unit_amount), "billing_scheme": "per_unit", "created": now,
            "currency": line.currency, "interval": line.interval, "interval_count": line.interval_count,
            "livemode": False, "metadata": {}, "meter": None, "nickname": None, "product": line.product_id,
            "tiers_mode": None, "transform_usage": None, "trial_period_days": None, "usage_type": "licensed",
        }
        return {
            "id": _id("si", 7), "object": "subscription_item", "billing_thresholds": None, "created": now,
            "current_period_end": billing.boundary(billing.period + 1),
            "current_period_start": billing.boundary(billing.period), "discounts": [], "metadata": {},
            "plan": plan, "price": price, "quantity": line.quantity, "subscription": subscription_id,
            "tax_rates": [],
        }

    def _next_period(self, subscription: dict[str, Any], status: str, now: int) -> dict[str, Any]:
        """Move the subscription into its next period and bill it: the new invoice (`paid` or `open`)."""
        billing = self._billing[subscription["id"]]
        previous = (billing.boundary(billing.period), billing.boundary(billing.period + 1))
        billing.period += 1
        for item in subscription["items"]["data"]:
            item["current_period_start"] = billing.boundary(billing.period)
            item["current_period_end"] = billing.boundary(billing.period + 1)
        # A renewal invoice's own period_start/period_end are the period that just ended (its usage
        # period); the period it pays for is on its lines.
        invoice = self._new_invoice(subscription, "subscription_cycle", status, now, previous)
        subscription["latest_invoice"] = invoice["id"]
        return invoice

    def _new_invoice(self, subscription: Mapping[str, Any], reason: str, status: str, now: int,
                     invoice_period: tuple[int, int]) -> dict[str, Any]:
        invoice_id = _id("in")
        customer = self.customers[subscription["customer"]]
        number = f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
        customer["next_invoice_sequence"] += 1
        lines = [self._invoice_line(invoice_id, subscription, item) for item in subscription["items"]["data"]]
        total = sum(line["amount"] for line in lines)
        paid = status == "paid"
        invoice = {
            "id": invoice_id, "object": "invoice", "account_country": "US", "account_name": None,
            "account_tax_ids": None, "amount_due": total, "amount_overpaid": 0, "amount_paid": total if paid else 0,
            "amount_remaining": 0 if paid else total, "amount_shipping": 0, "application": None,
            "attempt_count": 1, "attempted": True, "auto_advance": not paid,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None, "provider": None,
                              "status": None},
            "automatically_finalizes_at": None, "billing_reason": reason,
            "collection_method": "charge_automatically", "created": now, "currency": subscription["currency"],
            "custom_fields": None, "customer": customer["id"], "customer_address": None,
            "customer_email": customer["email"], "customer_name": customer["name"], "customer_phone": None,
            "customer_shipping": None, "customer_tax_exempt": "none", "customer_tax_ids": [],
            "default_payment_method": None, "default_source": None, "default_tax_rates": [], "description": None,
            "discounts": [], "due_date": None, "effective_at": now, "ending_balance": 0, "footer": None,
            "from_invoice": None, "hosted_invoice_url": f"{self.base_url}/_fake/invoices/{invoice_id}",
            "invoice_pdf": None, "issuer": {"type": "self"}, "last_finalization_error": None,
            "latest_revision": None, "lines": _listed(lines, f"/v1/invoices/{invoice_id}/lines"),
            "livemode": False, "metadata": {}, "next_payment_attempt": None if paid else now + 3 * DAY,
            "number": number, "on_behalf_of": None,
            "parent": {"quote_details": None, "type": "subscription_details",
                       "subscription_details": {"metadata": copy.deepcopy(subscription["metadata"]),
                                                "subscription": subscription["id"],
                                                "subscription_proration_date": None}},
            "payment_settings": {"default_mandate": None, "payment_method_options": None,
                                 "payment_method_types": None},
            "period_end": invoice_period[1], "period_start": invoice_period[0],
            "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0, "receipt_number": None,
            "rendering": None, "shipping_cost": None, "shipping_details": None, "starting_balance": 0,
            "statement_descriptor": None, "status": status,
            "status_transitions": {"finalized_at": now, "marked_uncollectible_at": None,
                                   "paid_at": now if paid else None, "voided_at": None},
            "subtotal": total, "subtotal_excluding_tax": total, "test_clock": None, "total": total,
            "total_discount_amounts": [], "total_excluding_tax": total, "total_pretax_credit_amounts": [],
            "total_taxes": [], "webhooks_delivered_at": now,
        }
        self.invoices[invoice_id] = invoice
        return invoice

    def _invoice_line(self, invoice_id: str, subscription: Mapping[str, Any],
                      item: Mapping[str, Any]) -> dict[str, Any]:
        price = item["price"]
        amount = int(price["unit_amount"]) * int(item["quantity"])
        every = price["recurring"]["interval"]
        if price["recurring"]["interval_count"] != 1:
            every = f"{price['recurring']['interval_count']} {every}s"
        return {
            "id": _id("il"), "object": "line_item", "amount": amount, "currency": price["currency"],
            "description": f"{item['quantity']} × {self._product_names.get(price['product'], 'plan')} "  # noqa: RUF001
                           f"(at {int(price['unit_amount']) / 100:.2f} {price['currency'].upper()} / {every})",
            "discount_amounts": [], "discountable": True, "discounts": [], "invoice": invoice_id,
            "livemode": False,
            # Stripe copies the subscription's metadata onto its invoice lines.
            "metadata": copy.deepcopy(subscription["metadata"]),
            "parent": {"invoice_item_details": None, "type": "subscription_item_details",
                       "subscription_item_details": {"invoice_item": None, "proration": False,
                                                     "proration_details": {"credited_items": None},
                                                     "subscription": subscription["id"],
                                                     "subscription_item": item["id"]}},
            "period": {"end": item["current_period_end"], "start": item["current_period_start"]},
            "pretax_credit_amounts": [],
            "pricing": {"price_details": {"price": price["id"], "product": price["product"]},
                        "type": "price_details", "unit_amount_decimal": str(price["unit_amount"])},
            "quantity": item["quantity"], "taxes": [],
        }

    def _pay(self, invoice: dict[str, Any], now: int) -> None:
        invoice.update({"status": "paid", "amount_paid": invoice["amount_due"], "amount_remaining": 0,
                        "attempt_count": invoice["attempt_count"] + 1, "auto_advance": False,
                        "next_payment_attempt": None})
        invoice["status_transitions"]["paid_at"] = now

    # ------------------------------------------------------------ the HTTP side
    @property
    def _product_names(self) -> dict[str, str]:
        return {line.product_id: line.product_name for lines in self._session_lines.values() for line in lines}

    def _create_intent(self, params: dict[str, Any]) -> dict[str, Any]:
        for required in ("amount", "currency"):
            if required not in params:
                raise _invalid(f"Missing required param: {required}.", required, "parameter_missing")
        amount, currency = int(params["amount"]), str(params["currency"]).lower()
        if amount < 1:
            raise _invalid("This value must be greater than or equal to 1.", "amount", "parameter_invalid_integer")
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
            "created": self.now(),
            "currency": currency,
            "livemode": False,
            "metadata": dict(params.get("metadata") or {}),
            "status": "requires_payment_method",
        }
        self.intents[intent_id] = intent
        return dict(intent)

    def _create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(self._new_customer(params, self.now()))

    def _checkout_lines(self, params: Mapping[str, Any], mode: str) -> list[_Line]:
        items = _indexed(params.get("line_items"))
        if not items:
            raise _invalid("Missing required param: line_items.", "line_items", "parameter_missing")
        lines: list[_Line] = []
        for index, item in enumerate(items):
            at = f"line_items[{index}]"
            if "price" in item:
                raise _Refusal(400, _error("invalid_request_error", f"No such price: '{item['price']}'",
                                           "resource_missing", f"{at}[price]"))
            data = item.get("price_data")
            if data is None:
                raise _invalid(f"Missing required param: {at}[price_data].", f"{at}[price_data]", "parameter_missing")
            if "quantity" not in item:
                raise _invalid(f"Missing required param: {at}[quantity].", f"{at}[quantity]", "parameter_missing")
            if int(item["quantity"]) < 1:
                raise _invalid("Quantity must be greater than 0.", f"{at}[quantity]")
            if "product" in data:
                raise _Refusal(400, _error("invalid_request_error", f"No such product: '{data['product']}'",
                                           "resource_missing", f"{at}[price_data][product]"))
            if "product_data" not in data:
                raise _invalid(f"Missing required param: {at}[price_data][product_data].",
                               f"{at}[price_data][product_data]", "parameter_missing")
            if "unit_amount" in data:
                unit_amount = int(data["unit_amount"])
            elif "unit_amount_decimal" in data and Decimal(data["unit_amount_decimal"]) % 1 == 0:
                unit_amount = int(Decimal(data["unit_amount_decimal"]))
            else:
                raise _invalid(f"Missing required param: {at}[price_data][unit_amount].",
                               f"{at}[price_data][unit_amount]", "parameter_missing")
            if unit_amount < 0:
                raise _invalid("This value must be greater than or equal to 0.", f"{at}[price_data][unit_amount]")
            recurring = data.get("recurring")
            if recurring is not None and mode == "payment":
                raise _invalid("You specified `payment` mode but passed a recurring price. Either switch to "
                               "`subscription` mode or use only one-time prices.", f"{at}[price_data][recurring]")
            count = int(recurring.get("interval_count", "1")) if recurring else 1
            if recurring is not None:
                longest = {"day": 1095, "week": 156, "month": 36, "year": 3}[recurring["interval"]]
                if not 1 <= count <= longest:
                    raise _invalid("The interval can be at most three years (3 years, 36 months, or 156 weeks).",
                                   f"{at}[price_data][recurring][interval_count]")
            lines.append(_Line(
                quantity=int(item["quantity"]), currency=str(data["currency"]).lower(), unit_amount=unit_amount,
                product_id=_id("prod", 7), product_name=data["product_data"]["name"], price_id=_id("price"),
                interval=recurring["interval"] if recurring else None, interval_count=count,
            ))
        if len({line.currency for line in lines}) > 1:
            raise _invalid("All line items must be in the same currency.", "line_items")
        if mode == "subscription":
            if all(line.interval is None for line in lines):
                raise _invalid("You must provide at least one recurring price in `subscription` mode when using "
                               "prices.", "line_items")
            if any(line.interval is None for line in lines) or len(
                    {(line.interval, line.interval_count) for line in lines}) > 1:
                raise _invalid("The fake bills subscriptions of one recurring interval only.", "line_items")
        return lines

    def _create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        mode = params.get("mode")
        if mode is None:
            raise _invalid("Missing required param: mode.", "mode", "parameter_missing")
        if mode not in ("payment", "subscription"):
            raise _invalid(f"The fake does not play Checkout in `{mode}` mode.", "mode")
        for name, only in (("subscription_data", "subscription"), ("payment_intent_data", "payment")):
            if name in params and mode != only:
                raise _invalid(f"You can not pass `{name}` in `{mode}` mode.", name)
        for url in ("success_url", "cancel_url", "return_url"):
            if url in params and not re.match(r"https?://[^\s/]+", params[url]):
                raise _invalid(f"Not a valid URL: {params[url]}", url, "url_invalid")
        customer_id = params.get("customer")
        if customer_id is not None and customer_id not in self.customers:
            raise _Refusal(400, _error("invalid_request_error", f"No such customer: '{customer_id}'",
                                       "resource_missing", "customer"))
        lines = self._checkout_lines(params, mode)
        now = self.now()
        session_id = "cs_test_" + secrets.token_hex(24)
        total = sum(line.amount for line in lines)
        # Without a customer, Stripe makes one: always for a subscription, if needed for a payment.
        creation = None if customer_id else "always" if mode == "subscription" else "if_required"
        found = {
            "id": session_id, "object": "checkout.session", "adaptive_pricing": {"enabled": False},
            "after_expiration": None, "allow_promotion_codes": None, "amount_subtotal": total,
            "amount_total": total,
            "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
            "billing_address_collection": None, "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"), "client_secret": None,
            "collected_information": None, "consent": None, "consent_collection": None, "created": now,
            "currency": lines[0].currency, "currency_conversion": None, "custom_fields": [],
            "custom_text": {"after_submit": None, "shipping_address": None, "submit": None,
                            "terms_of_service_acceptance": None},
            "customer": customer_id, "customer_creation": creation, "customer_details": None,
            "customer_email": params.get("customer_email"),
            "discounts": [], "expires_at": now + DAY, "invoice": None,
            "invoice_creation": None if mode == "subscription" else {
                "enabled": False,
                "invoice_data": {"account_tax_ids": None, "custom_fields": None, "description": None,
                                 "footer": None, "issuer": None, "metadata": {}, "rendering_options": None},
            },
            "livemode": False, "locale": params.get("locale"), "metadata": dict(params.get("metadata") or {}),
            "mode": mode, "origin_context": None, "payment_intent": None, "payment_link": None,
            "payment_method_collection": "always" if mode == "subscription" else None,
            "payment_method_configuration_details": None, "payment_method_options": {},
            "payment_method_types": ["card"], "payment_status": "unpaid", "permissions": None,
            "phone_number_collection": {"enabled": False}, "recovered_from": None,
            "saved_payment_method_options": None, "setup_intent": None, "shipping_address_collection": None,
            "shipping_cost": None, "shipping_options": [], "status": "open", "submit_type": None,
            "subscription": None, "success_url": params.get("success_url"),
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}, "ui_mode": "hosted",
            "url": f"{self.base_url}/_fake/checkout/{session_id}", "wallet_options": None,
        }
        self.sessions[session_id] = found
        self._session_lines[session_id] = lines
        self._session_params[session_id] = copy.deepcopy(params)
        return copy.deepcopy(found)

    def _create_portal_session(self, params: dict[str, Any]) -> dict[str, Any]:
        customer_id = params.get("customer")
        if customer_id is None:
            raise _invalid("Missing required param: customer.", "customer", "parameter_missing")
        if customer_id not in self.customers:
            raise _Refusal(400, _error("invalid_request_error", f"No such customer: '{customer_id}'",
                                       "resource_missing", "customer"))
        if "return_url" in params and not re.match(r"https?://[^\s/]+", params["return_url"]):
            raise _invalid(f"Not a valid URL: {params['return_url']}", "return_url", "url_invalid")
        portal_id = _id("bps")
        portal = {
            "id": portal_id, "object": "billing_portal.session", "configuration": "bpc_fake_default",
            "created": self.now(), "customer": customer_id, "flow": None, "livemode": False,
            "locale": params.get("locale"), "on_behalf_of": params.get("on_behalf_of"),
            "return_url": params.get("return_url"), "url": f"{self.base_url}/_fake/billing_portal/{portal_id}",
        }
        self.portal_sessions[portal_id] = portal
        return copy.deepcopy(portal)

    def _retrieve(self, store: Mapping[str, dict[str, Any]], kind: str, object_id: str) -> dict[str, Any]:
        found = store.get(object_id)
        if found is None:
            raise _Refusal(404, _error("invalid_request_error", f"No such {kind}: '{object_id}'",
                                       "resource_missing", "id"))
        return copy.deepcopy(found)

    def _api(self, endpoint: str, params: dict[str, Any], object_id: str | None) -> dict[str, Any]:
        creates: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "POST /v1/payment_intents": self._create_intent,
            "POST /v1/customers": self._create_customer,
            "POST /v1/checkout/sessions": self._create_session,
            "POST /v1/billing_portal/sessions": self._create_portal_session,
        }
        if endpoint in creates:
            return creates[endpoint](params)
        stores = {
            "GET /v1/payment_intents/{id}": (self.intents, "payment_intent"),
            "GET /v1/customers/{id}": (self.customers, "customer"),
            "GET /v1/checkout/sessions/{id}": (self.sessions, "checkout.session"),
            "GET /v1/subscriptions/{id}": (self.subscriptions, "subscription"),
            "GET /v1/invoices/{id}": (self.invoices, "invoice"),
        }
        store, kind = stores[endpoint]
        assert object_id is not None
        return self._retrieve(store, kind, object_id)

    def _dispatch(self, method: str, target: str, headers: Mapping[str, str], body: str) -> _Answer:
        url = urlsplit(target)
        path = url.path
        with self._lock:
            if path.startswith("/_fake/"):
                return self._control(method, path, headers, body)
            pairs = parse_qsl(body if method == "POST" else url.query, keep_blank_values=True)
            params = _nest(pairs)
            self.requests.append((method, path, dict(headers)))
            self.request_params.append((method, path, copy.deepcopy(params)))
            if self._failures:
                status = self._failures.pop(0)
                return status, _error("api_error", "the fake was told to fail this call"), {}
            if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
                return 401, _error("invalid_request_error", "Invalid API Key provided"), {}
            route = next(((pattern, m) for verb, regex, pattern in _ROUTES
                          if verb == method and (m := regex.match(path))), None)
            if route is None:
                return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path})"), {}
            endpoint = f"{method} {route[0]}"
            key = headers.get("idempotency-key") if method == "POST" else None
            fingerprint = hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()
            if key is not None and key in self._idempotent:
                first_endpoint, seen, answer = self._idempotent[key]
                if first_endpoint != endpoint:
                    return 400, _error(
                        "idempotency_error",
                        f"Keys for idempotent requests can only be used for the same endpoint they were first "
                        f"used for ('{first_endpoint}' vs '{endpoint}'). Try using a key other than '{key}' if "
                        "you meant to execute a different request.",
                    ), {}
                if seen != fingerprint:
                    return 400, _error(
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters they were "
                        "first used with. Try using a key other than '" + key + "' if you meant to execute a "
                        "different request.",
                    ), {}
                status, response, _ = answer
                return status, copy.deepcopy(response), {"Idempotent-Replayed": "true"}
            try:
                check_params(endpoint, params)
                result: _Answer = (200, self._api(endpoint, params, route[1].groupdict().get("id")), {})
            except _Refusal as refusal:
                result = (refusal.status, refusal.body, {})
                if not refusal.remember:
                    return result
            except Exception as exc:  # a bug of the fake's own: say so rather than drop the connection
                return 500, _error("api_error", f"the Stripe fake failed: {exc!r}"), {}
            if key is not None:
                self._idempotent[key] = (endpoint, fingerprint, (result[0], copy.deepcopy(result[1]), {}))
            return result

    def _control(self, method: str, path: str, headers: Mapping[str, str], body: str) -> _Answer:
        """`/_fake/...`: the customer's side, for another process (not part of Stripe's API)."""
        page = _PAGE.match(path)
        if method == "GET" and page is not None:
            store = {"checkout": self.sessions, "billing_portal": self.portal_sessions,
                     "invoices": self.invoices}[page["kind"]]
            found = store.get(page["id"])
            if found is None:
                return 404, f"No such {page['kind']} page: {page['id']}\n", {}
            hint = {
                "checkout": f"To pay, run: user-credits checkout-complete {page['id']}",
                "billing_portal": "Subscriptions are managed with: user-credits renew | fail-renewal | cancel SUB",
                "invoices": f"Invoice {found.get('number')}: {found.get('status')}",
            }[page["kind"]]
            return 200, f"The local Stripe fake: this stands for Stripe's hosted page.\n{hint}\n", {}
        control = _CONTROL.match(path)
        if method != "POST" or control is None:
            return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path})"), {}
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, _error("invalid_request_error", "Invalid API Key provided"), {}
        options = _nest(parse_qsl(body, keep_blank_values=True))
        actions: dict[tuple[str, str], Callable[[str], list[dict[str, Any]]]] = {
            ("checkout/sessions", "complete"): self.complete_session,
            ("subscriptions", "renew"): self.renew,
            ("subscriptions", "fail_renewal"): self.fail_renewal,
            ("subscriptions", "cancel"): lambda sub: self.cancel(sub, options.get("at_period_end") == "true"),
        }
        action = actions.get((control["kind"], control["action"]))
        if action is None:
            return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path})"), {}
        try:
            events = action(control["id"])
        except KeyError:
            kind = "checkout.session" if control["kind"] == "checkout/sessions" else "subscription"
            return 404, _error("invalid_request_error", f"No such {kind}: '{control['id']}'", "resource_missing",
                               "id"), {}
        except ValueError as exc:
            return 400, _error("invalid_request_error", str(exc)), {}
        return 200, {"object": "list", "data": events}, {}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without TCP_NODELAY the client's delayed ACK holds
            # the body back ~40 ms per call on a kept-alive connection.
            disable_nagle_algorithm = True

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, payload, extra = fake._dispatch(method, self.path, headers, body)
                text = isinstance(payload, str)
                data = payload.encode() if text else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
                for name, value in extra.items():
                    self.send_header(name, value)
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


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """`previous_attributes` of an `*.updated` event: the earlier value of each top-level field that
    changed (a changed list or sub-object whole, as Stripe sends arrays)."""
    return {key: copy.deepcopy(value) for key, value in before.items() if after.get(key) != value}


def _error(kind: str, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code is not None:
        error["code"] = code
        error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    if param is not None:
        error["param"] = param
    return {"error": error}
