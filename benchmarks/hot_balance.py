"""Hot balance and many balances: workers consuming 1 token at a time, on DynamoDB Local.

Implementations run the same load from the same warm worker processes (each worker is like one warm
Lambda container; N of them run at once, for a fixed duration, in two mirrored halves):

- `ours`: the real consume function. Each request is an API Gateway HTTP API v2 event for
  `POST /users/{userId}/consume` passed to the handler that template.yaml names (functions/consume),
  so routing, validation, logging, metrics and the one conditional UpdateItem are all included.
- `ours_holds`: a pair of hold and settle through the real holds function (functions/holds): a hold of 2
  tokens, then its settle of 1 (the rest goes back); one pair per request slot, its rate in pairs/s,
  against the same floor (issue 12's target: >= 0.4x the floor's single writes, a pair being two writes).
- `naive`: written only here, to prove the benchmark can see lost updates: GetItem (consistent),
  check the balance, PutItem of balance - 1 WITHOUT a condition (one hot balance and the balance that
  runs out only).
- `floor`: a bare conditional UpdateItem (`ADD balance -1` if `balance >= 1`), the least any correct
  consume can cost on this engine.

After each run the stream is drained (not timed in the consume throughput): a StreamPump delivers the
Accounts table's stream to the real stream function (functions/ledger_stream, its BatchSize from
template.yaml) in this process, and its own rate is reported. Then the balances are read back:
`lost updates` = successes - (balance before + granted - balance after), `overdraft` = successes beyond
what there was. For `ours` the ledger is read too, user by user: the sum of the entries' deltas must equal
the balance, the entries' `seq` must be exactly 1..n where n is the balance item's `seq`, and the run
must have added one entry per success (and per grant).

Also here: a TransactionConflict simulation (`conflicts.py`: a botocore hook in every worker makes a plain
write to an item that an in-flight TransactWriteItems includes fail as on AWS), with consumes alone and
with concurrent grants, and a profile of one consume against one floor request (`consume_profile.py`).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    BASE_ENV,
    QUIET_ENV,
    Engine,
    EventSink,
    StreamRunner,
    function_environment,
    function_ready,
    markdown_table,
    new_id,
    percentile,
)

IMPLEMENTATIONS = ("ours", "ours_core", "ours_holds", "naive", "floor")
MANY_IMPLEMENTATIONS = ("ours", "ours_core", "ours_holds", "floor")
# Measured against the floor (a ratio per row): a consume, its core alone, and a pair of hold and settle.
AGAINST_FLOOR = ("ours", "ours_core", "ours_holds")
GROUP = "hot"
GROUP_SK = "GROUP#" + GROUP


# ---------------------------------------------------------------- inside a worker process


class _Ours:
    """The consume function's handler, called with real-shaped events (the event is built untimed)."""

    def __init__(self, env: dict[str, str], *, keyed: bool = False) -> None:
        from user_credits.events import publisher
        from user_credits_dev import template as tpl
        from user_credits_dev.lambda_events import LambdaContext, http_api_event

        sink = EventSink(keep=False)
        publisher.client_factory = lambda: sink
        publisher.reset_client()
        specs = {s.logical_id: s for s in tpl.functions({})}
        self.handler = tpl.load_handler(specs["ConsumeFunction"])
        self.grant_handler = tpl.load_handler(specs["AdminGrantsFunction"])
        self._event = http_api_event
        self._context = LambdaContext
        self.keyed = keyed
        self.fresh = keyed  # a keyed consume needs a new key (so a new event) per request

    def prepare(self, user: str) -> Any:
        path = f"/users/{user}/consume"
        headers = {"Idempotency-Key": uuid.uuid4().hex} if self.keyed else None
        return self._event("POST", path, route_path="/users/{userId}/consume", iam=True, headers=headers,
                           body=json.dumps({"offerGroup": GROUP, "tokens": 1}))

    def call(self, event: Any) -> str:
        status = self.handler(event, self._context(function_name="ConsumeFunction"))["statusCode"]
        if status == 200:
            return "ok"
        return "refused" if status == 402 else f"http_{status}"

    def grant(self, user: str, tokens: int) -> int:
        path = f"/admin/users/{user}/grants"
        event = self._event("POST", path, route_path="/admin/users/{userId}/grants", iam=True,
                            body=json.dumps({"offerGroup": GROUP, "tokens": tokens}))
        status: int = self.grant_handler(event, self._context(function_name="AdminGrantsFunction"))["statusCode"]
        return status


class _Core(_Ours):
    """`logic.consumption.consume_tokens` called directly, as the consume route calls it: the real decision,
    its one UpdateItem (and a refusal's metric), without the HTTP layer (Powertools' resolver, request and
    response validation, logging context and metrics flush; our caller and body checks). Not a product path: it
    measures how much of `ours`'s gap to the floor is the handler's and how much the core's."""

    def __init__(self, env: dict[str, str]) -> None:
        from user_credits.config import load_settings
        from user_credits.logic import consumption
        from user_credits.observability import metrics
        from user_credits.store.models import bind_tables

        super().__init__(env)
        bind_tables(load_settings())
        self._consume = consumption.consume_tokens
        self._metrics = metrics

    def prepare(self, user: str) -> Any:
        return user

    def call(self, user: Any) -> str:
        from user_credits.errors import CreditsError

        try:
            result = self._consume(user, GROUP, 1, 0, None, {"offerGroup": GROUP, "tokens": 1})
        except CreditsError as error:
            return "refused" if error.http_status == 402 else f"http_{error.http_status}"
        return "ok" if result.status == 200 else f"http_{result.status}"

    def done(self) -> None:
        """The metrics the core added and no handler flushed: written now, so no later `ours` request of
        this worker flushes them as its own."""
        self._metrics.flush_metrics()


