"""Counting what DynamoDB reads, from botocore's `after-call` event: one meter for the tests and the
benchmarks (the sweep's cost grows with the lots due, not with the users: SPEC 2.6)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReadMeter:
    """The DynamoDB items read, by operation, and the requests made, as botocore's `after-call` event
    reports them (`after_call` is its handler).

    Query/Scan count what DynamoDB examined (`ScannedCount`, which a filter would not reduce); a GetItem
    counts 1 even when the item is missing, since it is charged all the same; a BatchGetItem or
    TransactGetItems counts the items it returned.
    """

    items: int = 0
    by_operation: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def after_call(self, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        with self.lock:
            self._add(model.name, parsed)

    def _add(self, operation: str, parsed: dict[str, Any]) -> None:
        self.requests[operation] += 1
        if operation in ("Query", "Scan"):
            read = int(parsed.get("ScannedCount", parsed.get("Count", len(parsed.get("Items", [])))))
        elif operation == "GetItem":
            read = 1
        elif operation == "BatchGetItem":
            read = sum(len(items) for items in parsed.get("Responses", {}).values())
        elif operation == "TransactGetItems":
            read = len(parsed.get("Responses", []))
        else:
            return
        self.items += read
        self.by_operation[operation] += read

    def reset(self) -> None:
        with self.lock:
            self.items = 0
            self.by_operation.clear()
            self.requests.clear()


def meter_pynamodb_sessions(meter: ReadMeter) -> None:
    """Every botocore session pynamodb makes from now on reports to `meter` (for a process of its own,
    as a benchmark is; the tests hook their clients with `conftest.hook_dynamodb_clients` instead)."""
    import pynamodb.connection.base as pynamodb_base

    make_session = pynamodb_base.get_session  # type: ignore[attr-defined]
    handler: Any = meter.after_call

    def metered_session(*args: Any, **kwargs: Any) -> Any:
        session = make_session(*args, **kwargs)
        session.register("after-call.dynamodb", handler)
        return session

    setattr(pynamodb_base, "get_session", metered_session)  # noqa: B010 (pynamodb does not export it)
