"""Sends domain events to EventBridge after the change they describe has committed.

Events are sent at most once: a send that fails is logged and counted (metric `EventsFailed`) but never
fails the request, because the balance change it reports has already happened.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import boto3
from aws_lambda_powertools import Logger

from user_credits.config import load_settings
from user_credits.observability import count

SOURCE: Final = "user-credits"
DETAIL_TYPES: Final = (
    "CreditsGranted", "CreditsLow", "CreditsExpiringSoon", "CreditsExpired", "PaymentInconsistent",
)

logger = Logger(service="user-credits")

_client: Any = None
# Tests replace this to capture what would be sent; production builds the boto3 client once.
client_factory: Callable[[], Any] = lambda: boto3.client("events")  # noqa: E731


def _events_client() -> Any:
    global _client
    if _client is None:
        _client = client_factory()
    return _client


def reset_client() -> None:
    global _client
    _client = None


def publish(detail_type: str, detail: Mapping[str, Any]) -> bool:
    """Send one event; True when EventBridge accepted it."""
    if detail_type not in DETAIL_TYPES:
        raise ValueError(f"unknown detail type {detail_type!r}")
    entry = {
        "Source": SOURCE,
        "DetailType": detail_type,
        "Detail": json.dumps(dict(detail), default=str),
        "EventBusName": load_settings().event_bus_name,
    }
    try:
        response = _events_client().put_events(Entries=[entry])
        if response.get("FailedEntryCount", 0):
            raise RuntimeError(f"EventBridge refused the entry: {response.get('Entries')}")
    except Exception:
        # The change is committed; losing the notification must not undo or fail it.
        logger.exception("event not sent", extra={"detail_type": detail_type})
        count("EventsFailed")
        return False
    count(f"Event{detail_type}")
    return True
