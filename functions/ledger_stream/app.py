"""The Accounts table's stream (SPEC 2.8, 4): the ledger entries and the events of every change."""

from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import DynamoDBRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from user_credits.config import load_settings
from user_credits.logic.stream import StreamBatch
from user_credits.observability import logger, metrics
from user_credits.store.models import bind_tables

processor = BatchProcessor(event_type=EventType.DynamoDBStreams)


@logger.inject_lambda_context
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    bind_tables(load_settings())
    batch = StreamBatch.of(event.get("Records") or [])

    def record_handler(record: DynamoDBRecord) -> None:
        batch.apply(record.raw_event["dynamodb"])

    # A failed record is reported by its sequence number; Lambda delivers it (and what follows) again.
    response = process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                        context=context)
    batch.finish()
    return response
