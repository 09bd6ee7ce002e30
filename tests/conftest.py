"""Fixtures: the tables of template.yaml on two engines (moto server and AWS's DynamoDB Local),
the function handlers loaded from their CodeUri folders, and real-shaped events to call them with.

Every test uses fresh user and offer ids (uuid), so tests share tables without seeing each other.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.session
import pytest
from contract import check_answer
from hypothesis import HealthCheck, settings

from user_credits.config import load_settings
from user_credits.events import publisher
from user_credits.store.models import bind_tables
from user_credits_dev import template as tpl
from user_credits_dev.dynamodb_local import DynamoDBLocal, free_port
from user_credits_dev.lambda_events import LambdaContext, http_api_event, scheduled_event
from user_credits_dev.moto_server import serial_moto_server
from user_credits_dev.streams import StreamPump

BASE_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "POWERTOOLS_TRACE_DISABLED": "1",
    "POWERTOOLS_METRICS_NAMESPACE": "UserCreditsTest",
}
for _key, _value in BASE_ENV.items():
    os.environ[_key] = _value
# Hypothesis profiles: `ci` (bounded, part of `make test`) and `soak` (`make soak`).
_QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("soak", max_examples=150, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# pynamodb gives every thread (and every rebind of the tables) a botocore session of its own, and each
# session parses botocore's JSON models again (~0.1 s of CPU): one shared loader parses them once.
# Tests rebind and start thread pools far more often than a warm Lambda does.
_shared_loader = functools.lru_cache(maxsize=None)(botocore.session.create_loader)
botocore.session.create_loader = _shared_loader  # type: ignore[attr-defined]

# No test may reach AWS by accident: anything not pointed at a local endpoint fails to resolve.
os.environ.setdefault("AWS_ENDPOINT_URL", "http://127.0.0.1:9")


@dataclass
class Backend:
    name: str
    endpoint: str
    tables: dict[str, str]

    def client(self) -> Any:
        return boto3.client("dynamodb", endpoint_url=self.endpoint)


def _make_backend(name: str, endpoint: str) -> Backend:
    client = boto3.client("dynamodb", endpoint_url=endpoint)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    tables = tpl.create_tables(client, prefix)
    return Backend(name, endpoint, tables)


@pytest.fixture(scope="session")
def moto_backend() -> Iterator[Backend]:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = serial_moto_server(port)
    server.start()
    try:
        yield _make_backend("moto", f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ddblocal_backend() -> Iterator[Backend]:
    engine = DynamoDBLocal().start()
    try:
        yield _make_backend("ddblocal", engine.endpoint)
    finally:
        engine.stop()


@pytest.fixture(params=["moto", "ddblocal"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The tables of template.yaml: shared by the session on DynamoDB Local; on moto, fresh per test,
    because moto copies a whole table (its stream included) for every transaction, and a stream that
    grows all session long would make each test slower than the last."""
    shared: Backend = request.getfixturevalue(f"{request.param}_backend")
    if request.param != "moto":
        yield shared
        return
    client = shared.client()
    tables = tpl.create_tables(client, f"m-{uuid.uuid4().hex[:8]}")
    yield Backend("moto", shared.endpoint, tables)
    for name in tables.values():
        client.delete_table(TableName=name)


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None


@dataclass
class EventRecorder:
    """Stands in for the EventBridge client and keeps what would have been sent."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    # How many of the next PutEvents calls fail (EventBridge down for a while).
    fail_next: int = 0

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RuntimeError("EventBridge is down")
        self.entries.extend(Entries)
        return {"FailedEntryCount": 0, "Entries": [{"EventId": str(uuid.uuid4())} for _ in Entries]}

    def sent(self, detail_type: str) -> list[dict[str, Any]]:
        """The details as sent, `eventId` included."""
        return [json.loads(e["Detail"]) for e in self.entries if e["DetailType"] == detail_type]

    def of_type(self, detail_type: str) -> list[dict[str, Any]]:
        """The details without their `eventId`, which every one must carry (SPEC 4)."""
        details = self.sent(detail_type)
        for detail in details:
            assert re.fullmatch(r"[0-9a-f]{32}", str(detail.pop("eventId", ""))), detail
        return details


# Set while the stream function runs: fault plans aimed at a request leave its calls alone.
IN_STREAM = threading.local()
_pumps: dict[tuple[str, str], StreamPump] = {}
_current: list[Service] = []


def _pump(backend: Backend, spec: tpl.FunctionSpec) -> StreamPump:
    """One pump per table, for the whole session: its shard positions outlive each test's Service."""
    assert spec.stream is not None
    key = (backend.endpoint, backend.tables[spec.stream])
    if key not in _pumps:
        _pumps[key] = StreamPump(backend.endpoint, key[1], batch_size=spec.batch_size)
    return _pumps[key]