class _Holds(_Ours):
    """A reserve+settle pair through the holds function (functions/holds): `POST /users/{u}/holds`
    {offerGroup, tokens: HELD}, then `POST /users/{u}/holds/{holdId}/settle` {tokens: SETTLED}, which
    returns the rest. One `call` is one pair; the settle's event can only be built once the hold has
    answered (its holdId), so building it is inside the pair's time."""

    HELD, SETTLED = 2, 1

    def __init__(self, env: dict[str, str]) -> None:
        from user_credits_dev import template as tpl

        super().__init__(env)
        specs = {s.logical_id: s for s in tpl.functions({})}
        self.holds_handler = tpl.load_handler(specs["HoldsFunction"])
        self.fresh = True
        self.counter = CallCounter(env["ACCOUNTS_TABLE"])

    def prepare(self, user: str) -> Any:
        return user, self._event("POST", f"/users/{user}/holds", route_path="/users/{userId}/holds", iam=True,
                                 body=json.dumps({"offerGroup": GROUP, "tokens": self.HELD}))

    def warm(self, user: str) -> None:
        """The settle route too (a settle of no hold: 404), so the first timed pair is not its first."""
        hold_id = f"{'0' * 20}-{self.HELD}-{GROUP}"
        self.holds_handler(self._event("POST", f"/users/{user}/holds/{hold_id}/settle",
                                       route_path="/users/{userId}/holds/{holdId}/settle", iam=True,
                                       body=json.dumps({"tokens": self.SETTLED})),
                           self._context(function_name="HoldsFunction"))

    def call(self, prepared: Any) -> str:
        user, event = prepared
        answer = self.holds_handler(event, self._context(function_name="HoldsFunction"))
        if answer["statusCode"] != 201:
            return "refused" if answer["statusCode"] == 402 else f"hold {_failure(answer)}"
        hold_id = json.loads(answer["body"])["holdId"]
        settle = self._event("POST", f"/users/{user}/holds/{hold_id}/settle",
                             route_path="/users/{userId}/holds/{holdId}/settle", iam=True,
                             body=json.dumps({"tokens": self.SETTLED}))
        answer = self.holds_handler(settle, self._context(function_name="HoldsFunction"))
        return "ok" if answer["statusCode"] == 200 else f"{HELD_NOT_SETTLED} {_failure(answer)}"


def _failure(answer: dict[str, Any]) -> str:
    """`http_<status> <error>: <message>` of an answer that failed (the messages are fixed texts)."""
    try:
        body = json.loads(answer.get("body") or "{}")
    except json.JSONDecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return f"http_{answer['statusCode']} {body.get('error', '')}: {body.get('message', '')}".rstrip(": ")


# An outcome of a pair whose hold was placed and whose settle did not answer 200 (the hold stays open).
HELD_NOT_SETTLED = "held, settle"


def effects(impl: str, outcomes: dict[str, int]) -> tuple[int, int]:
    """(tokens taken from the balances, ledger entries added) by a run's outcomes. A consume: 1 token
    and 1 entry per success. A pair: the hold takes HELD tokens (entry `hold`) and the settle returns
    HELD - SETTLED (entry `release`); a hold whose settle failed keeps its tokens (1 entry)."""
    if impl != "ours_holds":
        ok = outcomes.get("ok", 0)
        return ok, ok
    held = sum(v for k, v in outcomes.items() if k.startswith(HELD_NOT_SETTLED))
    pairs = outcomes.get("ok", 0)
    returns = 1 if _Holds.HELD > _Holds.SETTLED else 0
    return pairs * _Holds.SETTLED + held * _Holds.HELD, pairs * (1 + returns) + held


class CallCounter:
    """The DynamoDB calls one worker's handler makes during a run, by operation (`Op!Code` when it
    failed), and the TransactWriteItems that include a balance item (`calls.balance_transaction`).
    Installed only around a run of an implementation that has one (the pairs), so the other
    implementations' figures are as before; it costs a dict update per call."""

    def __init__(self, accounts_table: str) -> None:
        self.table = accounts_table
        self.counts: dict[str, int] = {}
        self._original: Any = None

    def install(self) -> None:
        from botocore.client import BaseClient
        from botocore.exceptions import ClientError

        from benchmarks.calls import DynamoCall, balance_transaction

        if self._original is not None:
            return
        original = self._original = BaseClient._make_api_call  # type: ignore[attr-defined]
        counts, table = self.counts, self.table

        def counted(client: Any, operation: str, params: dict[str, Any]) -> Any:
            if client.meta.service_model.service_name != "dynamodb":
                return original(client, operation, params)
            if operation == "TransactWriteItems" and balance_transaction(
                    DynamoCall(operation, None, None, None, params=params), table):
                counts["TransactWriteItems incl. a balance item"] = counts.get(
                    "TransactWriteItems incl. a balance item", 0) + 1
            try:
                response = original(client, operation, params)
            except ClientError as error:
                name = f"{operation}!{error.response.get('Error', {}).get('Code', 'error')}"
                counts[name] = counts.get(name, 0) + 1
                raise
            counts[operation] = counts.get(operation, 0) + 1
            return response

        BaseClient._make_api_call = counted  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        from botocore.client import BaseClient

        if self._original is not None:
            BaseClient._make_api_call = self._original  # type: ignore[attr-defined]
            self._original = None

    def take(self) -> dict[str, int]:
        taken = dict(self.counts)
        self.counts.clear()
        return taken


class _Direct:
    """The benchmark's own implementations, on the same Accounts table and key shape."""

    fresh = False

    def __init__(self, kind: str, env: dict[str, str]) -> None:
        import boto3
        from botocore.config import Config

        self.kind = kind
        # The SDK's own retries would hide conflicts and throttling; each attempt is one request here.
        self.client = boto3.client("dynamodb", endpoint_url=env["AWS_ENDPOINT_URL_DYNAMODB"],
                                   config=Config(retries={"max_attempts": 1, "mode": "standard"}))
        self.table = env["ACCOUNTS_TABLE"]
        self.errors = self.client.exceptions

    def prepare(self, user: str) -> Any:
        return {"userId": {"S": user}, "sk": {"S": GROUP_SK}}

    def call(self, key: Any) -> str:
        if self.kind == "floor":
            try:
                self.client.update_item(
                    TableName=self.table, Key=key, UpdateExpression="ADD #b :minus",
                    ConditionExpression="#b >= :t", ExpressionAttributeNames={"#b": "balance"},
                    ExpressionAttributeValues={":minus": {"N": "-1"}, ":t": {"N": "1"}},
                )
            except self.errors.ConditionalCheckFailedException:
                return "refused"
            return "ok"
        item = self.client.get_item(TableName=self.table, Key=key, ConsistentRead=True).get("Item")
        balance = int(item["balance"]["N"]) if item else 0
        if balance < 1:
            return "refused"
        # The bug this implementation exists to show: no condition, so a concurrent debit is overwritten.
        self.client.put_item(TableName=self.table, Item={**key, "balance": {"N": str(balance - 1)}})
        return "ok"


def _runner(impl: str, env: dict[str, str]) -> Any:
    if impl == "ours":
        return _Ours(env)
    if impl == "ours_core":
        return _Core(env)
    if impl == "ours_keyed":
        return _Ours(env, keyed=True)
    if impl == "ours_holds":
        return _Holds(env)
    return _Direct(impl, env)


