"""Every sample event in events/ is real-shaped: its function accepts it and never answers 5xx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from user_credits_dev import template as tpl
from user_credits_dev.lambda_events import LambdaContext, route_matches

EVENTS = sorted((Path(__file__).resolve().parents[1] / "events").glob("*.json"))


def test_there_are_sample_events_for_every_route() -> None:
    routes = {(m, p) for spec in tpl.functions({}) for m, p, _ in spec.routes}
    covered = set()
    for file in EVENTS:
        event = json.loads(file.read_text())
        if "routeKey" in event:
            method, path = event["routeKey"].split(" ", 1)
            covered.add((method, path))
    assert routes - covered == set(), f"routes without a sample event in events/: {sorted(routes - covered)}"


def test_there_are_sample_events_for_the_schedule_and_the_stream() -> None:
    sources = {json.loads(file.read_text()).get("source") for file in EVENTS}
    records = [r for file in EVENTS for r in json.loads(file.read_text()).get("Records", [])]
    assert "aws.scheduler" in sources or "aws.events" in sources, sources
    assert any(r.get("eventSource") == "aws:dynamodb" for r in records), "no DynamoDB stream sample event"


@pytest.mark.parametrize("file", EVENTS, ids=lambda f: f.name)
def test_sample_event_is_served_without_a_server_error(service: Any, file: Path) -> None:
    event = json.loads(file.read_text())
    if "Records" in event:
        spec = next(s for s in service.specs if s.stream)
    elif "routeKey" not in event:
        spec = next(s for s in service.specs if s.schedule)
    else:
        method, route_path = event["routeKey"].split(" ", 1)
        spec = next(s for s in service.specs if any(
            m == method and p == route_path and route_matches(p, event["rawPath"]) is not None
            for m, p, _ in s.routes))
    result = tpl.load_handler(spec)(event, LambdaContext(function_name=spec.logical_id))
    if "routeKey" in event:
        assert result["statusCode"] < 500, result
        assert json.loads(result["body"]) is not None
    if "Records" in event:
        # Every record processed: the entry written, the sample's events sent.
        assert result == {"batchItemFailures": []}, result
