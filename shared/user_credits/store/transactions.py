"""Optimistic transactions: read, decide in the domain, write with conditions; on a lost race, retry.

Used by the paths that must read before they write (a purchase needs the group's current expiry, a
refund the order's revoked tokens, the sweep the balance it expires). The hot consume path does not
come here: it decides with one conditional UpdateItem (see `store.consumption`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from pynamodb.exceptions import PutError, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from user_credits.errors import ServiceBusy
from user_credits.observability import count
from user_credits.store.models import shared_connection

T = TypeVar("T")

RETRYABLE = {"ConditionalCheckFailed", "TransactionConflict"}
THROTTLED = {"ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded"}


class StaleRead(Exception):
    """What we read changed before our conditional write: read again and decide again."""


def transaction() -> TransactWrite:
    return TransactWrite(connection=shared_connection())


def cancellation_codes(error: TransactWriteError) -> list[str | None]:
    return [reason.code if reason is not None else None for reason in (error.cancellation_reasons or [])]


def commit(build: Callable[[TransactWrite], None]) -> None:
    """Run one TransactWriteItems; a failed condition or a conflict becomes `StaleRead`."""
    try:
        with transaction() as tx:
            build(tx)
    except TransactWriteError as error:
        codes = set(cancellation_codes(error))
        if codes & RETRYABLE or error.cause_response_code in ("TransactionConflictException",):
            raise StaleRead(str(codes)) from error
        if codes & THROTTLED or error.cause_response_code in (
            "ThrottlingException", "ProvisionedThroughputExceededException", "RequestLimitExceeded",
            "TransactionInProgressException",
        ):
            raise StaleRead("throttled") from error
        raise


def optimistic(
    attempt: Callable[[], T], *, attempts: int = 12, base_delay: float = 0.005, cap: float = 0.25,
    metric: str | None = None,
) -> T:
    """Call `attempt` (which reads, decides and commits, or makes one conditional write) until it
    commits or gives up with 503: the one retry loop for lost races (`StaleRead`). Throttling is
    botocore's to retry (standard mode, as pynamodb configures every client), not this loop's.

    Full-jitter exponential backoff keeps colliding writers from retrying in lockstep.
    """
    for number in range(attempts):
        try:
            return attempt()
        except (StaleRead, PutError, UpdateError) as error:
            if isinstance(error, PutError | UpdateError) and not _is_condition_failure(error):
                raise
            if metric is not None:
                count(metric)
            if number == attempts - 1:
                break
            time.sleep(random.uniform(0, min(cap, base_delay * (2**number))))
    raise ServiceBusy("too much contention on this balance, retry shortly")


def _is_condition_failure(error: PutError | UpdateError) -> bool:
    return error.cause_response_code == "ConditionalCheckFailedException"
