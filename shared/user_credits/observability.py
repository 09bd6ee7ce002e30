"""Logger and metrics shared by every function (Powertools)."""

from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

logger = Logger(service="user-credits")
metrics = Metrics(namespace="UserCredits", service="user-credits")


def count(name: str, value: int = 1) -> None:
    """Add to a count metric; flushed as EMF when the handler returns."""
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
