"""Fault injection at the N-th DynamoDB call, for the crash-consistency tests.

Three ways a call can go wrong, each `before` the request is sent or `after` DynamoDB applied it and
before the function saw the answer:
- `died`: the Lambda was killed (a BaseException, so no `except Exception` in our code can swallow it);
- `canceled` / `throttled`: DynamoDB (or the network) answered with a ClientError. Raised `after` the
  call, it is the ambiguous case: the write is in, the function believes it failed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError
from conftest import IN_STREAM, dynamodb_hooks

KINDS = ["died", "canceled", "throttled"]
PHASES = ["before", "after"]


class Died(BaseException):
    """The Lambda runtime killed the function here."""


def client_error(kind: str, operation: str) -> ClientError:
    if kind == "canceled":
        code, message = "TransactionCanceledException", "Transaction cancelled, please refer cancellation reasons"
        extra: dict[str, Any] = {"CancellationReasons": [{"Code": "TransactionConflict"}]}
    else:
        code, message, extra = "ThrottlingException", "Rate of requests exceeds the allowed throughput", {}
    response: Any = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 400},
                     **extra}
    return ClientError(response, operation)


@dataclass
class Fault:
    """Counts DynamoDB calls (all threads) and fails call number `at` once, the way `kind` says. The
    stream function's calls are not counted: these faults are the request's (tests/test_stream.py
    kills the stream function at each of its calls)."""

    kind: str
    phase: str
    at: int | None = None
    calls: int = 0
    fired: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, model: Any = None, **_: Any) -> None:
        if getattr(IN_STREAM, "active", False):
            return
        with self.lock:
            self.calls += 1
            if self.at is None or self.calls != self.at:
                return
            self.at, self.fired = None, True
        operation = getattr(model, "name", "DynamoDB")
        if self.kind == "died":
            raise Died(f"killed {self.phase} DynamoDB call {self.calls} ({operation})")
        raise client_error(self.kind, operation)

    def arm(self, at: int | None) -> None:
        with self.lock:
            self.at, self.calls, self.fired = at, 0, False


@contextmanager
def dynamodb_faults(service: Any, monkeypatch: pytest.MonkeyPatch, kind: str, phase: str) -> Iterator[Fault]:
    """A `Fault` of `kind` on every DynamoDB call (`before-call` or `after-call`) made inside the block."""
    fault = Fault(kind, phase)
    with dynamodb_hooks(service, {f"{phase}-call.dynamodb": fault.hook}):
        yield fault
