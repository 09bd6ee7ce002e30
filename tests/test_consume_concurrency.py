"""A hot balance under many workers (DynamoDB Local): never an overdraft, never a lost or doubled entry."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from typing import Any

from user_credits.store.models import LedgerRecord

PROCESSES = 4
CONSUMES_PER_PROCESS = 20
START_BALANCE = 60


def consume_worker(env: dict[str, str], user: str, group: str, keys: str | None, worker: int) -> list[tuple[int, str]]:
    """Runs in its own process, like a separate Lambda instance: env, handler from the template, calls."""
    os.environ.update(env)
    from user_credits_dev import template as tpl
    from user_credits_dev.lambda_events import LambdaContext, http_api_event

    spec = next(s for s in tpl.functions({}) if s.logical_id == "ConsumeFunction")
    handler = tpl.load_handler(spec)
    statuses = []
    for number in range(CONSUMES_PER_PROCESS):
        headers = None if keys is None else {"Idempotency-Key": keys.format(worker=worker, number=number)}
        event = http_api_event("POST", f"/users/{user}/consume", route_path="/users/{userId}/consume",
                               body=f'{{"offerGroup": "{group}", "tokens": 1}}', headers=headers, iam=True)
        result = handler(event, LambdaContext(function_name="ConsumeFunction"))
        for _ in range(100):
            # 503: the first request with this key is still on its way; a caller retries shortly.
            if result["statusCode"] != 503:
                break
            time.sleep(0.02)
            result = handler(event, LambdaContext(function_name="ConsumeFunction"))
        statuses.append((result["statusCode"], result["body"]))
    return statuses


def run_workers(user: str, group: str, keys: str | None) -> list[list[tuple[int, str]]]:
    env = {k: v for k, v in os.environ.items() if k.isupper()}
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        return pool.starmap(consume_worker, [(env, user, group, keys, w) for w in range(PROCESSES)])


def status_counts(results: list[list[tuple[int, str]]]) -> Counter[int]:
    return Counter(status for replies in results for status, _ in replies)


def grant(service: Any, user: str, group: str, tokens: int) -> None:
    reply = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": tokens}, iam=True)
    assert reply.status == 201, reply.body


def assert_exact_outcome(service: Any, user: str, group: str, statuses: Counter[int], balanced: Any) -> None:
    assert statuses == Counter({200: START_BALANCE, 402: PROCESSES * CONSUMES_PER_PROCESS - START_BALANCE})
    credits = service.call("GET", f"/users/{user}/credits", iam=True).body
    assert [(g["offerGroup"], g["balance"], g["expiresAt"]) for g in credits["groups"]] == [(group, 0, None)]
    assert [lot["remaining"] for lot in credits["groups"][0]["lots"]] == [0]
    balanced(user)
    entries = list(LedgerRecord.query(user, consistent_read=True))
    assert len(entries) == START_BALANCE + 1
    assert sum(int(e.delta) for e in entries) == 0
    # Each consume's balanceAfter is distinct and exact: 59, 58, ... 0, in seq order.
    consumes = sorted((e for e in entries if e.reason == "consume"), key=lambda e: int(e.seq))
    assert [int(e.balanceAfter) for e in consumes] == list(range(START_BALANCE - 1, -1, -1))


def test_four_processes_never_overdraw_a_hot_balance(local_service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, START_BALANCE)
    statuses = status_counts(run_workers(user, group, keys=None))
    assert_exact_outcome(local_service, user, group, statuses, balanced)


def test_four_processes_with_idempotency_keys_never_overdraw(local_service: Any, ids: Any, balanced: Any) -> None:
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, START_BALANCE)
    statuses = status_counts(run_workers(user, group, keys="w{worker}-{number}"))
    assert_exact_outcome(local_service, user, group, statuses, balanced)


def test_concurrent_duplicates_of_one_key_debit_once(local_service: Any, ids: Any, balanced: Any) -> None:
    """Four workers send the same 20 keyed requests at the same time: 20 debits, one answer per key."""
    user, group = ids("u"), ids("g")
    grant(local_service, user, group, START_BALANCE)
    results = run_workers(user, group, keys="same-{number}")
    for number in range(CONSUMES_PER_PROCESS):
        answers = {replies[number] for replies in results}
        assert len(answers) == 1, answers
        status, _ = answers.pop()
        assert status == 200
    balanced(user)
    remaining = START_BALANCE - CONSUMES_PER_PROCESS
    assert local_service.call("GET", f"/users/{user}/credits", iam=True).body["groups"][0]["balance"] == remaining
    entries = list(LedgerRecord.query(user, consistent_read=True))
    assert len(entries) == CONSUMES_PER_PROCESS + 1