def drain_stream() -> None:
    """Deliver what the current test's service has left on the stream (for checks made without a call)."""
    if _current:
        _current[-1].drain()


class Service:
    """Calls the functions of template.yaml the way API Gateway, EventBridge and Lambda's event
    source mapping would: after each call, the stream function gets what the call wrote."""

    def __init__(self, backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder) -> None:
        self.backend = backend
        self.events = events
        self.monkeypatch = monkeypatch
        self.specs = tpl.functions(backend.tables)
        env: dict[str, str] = {}
        for spec in self.specs:
            env.update(spec.environment)
        env.update(tpl.table_environment(backend.tables))
        env["AWS_ENDPOINT_URL_DYNAMODB"] = backend.endpoint
        env["LOW_BALANCE_THRESHOLDS"] = "{}"
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(publisher, "client_factory", lambda: events)
        publisher.reset_client()
        self.rebind()
        stream_spec = tpl.stream_function(self.specs)
        assert stream_spec is not None, "template.yaml has no function on a table's stream"
        self.stream_spec = stream_spec
        self.stream_paused = False
        self.pump = _pump(backend, stream_spec)
        # What earlier tests left (nothing, unless one failed midway) is theirs, not this test's.
        self.pump.skip_to_now()
        _current[:] = [self]

    def deliver(self, event: dict[str, Any]) -> Any:
        """One invocation of the stream function with a batch, as Lambda makes it."""
        handler = tpl.load_handler(self.stream_spec)
        IN_STREAM.active = True
        try:
            return handler(event, LambdaContext(function_name=self.stream_spec.logical_id))
        finally:
            IN_STREAM.active = False

    def drain(self) -> int:
        """Run the stream until nothing is left; how many records were delivered."""
        if self.stream_paused:
            return 0
        return self.pump.drain(lambda event, _context: self.deliver(event))

    @contextlib.contextmanager
    def stream_late(self) -> Iterator[None]:
        """The stream delivers nothing inside the block (as when Lambda lags behind), then catches up."""
        self.stream_paused = True
        try:
            yield
        finally:
            self.stream_paused = False
        self.drain()

    def rebind(self) -> None:
        import user_credits.store.models as models

        models._bound = None
        bind_tables(load_settings())

    def setenv(self, key: str, value: str) -> None:
        self.monkeypatch.setenv(key, value)

    def spec_for(self, method: str, path: str) -> tuple[tpl.FunctionSpec, str]:
        found = tpl.match_route(self.specs, method, path)
        if found is None:
            raise LookupError(f"no function serves {method} {path}")
        return found[0], found[1]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        user: str | None = None,
        iam: bool = False,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        raw_body: str | bytes | None = None,
    ) -> Reply:
        spec, route_path = self.spec_for(method, path)
        payload = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
        event = http_api_event(
            method, path, route_path=route_path, body=payload, headers=headers, query=query, user=user, iam=iam
        )
        handler = tpl.load_handler(spec)
        try:
            result = handler(event, LambdaContext(function_name=spec.logical_id))
        finally:
            # Whatever the call committed reaches the stream, even if the function then died.
            self.drain()
        text = result.get("body") or ""
        try:
            parsed = json.loads(text) if text else None
        except json.JSONDecodeError:
            parsed = text
        reply = Reply(result["statusCode"], parsed, result.get("headers") or {})
        check_answer(method, route_path, reply.status, reply.body, reply.headers)
        return reply

    def invoke_schedule(self, logical_id: str = "ExpirySweepFunction", budget_ms: int = 300_000) -> Any:
        spec = next(s for s in self.specs if s.logical_id == logical_id)
        handler = tpl.load_handler(spec)
        try:
            return handler(scheduled_event(), LambdaContext(function_name=logical_id, budget_ms=budget_ms))
        finally:
            self.drain()

    def scan(self, logical_table: str) -> list[dict[str, Any]]:
        client = self.backend.client()
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"TableName": self.backend.tables[logical_table], "ConsistentRead": True}
        while True:
            page = client.scan(**kwargs)
            items.extend(page["Items"])
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def item_count(self, logical_table: str) -> int:
        return len(self.scan(logical_table))