def _worker(index: int, conn: Any, env: dict[str, str], slots: Any) -> None:
    from benchmarks.conflicts import ConflictHook

    os.environ.update(env)
    for key in QUIET_ENV:  # workers run with production logging and metrics settings
        os.environ.pop(key, None)
    # Logs and EMF metrics (fd 1) go to a temporary file: each run reads back what it added, so the
    # table can show the consume path's own counters (retries, refusals) without touching it.
    sys.stdout.flush()
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open for the life of the worker)
    os.dup2(log.fileno(), 1)
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    runners: dict[str, Any] = {}
    hook = ConflictHook(slots)

    def ours() -> _Ours:
        if "ours" not in runners:
            runners["ours"] = _Ours(env)
        runner: _Ours = runners["ours"]
        return runner

    while True:
        command = conn.recv()
        if command is None:
            return
        kind = command[0]
        try:
            if kind == "prepare":
                impl, warm_user = command[1], command[2]
                runner = _runner(impl, env)
                runners[impl] = runner
                runner.call(runner.prepare(warm_user))  # warm: imports, connections (a refused consume)
                if hasattr(runner, "warm"):
                    runner.warm(warm_user)
                if hasattr(runner, "done"):
                    runner.done()
                conn.send(("ok", None))
            elif kind == "grant":
                users, tokens = command[1], command[2]
                for user in users:
                    status = ours().grant(user, tokens)
                    if status != 201:
                        raise RuntimeError(f"grant for {user} answered {status}")
                conn.send(("ok", None))
            elif kind in ("run", "grant_loop"):
                sys.stdout.flush()
                offset = os.lseek(1, 0, os.SEEK_CUR)
                hook.take()
                if kind == "run":
                    result = _run(runners[command[1]], index, *command[2:])
                else:
                    result = _grant_loop(ours(), *command[1:])
                sys.stdout.flush()
                result["telemetry"] = _telemetry(log, offset)
                result["hook"] = hook.take()
                conn.send(("ok", result))
            elif kind == "hook":
                if command[1]:
                    hook.install()
                else:
                    hook.uninstall()
                conn.send(("ok", hook.take()))
            elif kind == "profile":
                conn.send(("ok", _profile(runners, command[1], command[2], command[3])))
            elif kind == "slices":
                conn.send(("ok", _slices(runners, index, *command[1:])))
        except Exception:
            conn.send(("error", traceback.format_exc(limit=5)))


def _telemetry(log: Any, offset: int) -> dict[str, int]:
    """Metric sums (EMF) and WARNING/ERROR log messages the handler wrote since `offset`."""
    log.seek(offset)
    counts: dict[str, int] = {}
    for line in log.read().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        for directive in record.get("_aws", {}).get("CloudWatchMetrics", []):
            for metric in directive.get("Metrics", []):
                value = record.get(metric["Name"], 0)
                total = sum(value) if isinstance(value, list) else value
                counts[f"metric {metric['Name']}"] = counts.get(f"metric {metric['Name']}", 0) + int(total)
        if record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            key = f"log {record['level']}: {record.get('message')}"
            detail = ", ".join(str(record[k]) for k in ("code", "exception_name") if record.get(k))
            if detail:
                key += f" ({detail})"
            counts[key] = counts.get(key, 0) + 1
    log.seek(0, os.SEEK_END)
    return counts


def _run(runner: Any, index: int, users: list[str], start_at: float, duration: float) -> dict[str, Any]:
    rng = random.Random(index)
    events = {user: runner.prepare(user) for user in users}
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    fresh = (len(users) > 1 and isinstance(runner, _Ours)) or runner.fresh
    counter: CallCounter | None = getattr(runner, "counter", None)
    if counter is not None:
        counter.take()
        counter.install()
    pause = start_at - time.time()
    if pause > 0:
        time.sleep(pause)
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + duration
    try:
        while True:
            user = users[0] if len(users) == 1 else rng.choice(users)
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            try:
                outcome = runner.call(events[user])
            except Exception as error:
                outcome = f"exception:{type(error).__name__}"
            t1 = time.perf_counter()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome == "ok":
                latencies.append((t1 - t0) * 1000)
            if fresh:
                events[user] = runner.prepare(user)  # a fresh request id (and key) per request, as API Gateway sends
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        if counter is not None:
            counter.uninstall()
        if hasattr(runner, "done"):
            runner.done()
    result = {"outcomes": outcomes, "latencies_ms": latencies, "seconds": seconds, "cpu_seconds": cpu}
    if counter is not None:
        result["calls"] = counter.take()
    return result


def _slices(runners: dict[str, Any], index: int, plan: list[str], users: dict[str, list[str]], start_at: float,
            slice_s: float, gap_s: float, rounds: int) -> dict[str, Any]:
    """Interleaved slices: round r runs each implementation of `plan` for one window of `slice_s`, in
    `plan`'s order on even rounds and reversed on odd ones. Windows follow one wall-clock schedule shared
    by every worker, so at any moment all workers run the same implementation, and a load change on the
    machine lasting seconds weighs on all of them alike. A window's requests start after its first
    `gap_s` (the previous window's last requests finish there) and before its end. Successes per window."""
    rng = random.Random(index)
    events = {impl: {user: runners[impl].prepare(user) for user in users[impl]} for impl in plan}
    ok: dict[str, list[int]] = {impl: [0] * rounds for impl in plan}
    other: dict[str, dict[str, int]] = {impl: {} for impl in plan}
    window = start_at
    for r in range(rounds):
        for impl in plan if r % 2 == 0 else list(reversed(plan)):
            runner, pool, prepared = runners[impl], users[impl], events[impl]
            fresh = (len(pool) > 1 and isinstance(runner, _Ours)) or runner.fresh
            begin, end = window + gap_s, window + slice_s
            window = end
            pause = begin - time.time()
            if pause > 0:
                time.sleep(pause)
            while time.time() < end:
                user = pool[0] if len(pool) == 1 else rng.choice(pool)
                try:
                    outcome = runner.call(prepared[user])
                except Exception as error:
                    outcome = f"exception:{type(error).__name__}"
                if outcome == "ok":
                    ok[impl][r] += 1
                else:
                    other[impl][outcome] = other[impl].get(outcome, 0) + 1
                if fresh:
                    prepared[user] = runner.prepare(user)
            if hasattr(runner, "done"):
                runner.done()
    return {"ok": ok, "other": other}


