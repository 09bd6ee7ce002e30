"""Logger and metrics shared by every function (Powertools)."""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics, single_metric
from aws_lambda_powertools.metrics import MetricUnit

SERVICE = "user-credits"
NAMESPACE = "UserCredits"
logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)


def count(name: str, value: int = 1) -> None:
    """Add to a count metric; flushed as EMF when the handler returns."""
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def count_server_error() -> None:
    """One 5xx answer, per function: the handlers turn every failure into a response, so Lambda's
    `Errors` never sees them and an alarm on it would never fire (template.yaml alarms on this)."""
    function = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "local")
    with single_metric(name="ServerErrors", unit=MetricUnit.Count, value=1, namespace=NAMESPACE,
                       default_dimensions={"service": SERVICE, "FunctionName": function}):
        pass