@pytest.fixture
def events() -> EventRecorder:
    return EventRecorder()


@pytest.fixture
def service(backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder) -> Service:
    return Service(backend, monkeypatch, events)


@pytest.fixture
def local_service(ddblocal_backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder) -> Service:
    """The service on DynamoDB Local only: for concurrency and fault tests, where moto is not enough."""
    return Service(ddblocal_backend, monkeypatch, events)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def ids() -> Any:
    return new_id


@pytest.fixture
def fresh_service(moto_backend: Backend, monkeypatch: pytest.MonkeyPatch, events: EventRecorder) -> Service:
    """The service on moto tables of its own, so that "wrote nothing" can be checked by counting items."""
    client = moto_backend.client()
    tables = tpl.create_tables(client, f"fresh-{uuid.uuid4().hex[:8]}")
    return Service(Backend("moto", moto_backend.endpoint, tables), monkeypatch, events)


@pytest.fixture
def balanced() -> Any:
    """Asserts SPEC 1's invariant for the given users: balance == sum of ledger deltas, per group."""
    from user_credits.logic.invariants import check_user

    def check(*user_ids: str) -> None:
        drain_stream()
        for user_id in user_ids:
            report = check_user(user_id)
            assert report.ok, report.mismatches

    return check


class SimulatedCrash(Exception):
    """The Lambda runtime killed the function here."""


@dataclass
class CrashPlan:
    """Kills the function at the Nth DynamoDB call: `before` it is sent, or `after` DynamoDB applied it."""

    phase: str = "after"
    at_call: int | None = None
    calls: int = 0
    fired: bool = False
    error: type[Exception] = SimulatedCrash

    # Whether the stream function's calls count too (by default only the request's do).
    stream: bool = False

    def hook(self, event_name: str, **_: Any) -> None:
        if not event_name.startswith(f"{self.phase}-call."):
            return
        if getattr(IN_STREAM, "active", False) != self.stream:
            return
        self.calls += 1
        if self.calls == self.at_call:
            self.fired = True
            raise SimulatedCrash(f"{event_name} (call {self.calls})")

    def arm(self, phase: str, at_call: int) -> None:
        self.phase, self.at_call, self.calls, self.fired = phase, at_call, 0, False

    def count_calls(self) -> None:
        self.arm("after", 10**9)

    def disarm(self) -> None:
        self.at_call = None

    def expect_crash(self, call: Any) -> None:
        """Run `call`; it must die at the planned call (the resolver may turn the crash into a 500)."""
        try:
            reply = call()
        except SimulatedCrash:
            return
        assert self.fired, f"no crash happened: {reply}"
        assert reply.status == 500, reply


def _hooked(original: Any, handlers: dict[str, Any]) -> Any:
    def create_client(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
        client = original(self, service_name, *args, **kwargs)
        if service_name == "dynamodb":
            for event, handler in handlers.items():
                client.meta.events.register(event, handler)
        return client

    return create_client


@contextlib.contextmanager
def dynamodb_hooks(service: Service, handlers: dict[str, Any]) -> Iterator[None]:
    """Register botocore event handlers (`before-call.dynamodb`, `after-call.dynamodb`, ...) on every
    DynamoDB client built inside the block: the one mechanism behind fault injection, call recording
    and read metering. Cached connections are dropped on the way in and out, so every client of the
    block is hooked and none after it."""
    import botocore.session

    original = botocore.session.Session.create_client
    botocore.session.Session.create_client = _hooked(original, handlers)  # type: ignore[method-assign]
    service.rebind()
    try:
        yield
    finally:
        botocore.session.Session.create_client = original  # type: ignore[method-assign]
        service.rebind()


def hook_dynamodb_clients(monkeypatch: pytest.MonkeyPatch, service: Service, handlers: dict[str, Any]) -> None:
    """The same hooks for the rest of the test (undone with the test's monkeypatch)."""
    import botocore.session

    monkeypatch.setattr(botocore.session.Session, "create_client",
                        _hooked(botocore.session.Session.create_client, handlers))
    service.rebind()


@pytest.fixture
def crash(local_service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[CrashPlan]:
    """Fault injection from a botocore event hook on every DynamoDB client pynamodb builds (DynamoDB Local)."""
    plan = CrashPlan()
    hook_dynamodb_clients(monkeypatch, local_service, {"before-call.dynamodb": plan.hook,
                                                       "after-call.dynamodb": plan.hook})
    yield plan
    plan.disarm()