def _grant_loop(ours: _Ours, user: str, start_at: float, duration: float, interval: float) -> dict[str, Any]:
    """A grant of 1 token every `interval` seconds (POST /admin/users/{u}/grants: a transaction that
    includes the balance item), for `duration`."""
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    pause = start_at - time.time()
    if pause > 0:
        time.sleep(pause)
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            status = str(ours.grant(user, 1))
        except Exception as error:
            status = f"exception:{type(error).__name__}"
        latencies.append((time.perf_counter() - t0) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        time.sleep(interval)
    return {"statuses": statuses, "latencies_ms": latencies}


def _profile(runners: dict[str, Any], ours_user: str, floor_user: str, requests: int) -> dict[str, Any]:
    from benchmarks.consume_profile import handler_alone, profile

    ours, floor = runners["ours"], runners["floor"]
    ours_event, floor_key = ours.prepare(ours_user), floor.prepare(floor_user)
    result = profile({"ours": lambda: ours.call(ours_event), "floor": lambda: floor.call(floor_key)}, requests)
    result["handler_alone"] = handler_alone(lambda: ours.call(ours_event), requests)
    return result


# ---------------------------------------------------------------- the parent side


@dataclass
class Pool:
    processes: list[Any]
    pipes: list[Any]
    slots: Any = None  # the conflict simulation's shared memory: it must outlive the workers

    def ask(self, workers: int, command: tuple[Any, ...]) -> list[Any]:
        for pipe in self.pipes[:workers]:
            pipe.send(command)
        return [self._answer(pipe) for pipe in self.pipes[:workers]]

    def ask_each(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        for pipe, command in zip(self.pipes, commands, strict=False):
            pipe.send(command)
        return [self._answer(pipe) for pipe in self.pipes[: len(commands)]]

    @staticmethod
    def _answer(pipe: Any) -> Any:
        if not pipe.poll(300):
            raise TimeoutError("a benchmark worker did not answer within 300 s")
        status, value = pipe.recv()
        if status != "ok":
            raise RuntimeError(f"benchmark worker failed:\n{value}")
        return value

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(BrokenPipeError, OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


def start_pool(size: int, env: dict[str, str], slots: Any) -> Pool:
    context = mp.get_context("spawn")  # fresh interpreters: no sockets or logger state inherited
    processes, pipes = [], []
    for index in range(size):
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(index, child, env, slots), daemon=True)
        process.start()
        processes.append(process)
        pipes.append(parent)
    return Pool(processes, pipes, slots)


@dataclass
class Bench:
    pool: Pool
    engine: Engine
    stream: StreamRunner


def _seed_direct(engine: Engine, users: list[str], balance: int) -> None:
    client = engine.client()
    table = engine.tables["AccountsTable"]
    for start in range(0, len(users), 25):
        requests = [{"PutRequest": {"Item": {"userId": {"S": u}, "sk": {"S": GROUP_SK},
                                             "balance": {"N": str(balance)}}}} for u in users[start:start + 25]]
        pending: dict[str, Any] = {table: requests}
        while pending:
            pending = client.batch_write_item(RequestItems=pending).get("UnprocessedItems") or {}


def _seed(b: Bench, impl: str, users: list[str], balance: int) -> None:
    if not impl.startswith("ours"):
        _seed_direct(b.engine, users, balance)
    else:
        # Through the admin grants function, so the ledger starts with a grant entry that matches.
        size = len(b.pool.pipes)
        chunks = [users[i::size] for i in range(size)]
        b.pool.ask_each([("grant", chunk, balance) for chunk in chunks if chunk])
    b.stream.drain()  # the grants' ledger entries (not part of any run's stream figures)


_local = threading.local()


def _client(engine: Engine) -> Any:
    if getattr(_local, "client", None) is None:
        _local.client = engine.client()
    return _local.client


def _balances(engine: Engine, users: list[str], *, full: bool = False) -> dict[str, dict[str, Any]]:
    client = _client(engine)
    table = engine.tables["AccountsTable"]
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(users), 100):
        keys = [{"userId": {"S": u}, "sk": {"S": GROUP_SK}} for u in users[start:start + 100]]
        request: dict[str, Any] = {table: {"Keys": keys, "ConsistentRead": True}}
        if not full:
            request[table]["ProjectionExpression"] = "userId, balance, seq"
        while request:
            response = client.batch_get_item(RequestItems=request)
            for item in response["Responses"].get(table, []):
                found[item["userId"]["S"]] = item
            request = response.get("UnprocessedKeys") or {}
    return found


def _number(item: dict[str, Any] | None, name: str) -> int:
    return int(item[name]["N"]) if item and name in item else 0


def _user_ledger(engine: Engine, user: str) -> tuple[list[int], int]:
    """(seq of every entry, sum of deltas) of this benchmark's group in one user's ledger partition."""
    client = _client(engine)
    seqs: list[int] = []
    total = 0
    kwargs: dict[str, Any] = {
        "TableName": engine.tables["LedgerTable"], "KeyConditionExpression": "userId = :u", "ConsistentRead": True,
        "ExpressionAttributeValues": {":u": {"S": user}}, "ProjectionExpression": "#d, #g, #s",
        "ExpressionAttributeNames": {"#d": "delta", "#g": "offerGroup", "#s": "seq"},
    }
    while True:
        page = client.query(**kwargs)
        for item in page["Items"]:
            if item.get("offerGroup", {}).get("S") == GROUP:
                seqs.append(int(item["seq"]["N"]))
                total += int(item["delta"]["N"])
        if "LastEvaluatedKey" not in page:
            return seqs, total
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _ledger_check(engine: Engine, users: list[str], items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """For `ours`, user by user: ledger sum == balance, and the entries' seq exactly 1..n (n = the item's seq)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        ledgers = dict(zip(users, pool.map(lambda u: _user_ledger(engine, u), users), strict=True))
    sum_bad = seq_bad = entries = 0
    for user in users:
        seqs, total = ledgers[user]
        entries += len(seqs)
        item = items.get(user)
        if total != _number(item, "balance"):
            sum_bad += 1
        if sorted(seqs) != list(range(1, _number(item, "seq") + 1)):
            seq_bad += 1
    return {"entries": entries, "users_sum_mismatch": sum_bad, "users_seq_not_contiguous": seq_bad}


def _measure(b: Bench, impl: str, workers: int, users: list[str], duration: float, label: str, *,
             granter: tuple[float, int] | None = None) -> dict[str, Any]:
    """One run: `workers` workers consume for `duration` (plus, with `granter` = (interval, worker index),
    one more worker granting 1 token every `interval` s), then the stream is drained and everything checked."""
    phase = time.perf_counter()
    before = _balances(b.engine, users)
    start_at = time.time() + 0.3
    commands: list[tuple[Any, ...]] = [("run", impl, users, start_at, duration)] * workers
    if granter is not None:
        interval, position = granter
        commands = [*commands[:position], ("grant_loop", users[0], start_at, duration, interval)]
    answers = b.pool.ask_each(commands)
    results = answers[:workers]
    grant_result = answers[workers] if granter is not None else None
    run_s = time.perf_counter() - phase
    # The balance items as the load left them, before the stream caught up (a keyed consume's marker
    # stays on the item until the stream function has completed the key's record).
    left = _balances(b.engine, users, full=True) if impl.startswith("ours") else {}
    drained = b.stream.drain()
    phase = time.perf_counter()
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    telemetry: dict[str, int] = {}
    hook: dict[str, int] = {}
    calls: dict[str, int] = {}
    for result in results:
        _add(telemetry, result["telemetry"])
        _add(hook, result["hook"])
        _add(outcomes, result["outcomes"])
        _add(calls, result.get("calls", {}))
        latencies.extend(result["latencies_ms"])
    elapsed = max(r["seconds"] for r in results)
    successes = outcomes.get("ok", 0)
    # What the outcomes took and added: for a consume one token and one entry per success, for a pair
    # of hold and settle the tokens it kept and its two entries (`effects`).
    taken, entries = effects(impl, outcomes)
    granted = int(grant_result["statuses"].get("201", 0)) if grant_result else 0
    after = _balances(b.engine, users)
    had = sum(_number(before.get(u), "balance") for u in users) + granted
    final = sum(_number(after.get(u), "balance") for u in users)
    row: dict[str, Any] = {
        "scenario": label, "implementation": impl, "workers": workers, "users": len(users),
        "seconds": elapsed, "successes": successes, "refused": outcomes.get("refused", 0),
        "errors": {k: v for k, v in outcomes.items() if k not in ("ok", "refused")},
        "per_second": successes / elapsed if elapsed else 0.0,
        "worker_cpu_s": sum(r["cpu_seconds"] for r in results),
        "telemetry": telemetry, "hook": hook,
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "_latencies": latencies,
        "balance_before": had - granted, "granted": granted, "final_balance_total": final, "tokens_spent": had - final,
        "lost_updates": taken - (had - final), "tokens_taken": taken,
        "overdraft": sum(max(0, -_number(after.get(u), "balance")) for u in users) + max(0, taken - had),
        "stream": {"records": drained.records, "changes": drained.changes, "seconds": drained.seconds,
                   "failed_items": drained.failed_items, "batches": drained.batches},
    }
    if calls:
        row["calls"] = calls
    if grant_result is not None:
        row["grants"] = {"statuses": grant_result["statuses"], "hook": grant_result["hook"],
                         "telemetry": grant_result["telemetry"],
                         "p50_ms": percentile(grant_result["latencies_ms"], 50),
                         "p99_ms": percentile(grant_result["latencies_ms"], 99)}
    if left:
        from benchmarks.capacity import item_size

        sizes = {u: item_size(item) for u, item in left.items()}
        biggest = max(sizes, key=lambda u: sizes[u])
        row["item_before_drain"] = {
            "max_bytes": sizes[biggest],
            "markers": sum(1 for name in left[biggest] if name.startswith("ikb_")),
            "after_drain_bytes": item_size(_balances(b.engine, [biggest], full=True).get(biggest)),
        }
    if impl.startswith("ours"):
        seq_delta = sum(_number(after.get(u), "seq") - _number(before.get(u), "seq") for u in users)
        row["ledger"] = {**_ledger_check(b.engine, users, after), "new_entries": seq_delta,
                         "expected_new_entries": entries + granted}
    row["phases_s"] = {"run": run_s, "drain": drained.seconds, "verify": time.perf_counter() - phase}
    print(f"  {label}, {impl}, N={workers}: {successes:,} successes; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in row["phases_s"].items())
          + f"; stream {drained.records:,} records", file=sys.stderr, flush=True)
    return row


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


_SUMMED = ("seconds", "worker_cpu_s", "successes", "refused", "final_balance_total", "tokens_spent", "lost_updates",
           "overdraft", "users", "balance_before", "granted", "tokens_taken")


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the halves of a run: counts add up, latency percentiles over all the samples."""
    merged = dict(parts[0])
    for key in _SUMMED:
        merged[key] = sum(p[key] for p in parts)
    for key in ("errors", "telemetry", "hook", *(("calls",) if any("calls" in p for p in parts) else ())):
        merged[key] = {}
        for part in parts:
            _add(merged[key], part.get(key, {}))
    merged["stream"] = {k: sum(p["stream"][k] for p in parts) for k in parts[0]["stream"]}
    if "ledger" in parts[0]:
        merged["ledger"] = {k: sum(p["ledger"][k] for p in parts) for k in parts[0]["ledger"]}
    if "item_before_drain" in parts[0]:
        merged["item_before_drain"] = max((p["item_before_drain"] for p in parts), key=lambda i: i["max_bytes"])
    latencies = [v for p in parts for v in p["_latencies"]]
    merged.update(p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99), _latencies=latencies,
                  per_second=merged["successes"] / merged["seconds"] if merged["seconds"] else 0.0,
                  halves=len(parts))
    merged["phases_s"] = {k: sum(p["phases_s"][k] for p in parts) for k in parts[0]["phases_s"]}
    return merged


def ours_ok(row: dict[str, Any]) -> bool:
    """Zero overdrafts and lost updates; ledger sum == balance and seq 1..n for every user; one entry per
    success (and grant); no record the stream function failed; no 5xx or exception."""
    ledger = row["ledger"]
    return (row["lost_updates"] == 0 and row["overdraft"] == 0 and ledger["users_sum_mismatch"] == 0
            and ledger["users_seq_not_contiguous"] == 0 and ledger["new_entries"] == ledger["expected_new_entries"]
            and row["stream"]["failed_items"] == 0 and not row["errors"])


def run(engine: Engine, *, workers: tuple[int, ...] = (1, 2, 4, 8), duration: float = 5.0,
        many_users: int = 1000, many_workers: int = 8, small_balance: int = 100,
        small_duration: float = 2.0, conflict_workers: int = 4, conflict_duration: float = 3.0,
        grant_interval: float = 0.05, profile_requests: int = 300, interleaved_workers: tuple[int, ...] = (1, 4),
        rounds: int = 12, slice_s: float = 0.3) -> dict[str, Any]:
    from benchmarks.conflicts import SLOTS
    from user_credits.events import publisher

    env = {**function_environment(engine.endpoint, engine.tables), **BASE_ENV,
           "AWS_ENDPOINT_URL_DYNAMODB": engine.endpoint}
    os.environ.update(env)  # this process runs the stream function
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    sink = EventSink(keep=False)
    publisher.client_factory = lambda: sink
    publisher.reset_client()
    ready = function_ready("consume") and function_ready("admin_grants") and function_ready("ledger_stream")
    implementations: tuple[str, ...] = IMPLEMENTATIONS if ready else ("naive", "floor")
    if not function_ready("holds"):
        implementations = tuple(i for i in implementations if i != "ours_holds")
    stream = StreamRunner(engine.endpoint, engine.tables)
    stream.skip_to_now()
    size = max((*workers, many_workers, conflict_workers + 1))
    started = time.perf_counter()
    slots = mp.get_context("spawn").Array("q", SLOTS)
    pool = start_pool(size, env, slots)
    b = Bench(pool, engine, stream)
    rows: list[dict[str, Any]] = []
    conflict_rows: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    try:
        for impl in (*implementations, "ours_keyed") if ready else implementations:
            pool.ask(size, ("prepare", impl, new_id("warm")))
        stream.drain()
        print(f"  {size} workers started and warm in {time.perf_counter() - started:.1f} s", file=sys.stderr,
              flush=True)
        big = 1_000_000_000
        for count in workers:
            # Two halves in mirrored order (A B C, then C B A), each on a fresh hot user, so that a load
            # change on this shared machine during the run weighs on every implementation alike.
            halves: dict[str, list[dict[str, Any]]] = {impl: [] for impl in implementations}
            for order in (implementations, tuple(reversed(implementations))):
                for impl in order:
                    user = new_id(f"hot-{impl}")
                    _seed(b, impl, [user], big)
                    halves[impl].append(_measure(b, impl, count, [user], duration / 2, "one hot balance"))
            rows.extend(_merge(halves[impl]) for impl in implementations)
        # A balance that runs out: a correct consume stops at exactly `small_balance` successes.
        for impl in implementations:
            user = new_id(f"small-{impl}")
            _seed(b, impl, [user], small_balance)
            rows.append(_measure(b, impl, many_workers, [user], small_duration,
                                 f"balance of {small_balance} runs out"))
        # Many balances: one set of users per implementation, reused by every N and half (the checks are
        # cumulative: the ledger of every user must still add up after each run).
        many = [impl for impl in MANY_IMPLEMENTATIONS if impl in implementations]
        population = {impl: [new_id(f"many-{impl}") for _ in range(many_users)] for impl in many}
        for impl in many:
            _seed(b, impl, population[impl], big)
        label = f"{many_users:,} balances"
        for count in workers:
            parts: dict[str, list[dict[str, Any]]] = {impl: [] for impl in many}
            for order in (tuple(many), tuple(reversed(many))):
                for impl in order:
                    parts[impl].append(_measure(b, impl, count, population[impl], duration / 2, label))
            rows.extend(_merge(parts[impl]) for impl in many)
        interleaved = _interleaved(b, implementations, interleaved_workers, rounds, slice_s, big,
                                   {impl: population[impl] for impl in many}, label)
        if ready:
            conflict_rows = _conflicts(b, conflict_workers, conflict_duration, grant_interval, big)
            profile_user, floor_user = new_id("profile-ours"), new_id("profile-floor")
            _seed(b, "ours", [profile_user], big)
            _seed(b, "floor", [floor_user], big)
            profile = pool.ask(1, ("profile", profile_user, floor_user, profile_requests))[0]
            stream.drain()
    finally:
        pool.close()
    for row in (*rows, *conflict_rows):
        row.pop("_latencies", None)
    for row in rows:
        # A balance that runs out caps every correct implementation at the same count: no ratio there.
        if row["implementation"] in AGAINST_FLOOR and "runs out" not in row["scenario"]:
            floor = next((r for r in rows if r["implementation"] == "floor" and r["scenario"] == row["scenario"]
                          and r["workers"] == row["workers"]), None)
            row["ratio_to_floor"] = row["per_second"] / floor["per_second"] if floor and floor["per_second"] else None
    return {"rows": rows, "interleaved": interleaved, "conflicts": conflict_rows, "profile": profile,
            "duration_s": duration,
            "implementations": list(implementations), "seconds": time.perf_counter() - started,
            "stream_total": vars(stream.total), "stream_errors": stream.errors, "grant_interval_s": grant_interval,
            "ours_is": "the real consume handler (functions/consume, app.handler) called with API Gateway HTTP "
                       "API v2 events in warm worker processes"}


INTERLEAVED_GAP_S = 0.02


def _interleaved(b: Bench, implementations: tuple[str, ...], workers: tuple[int, ...], rounds: int, slice_s: float,
                 big: int, population: dict[str, list[str]], many_label: str) -> list[dict[str, Any]]:
    """Each implementation against the floor in short windows interleaved in time (`_slices`): per round,
    the ratio of its window's successes to the floor's (equal windows, so equal times); the median of the
    rounds is the figure, its spread shows the noise. Correctness is checked by the runs above, not here."""
    plan = [impl for impl in (*AGAINST_FLOOR, "floor") if impl in implementations]
    if "floor" not in plan or len(plan) < 2:
        return []
    hot = {impl: [new_id(f"slices-{impl}")] for impl in plan}
    for impl in plan:
        _seed(b, impl, hot[impl], big)
    out = []
    for label, users in (("one hot balance", hot), (many_label, population)):
        if any(impl not in users for impl in plan):
            continue
        for count in workers:
            start_at = time.time() + 0.5
            answers = b.pool.ask(count, ("slices", plan, users, start_at, slice_s, INTERLEAVED_GAP_S, rounds))
            ok = {impl: [sum(a["ok"][impl][r] for a in answers) for r in range(rounds)] for impl in plan}
            other: dict[str, dict[str, int]] = {impl: {} for impl in plan}
            for answer in answers:
                for impl in plan:
                    _add(other[impl], answer["other"][impl])
            ratios = {impl: [ok[impl][r] / ok["floor"][r] if ok["floor"][r] else 0.0 for r in range(rounds)]
                      for impl in plan if impl != "floor"}
            out.append({"scenario": label, "workers": count, "rounds": rounds, "slice_s": slice_s,
                        "gap_s": INTERLEAVED_GAP_S, "ok": ok, "other": other, "ratios": ratios,
                        "median": {impl: statistics.median(values) for impl, values in ratios.items()}})
            b.stream.drain()
            print(f"  interleaved, {label}, N={count}: "
                  + ", ".join(f"{impl} {out[-1]['median'][impl]:.2f}x" for impl in ratios), file=sys.stderr,
                  flush=True)
    return out


def _conflicts(b: Bench, consumers: int, duration: float, interval: float, big: int) -> list[dict[str, Any]]:
    """Consumes on one hot balance with the TransactionConflict hook in every worker: alone, then with a
    grant (a transaction that includes the balance item) every `interval` seconds from one more worker."""
    pool = b.pool
    pool.ask(len(pool.pipes), ("hook", True))
    rows = []
    try:
        cases = [("consumes alone", "ours", None),
                 ("keyed consumes alone", "ours_keyed", None),
                 (f"consumes + a grant every {interval * 1000:.0f} ms", "ours", (interval, consumers)),
                 (f"keyed consumes + a grant every {interval * 1000:.0f} ms", "ours_keyed", (interval, consumers))]
        for label, impl, granter in cases:
            user = new_id("conflict")
            _seed(b, "ours", [user], big)
            rows.append(_measure(b, impl, consumers, [user], duration, label, granter=granter))
    finally:
        pool.ask(len(pool.pipes), ("hook", False))
    return rows


# ---------------------------------------------------------------- tables


def _stream_cell(r: dict[str, Any]) -> str:
    st = r["stream"]
    rate = st["records"] / st["seconds"] if st["seconds"] else 0.0
    what = "pair" if r["implementation"] == "ours_holds" else "consume"
    text = f"{st['records']:,} records in {st['seconds']:.1f} s = {rate:,.0f}/s ({rate / r['per_second']:.2f}x the " \
           f"{what} rate)" if r["per_second"] else f"{st['records']:,} records"
    if st["failed_items"]:
        text += f", **{st['failed_items']} failed**"
    return text


def _item_cell(r: dict[str, Any]) -> str:
    item = r.get("item_before_drain")
    if not item:
        return "-"
    text = f"{item['max_bytes']:,} B"
    if item["markers"]:
        text += f", {item['markers']:,} key markers ({item['after_drain_bytes']:,} B after the drain)"
    return text


def _ledger_cell(r: dict[str, Any]) -> str:
    ledger = r["ledger"]
    text = (f"{ledger['new_entries']:,} new entries (expected {ledger['expected_new_entries']:,}), "
            f"{ledger['entries']:,} in all; users with sum != balance: {ledger['users_sum_mismatch']}, "
            f"with seq not 1..n: {ledger['users_seq_not_contiguous']}")
    return text if ours_ok(r) else text + " **FAILED**"


def markdown(result: dict[str, Any]) -> str:
    out = [
        f"`ours` = {result['ours_is']}; `naive` = GetItem, check, unconditional PutItem (written only in the "
        "benchmark); `floor` = a bare conditional UpdateItem. Each worker is a separate process; latency is "
        "per successful request, measured in the worker; `client CPU ms/request` is the workers' own CPU time "
        "per request (the Lambda side; DynamoDB Local's CPU is not in it). With DynamoDB Local on the same "
        "shared CPUs as the workers, throughput at N >= 2 is bounded by CPU, so a heavier client lowers it in a "
        "way separate Lambda containers would not. After each run the Accounts table's stream is drained "
        "through the real stream function in the benchmark process (not timed in the consume rate): `stream "
        "drain` is its own rate, one batch after another as Lambda does per shard. `ledger check` (ours): "
        "per user, the ledger sum equals the balance and the entries' seq are exactly 1..n (n = the balance "
        "item's seq); new entries = the seq the run added, one per success. `handler metrics and warnings` "
        "sums the Powertools metrics and WARNING/ERROR logs the consume handler wrote during the run. Target "
        "(issue 11): ours >= 0.8x floor at N=1 and N=4, on one hot balance and on 1,000 balances, with zero "
        "overdrafts and zero lost updates.",
        "",
        "`ours_core` = the same consume without its HTTP layer: `logic.consumption.consume_tokens` called "
        "directly in the worker (the real decision and its one conditional UpdateItem; a success's `Consumes` "
        "is counted by the stream function, for both; no event, no Powertools resolver, validation, logging "
        "context or metrics flush, none of our caller and body checks). Not a product path: it shows which "
        "part of `ours`'s gap to the floor is the handler's. Its ledger is checked like `ours`'s.",
        "",
        f"`ours_holds` = a pair of hold and settle through the real holds function (functions/holds, app.handler), "
        f"one after the other in the same worker: `POST /users/{{userId}}/holds` of {_Holds.HELD} tokens, then "
        f"`POST .../holds/{{holdId}}/settle` of {_Holds.SETTLED} (returns the rest); its rate is in **pairs/s**, "
        "and `/ floor` divides it by the floor's single writes/s in the same run (target, issue 12: >= 0.4x, a "
        f"pair being two writes). Per pair the balance loses {_Holds.SETTLED} token and the ledger gains 2 "
        "entries (`hold`, `release`): `lost updates` and the ledger check count that. The DynamoDB calls the "
        "holds handler made are counted in each worker (a wrapper of botocore's `_make_api_call`, installed only "
        "around these runs) and shown in a table below the main one.",
        "",
    ]
    rows = []
    for r in result["rows"]:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
        ratio = r.get("ratio_to_floor")
        ours = r["implementation"].startswith("ours")
        counters = (", ".join(f"{k} {v:,}" for k, v in sorted(r["telemetry"].items())) or "none") if ours else "-"
        rows.append([
            r["scenario"], r["workers"], r["implementation"], r["successes"], f"{r['per_second']:,.0f}",
            "-" if ratio is None else f"**{ratio:.2f}x**", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
            f"{r['worker_cpu_s'] * 1000 / max(1, r['successes'] + r['refused']):.2f}", r["refused"], errors,
            r["tokens_spent"], r["lost_updates"], r["overdraft"], _stream_cell(r) if ours else "-",
            _ledger_cell(r) if ours else "-", _item_cell(r), counters,
        ])
    out.append(markdown_table(
        ["scenario", "N", "impl", "successes (pairs)", "consumes/s (pairs/s)", "/ floor", "p50 ms", "p99 ms",
         "client CPU ms/request", "refused", "errors", "balance decrease", "lost updates", "overdraft",
         "ours: stream drain", "ours: ledger check", "ours: largest balance item before the drain",
         "ours: handler metrics and warnings"], rows,
    ))
    if result.get("stream_errors"):
        out += ["", "ERROR records the stream function logged: "
                + "; ".join(f"{k} (x{v})" for k, v in result["stream_errors"].items())]
    pairs = [r for r in result["rows"] if r["implementation"] == "ours_holds"]
    if pairs:
        out += ["", pairs_markdown(pairs)]
    if result.get("interleaved"):
        out += ["", interleaved_markdown(result["interleaved"])]
    if result.get("conflicts"):
        out += ["", conflicts_markdown(result)]
    if result.get("profile"):
        from benchmarks.consume_profile import markdown as profile_markdown

        p = result["profile"]
        out += ["", f"Where one request's time goes, by layer ({p['ours']['requests']} sequential requests in one "
                "worker, N=1, production logging and metrics; cProfile own time per layer, C functions charged to "
                "their callers, socket calls apart; `benchmarks/consume_profile.py`):", "", profile_markdown(p)]
    return "\n".join(out)


def interleaved_markdown(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    text = (f"Interleaved slices (`_slices`): the same workers run each implementation in turn, in windows of "
            f"{first['slice_s']:.2f} s on one wall-clock schedule ({first['rounds']} rounds, the order reversed "
            "every other round, requests started from 0.02 s into a window to its end), so that a change of "
            "load on this shared machine lands on every implementation within a second. Per round, the ratio "
            "of an implementation's successes (pairs for `ours_holds`) to the floor's in the same round; the "
            "figure is the median of the rounds, with their range. The rows above measure each implementation "
            "in two halves of several seconds each, and their ratios move by as much as 0.2 from one run to the "
            "next; these are the steadier figure. Correctness is checked by the runs above, not here.")
    impls = [impl for impl in first["ratios"]]
    table_rows = []
    for r in rows:
        cells = [r["scenario"], str(r["workers"])]
        for impl in impls:
            values = r["ratios"][impl]
            cells.append(f"**{r['median'][impl]:.2f}x** ({min(values):.2f}-{max(values):.2f})")
        window = r["slice_s"] - r["gap_s"]
        cells.append(f"{sum(r['ok']['floor']) / (window * r['rounds']):,.0f}/s")
        others = {f"{impl} {k}": v for impl in r["other"] for k, v in r["other"][impl].items()}
        cells.append(", ".join(f"{k}: {v:,}" for k, v in sorted(others.items())) or "none")
        table_rows.append(cells)
    return text + "\n\n" + markdown_table(
        ["scenario", "N", *[f"{impl} / floor (median, range)" for impl in impls], "floor writes/s in its windows",
         "answers other than success"], table_rows)


def pair_calls(row: dict[str, Any]) -> dict[str, Any]:
    """The DynamoDB calls of a run of pairs, per pair: all of them, and the transactions that include
    a balance item (each would make concurrent writes of that item fail on AWS)."""
    calls = row.get("calls") or {}
    total = sum(v for k, v in calls.items() if not k.startswith("TransactWriteItems incl."))
    balance_tx = calls.get("TransactWriteItems incl. a balance item", 0)
    requests = 2 * row["successes"] + row["refused"] + sum(row["errors"].values())
    return {"calls": total, "per_pair": total / row["successes"] if row["successes"] else None,
            "per_request": total / requests if requests else None, "balance_transactions": balance_tx,
            "balance_transactions_per_1000_pairs": 1000 * balance_tx / row["successes"] if row["successes"] else None}


def pairs_markdown(rows: list[dict[str, Any]]) -> str:
    out = ["DynamoDB calls of the hold+settle pairs (`ours_holds`), counted in the workers: `calls per pair` = all "
           "calls of the holds handler / pairs; `tx incl. a balance item` = TransactWriteItems that include the "
           "balance item (issue 12: a hold and its settle each at most 2 calls and never such a transaction).", ""]
    table = []
    for r in rows:
        figures = pair_calls(r)
        ops = ", ".join(f"{k} {v:,}" for k, v in sorted((r.get("calls") or {}).items())
                        if not k.startswith("TransactWriteItems incl."))
        table.append([r["scenario"], r["workers"], r["successes"], f"{r['per_second']:,.0f}",
                      "-" if figures["per_pair"] is None else f"{figures['per_pair']:.3f}",
                      figures["balance_transactions"],
                      "-" if figures["balance_transactions_per_1000_pairs"] is None
                      else f"{figures['balance_transactions_per_1000_pairs']:.1f}", ops or "-"])
    out.append(markdown_table(["scenario", "N", "pairs", "pairs/s", "calls per pair", "tx incl. a balance item",
                               "per 1,000 pairs", "calls by operation (`!Code`: failed with it)"], table))
    return "\n".join(out)


def conflicts_markdown(result: dict[str, Any]) -> str:
    out = [
        "TransactionConflict simulation (`benchmarks/conflicts.py`): DynamoDB Local serialises every request and "
        "never raises TransactionConflictException, so a botocore hook in every worker process holds the items "
        "of each in-flight TransactWriteItems in memory shared by the workers, and rejects a plain PutItem/"
        "UpdateItem/DeleteItem on such an item with TransactionConflictException, as AWS does (a transaction "
        "on an item of another in-flight one is cancelled with reason TransactionConflict). Consumers: separate "
        "worker processes on one hot balance; grants (`POST /admin/users/{u}/grants`, 1 token, a "
        "TransactWriteItems that includes the balance item) from one more worker. `conflicts on consume "
        "writes` = the ClientErrors the hook raised in the consumers; `ConsumeRetries` = the consume "
        "handler's own metric (each conflict is retried with backoff).",
        "",
    ]
    rows = []
    for r in result["conflicts"]:
        hook = r["hook"]
        raised = sum(v for k, v in hook.items() if k.startswith("TransactionConflictException"))
        passed = sum(v for k, v in hook.items() if k.endswith(" passed"))
        retries = r["telemetry"].get("metric ConsumeRetries", 0)
        attempts = r["successes"] + r["refused"] + sum(r["errors"].values())
        fivexx = sum(v for k, v in r["errors"].items() if k.startswith("http_5") or k.startswith("exception"))
        statuses = "200 " + f"{r['successes']:,}" + (f", 402 {r['refused']:,}" if r["refused"] else "") + (
            "".join(f", {k} {v}" for k, v in sorted(r["errors"].items())))
        grants = r.get("grants")
        grant_text = "-"
        if grants:
            grant_text = ", ".join(f"{k}: {v}" for k, v in sorted(grants["statuses"].items()))
            tx = grants["hook"].get("TransactWriteItems passed", 0)
            cancelled = grants["hook"].get("TransactWriteItems failed at DynamoDB: TransactionCanceledException", 0)
            grant_text += (f" ({tx} transactions sent, {cancelled} of them cancelled by DynamoDB: the `seq` they "
                           f"read had moved; grant latency p50 {grants['p50_ms']:,.0f} ms, p99 "
                           f"{grants['p99_ms']:,.0f} ms)")
        rows.append([
            r["scenario"], r["workers"], f"{r['per_second']:,.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
            statuses, fivexx, raised, f"{raised / max(1, passed + raised):.2%}", retries,
            f"{raised / max(1, attempts) * 1000:.1f}", grant_text, _item_cell(r),
            "ok" if ours_ok(r) else "**FAILED**: " + _ledger_cell(r),
        ])
    out.append(markdown_table(
        ["run", "consumers", "consumes/s", "p50 ms", "p99 ms", "consume answers", "5xx", "conflicts on consume writes",
         "of consume writes sent", "ConsumeRetries (metric)", "conflicts per 1,000 consumes", "grants",
         "balance item when the load stopped (before the drain)", "balance, ledger and seq after the drain"], rows))
    return "\n".join(out)
