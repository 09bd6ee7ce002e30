"""What every benchmark section shares: a loopback-only environment, DynamoDB Local with the tables of
template.yaml, a way to call a function's handler with an API Gateway HTTP API v2 event, and tables.

Nothing here reaches AWS: every SDK endpoint is either DynamoDB Local on 127.0.0.1 or a closed port.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PYTHON = sys.executable

BASE_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_SESSION_TOKEN": "bench",
    # Anything not pointed at a loopback endpoint fails to connect instead of reaching AWS.
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "POWERTOOLS_TRACE_DISABLED": "1",
    "POWERTOOLS_METRICS_NAMESPACE": "UserCreditsBench",
    "STRIPE_API_KEY": "sk_test_bench",
    "STRIPE_WEBHOOK_SECRET": "whsec_bench",
    "LOW_BALANCE_THRESHOLDS": "{}",
}


# In the benchmark's own process, metrics flushes (one EMF line per invocation) and logs would bury the
# tables; worker processes keep the production settings and send their stdout to /dev/null instead.
QUIET_ENV = {"POWERTOOLS_METRICS_DISABLED": "1", "POWERTOOLS_LOG_LEVEL": "ERROR"}


def apply_base_env(*, quiet: bool = True) -> None:
    os.environ.update(BASE_ENV)
    if quiet:
        os.environ.update(QUIET_ENV)


def silence_stdout() -> None:
    """For worker processes: Powertools writes logs and EMF metrics to fd 1; drop them at the fd."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- DynamoDB Local and the service


@dataclass
class Engine:
    """DynamoDB Local plus the tables of template.yaml, created under a fresh prefix."""

    endpoint: str
    tables: dict[str, str]
    process: Any = None

    def client(self) -> Any:
        import boto3

        return boto3.client("dynamodb", endpoint_url=self.endpoint)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def start_engine() -> Engine:
    import boto3

    from user_credits_dev import template as tpl
    from user_credits_dev.dynamodb_local import DynamoDBLocal

    apply_base_env()
    local = DynamoDBLocal().start()
    client = boto3.client("dynamodb", endpoint_url=local.endpoint)
    tables = tpl.create_tables(client, f"bench-{uuid.uuid4().hex[:8]}")
    return Engine(local.endpoint, tables, local)


def function_environment(engine_endpoint: str, tables: dict[str, str]) -> dict[str, str]:
    """The union of the functions' environments from template.yaml, tables resolved, plus BASE_ENV."""
    from user_credits_dev import template as tpl

    env: dict[str, str] = {}
    for spec in tpl.functions(tables):
        env.update(spec.environment)
    env.update(tpl.table_environment(tables))
    env.update(BASE_ENV)
    env["AWS_ENDPOINT_URL_DYNAMODB"] = engine_endpoint
    return env


@dataclass
class EventSink:
    """Stands in for the EventBridge client (as the tests' EventRecorder does) and counts the sends."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    keep: bool = True

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        if self.keep:
            self.entries.extend(Entries)
        return {"FailedEntryCount": 0, "Entries": [{"EventId": str(uuid.uuid4())} for _ in Entries]}


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


class Service:
    """Calls the functions of template.yaml the way API Gateway would, in this process."""

    def __init__(self, endpoint: str, tables: dict[str, str], *, keep_events: bool = True) -> None:
        from user_credits.events import publisher
        from user_credits_dev import template as tpl

        os.environ.update(function_environment(endpoint, tables))
        self.endpoint = endpoint
        self.tables = tables
        self.events = EventSink(keep=keep_events)
        publisher.client_factory = lambda: self.events
        publisher.reset_client()
        self.specs = tpl.functions(tables)
        self._tpl = tpl

    def spec_for(self, method: str, path: str) -> tuple[Any, str]:
        found = self._tpl.match_route(self.specs, method, path)
        if found is None:
            raise LookupError(f"no function serves {method} {path}")
        return found[0], found[1]

    def handler_for(self, method: str, path: str) -> tuple[Any, Any, str]:
        spec, route_path = self.spec_for(method, path)
        return self._tpl.load_handler(spec), spec, route_path

    def event(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        user: str | None = None,
        iam: bool = False,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        raw_body: str | None = None,
    ) -> dict[str, Any]:
        from user_credits_dev.lambda_events import http_api_event

        _spec, route_path = self.spec_for(method, path)
        payload = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
        return http_api_event(
            method, path, route_path=route_path, body=payload, headers=headers, query=query, user=user, iam=iam
        )

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Reply:
        from user_credits_dev.lambda_events import LambdaContext

        handler, spec, _route = self.handler_for(method, path)
        result = handler(self.event(method, path, body, **kwargs), LambdaContext(function_name=spec.logical_id))
        return to_reply(result)


def to_reply(result: dict[str, Any]) -> Reply:
    text = result.get("body") or ""
    try:
        parsed = json.loads(text) if text else None
    except json.JSONDecodeError:
        parsed = text
    return Reply(result["statusCode"], parsed, result.get("headers") or {})


def module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def function_ready(code_folder: str) -> bool:
    """True once the function's handler module exists (features land while the benchmark is written)."""
    return (REPO_ROOT / "functions" / code_folder / "app.py").exists()


