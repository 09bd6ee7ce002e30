"""Scheduled expiry sweep (SPEC 2.6): expire due groups, warn soon-due ones, report what it did."""

from typing import Any

from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext

from user_credits.config import load_settings
from user_credits.domain.clock import utc_now
from user_credits.logic.expiry import Deadline, run_sweep
from user_credits.observability import logger, metrics
from user_credits.store.models import bind_tables


@logger.inject_lambda_context
@metrics.log_metrics
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: LambdaContext) -> dict[str, Any]:
    settings = load_settings()
    bind_tables(settings)
    logger.append_keys(schedule_event_id=event.get_id)
    summary = run_sweep(utc_now(), Deadline(context.get_remaining_time_in_millis), settings.warn_before_expiry_seconds)
    return summary.to_json()
