"""Sends domain events to EventBridge: only the stream function does (`logic.stream`).

Events are delivered at least once (SPEC 4): a send that fails raises, the stream record that carries
the events fails, and Lambda delivers it again; every event keeps its `eventId` across redeliveries.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Final

import boto3

from user_credits.config import load_settings
from user_credits.domain.changes import Event
from user_credits.observability import count

SOURCE: Final = "user-credits"
DETAIL_TYPES: Final = (
    "CreditsGranted", "CreditsLow", "CreditsExpiringSoon", "CreditsExpired", "PaymentInconsistent",
    "SubscriptionPaymentFailed", "SubscriptionCanceled",
)

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


# PutEvents takes at most 10 entries per call.
MAX_ENTRIES: Final = 10


class EventsNotSent(Exception):
    """EventBridge refused or failed some entries: the stream record is delivered again."""


def send(events: Sequence[Event]) -> None:
    """Send the events (each with its `eventId`); raises `EventsNotSent` unless all were accepted."""
    bus = load_settings().event_bus_name
    entries = []
    for event in events:
        if event.detail_type not in DETAIL_TYPES:
            raise ValueError(f"unknown detail type {event.detail_type!r}")
        entries.append({"Source": SOURCE, "DetailType": event.detail_type,
                        "Detail": json.dumps(dict(event.detail), default=str), "EventBusName": bus})
    for start in range(0, len(entries), MAX_ENTRIES):
        chunk = entries[start:start + MAX_ENTRIES]
        try:
            response = _events_client().put_events(Entries=chunk)
        except Exception as error:
            count("EventsFailed", len(chunk))
            raise EventsNotSent(f"{len(chunk)} events not sent") from error
        failed = int(response.get("FailedEntryCount", 0))
        if failed:
            count("EventsFailed", failed)
            raise EventsNotSent(f"EventBridge refused {failed} of {len(chunk)} events")
        for entry in chunk:
            count(f"Event{entry['DetailType']}")