# ---------------------------------------------------------------- figures and tables


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else float("nan")


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def kib(size: int) -> str:
    return f"{size / 1024:,.0f} KiB" if size < 1024 * 1024 else f"{size / 1024 / 1024:,.1f} MiB"


class CapturedOutput:
    """Sends fd 1 (where Powertools logs and metrics go) to a temporary file while active."""

    def __init__(self) -> None:
        self.text = ""

    def __enter__(self) -> CapturedOutput:
        import tempfile

        sys.stdout.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = os.dup(1)
        os.dup2(self._file.fileno(), 1)
        return self

    def __exit__(self, *_: object) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()

    def error_lines(self) -> list[str]:
        """The messages of ERROR log records (JSON lines from Powertools' Logger)."""
        found = []
        for line in self.text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
                detail = record.get("exception_name") or record.get("problem") or ""
                where = record.get("route") or record.get("function_name") or ""
                found.append(f"{where}: {record.get('message')} {detail}".strip())
        return found


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def machine_load() -> str:
    try:
        load = os.getloadavg()
    except OSError:
        return "unknown"
    return f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------- the Accounts table's stream


@dataclass
class Drained:
    """What one drain of the stream delivered to the stream function."""

    records: int = 0  # records passed to the handler, redeliveries included
    changes: int = 0  # of which carried a new `change` (the others the function skips)
    batches: int = 0
    failed_items: int = 0  # batchItemFailures the function reported (each makes the pump deliver again)
    seconds: float = 0.0

    def add(self, other: Drained) -> None:
        self.records += other.records
        self.changes += other.changes
        self.batches += other.batches
        self.failed_items += other.failed_items
        self.seconds += other.seconds

    def per_second(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


def _has_change(record: dict[str, Any]) -> bool:
    dynamodb = record.get("dynamodb") or {}
    new = (dynamodb.get("NewImage") or {}).get("change", {}).get("S")
    old = (dynamodb.get("OldImage") or {}).get("change", {}).get("S")
    return new is not None and new != old


class StreamRunner:
    """Lambda's event source mapping on the Accounts table, in this process: a StreamPump
    (`user_credits_dev.streams`) that hands batches of the table's stream to the real stream function
    (template.yaml's function with a DynamoDB stream event, loaded from its CodeUri), with its BatchSize.

    `around` (optional) wraps each handler call, e.g. to attribute the DynamoDB calls it makes."""

    def __init__(self, endpoint: str, tables: dict[str, str]) -> None:
        from user_credits_dev import template as tpl
        from user_credits_dev.lambda_events import LambdaContext
        from user_credits_dev.streams import StreamPump

        spec = tpl.stream_function(tpl.functions(tables))
        if spec is None or spec.stream is None:
            raise LookupError("template.yaml has no function on a table's stream")
        self.spec = spec
        self.handler = tpl.load_handler(spec)
        self.pump = StreamPump(endpoint, tables[spec.stream], batch_size=spec.batch_size)
        self._context = LambdaContext
        self.total = Drained()
        self.errors: dict[str, int] = {}  # ERROR records the stream function logged, with their counts

    def skip_to_now(self) -> None:
        self.pump.skip_to_now()

    def drain(self, around: Any = None) -> Drained:
        """Deliver everything new (the function's own writes to the table included) and say what."""
        result = Drained()

        def deliver(event: dict[str, Any], _context: Any) -> Any:
            records = event.get("Records") or []
            result.batches += 1
            result.changes += sum(1 for r in records if _has_change(r))
            context = self._context(function_name=self.spec.logical_id, budget_ms=60_000)
            if around is not None:
                response = around(lambda: self.handler(event, context))
            else:
                response = self.handler(event, context)
            failures = (response or {}).get("batchItemFailures") if isinstance(response, dict) else None
            result.failed_items += len(failures or [])
            return response

        started = time.perf_counter()
        # The function's logs and EMF metrics (fd 1) are kept apart; its WARNING/ERROR records are counted.
        with CapturedOutput() as output:
            result.records = self.pump.drain(deliver)
        result.seconds = time.perf_counter() - started
        for line in output.error_lines():
            self.errors[line] = self.errors.get(line, 0) + 1
        self.total.add(result)
        return result
