"""A local stand-in for Lambda's DynamoDB-stream event source mapping (tests and the dev server).

`StreamPump(endpoint, table).drain(handler)` reads the table's stream and calls `handler(event, context)`
with batches shaped as Lambda sends them, the way the mapping does it:

- the stream is the table's `LatestStreamArn` when the pump first needs it (a mapping is bound to one
  stream ARN); every shard of it (`DescribeStream`, paged by `ExclusiveStartShardId`, listed again
  after a shard closes, which is when children appear), a parent shard before its children, each shard
  in sequence-number order, one shard per batch;
- a position per shard, kept across calls: the last delivered `SequenceNumber` (`TRIM_HORIZON` for a
  shard never seen; `skip_to_now` puts every shard at its latest record);
- `ReportBatchItemFailures`: the records before the first failed one (lowest sequence number) count as
  delivered, and the batch is delivered again from the failed record; an item identifier that is not in
  the batch, or a handler that raises, fails the whole batch; `None`, `{}` and `{"batchItemFailures": []}`
  are successes. After `max_redeliveries` redeliveries of one record that all failed, `drain` raises
  `RuntimeError` (the position stays on that record; the next `drain` tries it again);
- `drain` returns when a pass over every shard finds nothing new (so records written by the handler are
  delivered too) and returns how many records it passed to the handler, redeliveries included.

Engines (moto 5.2 and DynamoDB Local 2.x / 1.25 both serve streams; what each does differently):

- Iterators are opened afresh at every `drain` (DynamoDB Local expires an iterator after 15 minutes,
  moto's iterators hold the shard object a rollback replaces): `AT_SEQUENCE_NUMBER` of the position,
  and the first record returned must be the one delivered last (same sequence number and `eventID`);
  it is skipped, the rest is new. That is `AFTER_SEQUENCE_NUMBER` (both engines support it) plus a check:
  moto rolls a cancelled `TransactWriteItems` back by restoring a copy of the table taken before it,
  stream included, and the following writes reuse the sequence numbers; a pump that read the rolled-back
  records meanwhile would otherwise skip as many real ones. On a mismatch the pump goes back to the
  newest record it delivered that the stream still holds (or to `TRIM_HORIZON`) and logs a warning.
- DynamoDB Local closes a shard after 4 hours and opens a child (`ParentShardId`), expires records after
  24 hours (`TrimmedDataAccessException`: the pump goes on from `TRIM_HORIZON`, with a warning) and
  shards too (`ResourceNotFoundException`: the shard is done). moto has one shard that never closes.
- Records are normalised to what Lambda sends: `eventVersion` "1.1" (moto says "1.0"), `awsRegion` the
  client's region (DynamoDB Local says "ddblocal"), `ApproximateCreationDateTime` as epoch seconds (a
  float; DynamoDB Local rounds it down to the minute), binary values base64 text as in Lambda's JSON,
  and `eventSourceARN` the stream ARN. Everything else is the engine's own (moto emits a record for a
  write that changes nothing, and two `INSERT`s for an `UpdateItem` that creates its item; DynamoDB
  Local, like DynamoDB, emits none for the former and one for the latter).
"""

from __future__ import annotations

import base64
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import boto3
from botocore.exceptions import ClientError

Handler = Callable[[dict[str, Any], Any], Any]
"""A Lambda handler: `(event, lambda_context) -> response`."""

logger = logging.getLogger(__name__)

PAGE_LIMIT = 999
"""Records asked of one GetRecords (1000 is the most; the opening read asks one more, the check)."""

RECENT = 1000
"""Delivered (sequence number, eventID) pairs kept per shard to find the way back after a rewrite."""

_DYNAMODB_KEYS = (
    "ApproximateCreationDateTime", "Keys", "NewImage", "OldImage", "SequenceNumber", "SizeBytes",
    "StreamViewType",
)


@dataclass(frozen=True)
class StreamContext:
    """The default Lambda context of a stream invocation (a fresh `aws_request_id` each call)."""

    function_name: str = "stream"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:stream"
    function_version: str = "$LATEST"
    log_group_name: str = "/aws/lambda/stream"
    log_stream_name: str = "local"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


@dataclass
class _Shard:
    shard_id: str
    position: str | None = None  # SequenceNumber of the last record delivered (or skipped)
    event_id: str | None = None  # its eventID, checked when the shard is opened again
    recent: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=RECENT))
    done: bool = False  # closed (or gone) and delivered to its end
    iterator: str | None = None  # points just after `position`; valid within one drain
    exhausted: bool = False  # the last read had no NextShardIterator: closed and read to its end
    failing: tuple[str, int] | None = None  # (SequenceNumber, consecutive failed deliveries) this drain
    clean_after: int | None = None  # read to "nothing new" after this many handler calls (this drain)

    def reset_reader(self) -> None:
        self.iterator = None
        self.exhausted = False
        self.clean_after = None

    def advance(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.recent.append((record["dynamodb"]["SequenceNumber"], record["eventID"]))
        if records:
            self.position = records[-1]["dynamodb"]["SequenceNumber"]
            self.event_id = records[-1]["eventID"]


def _code(error: ClientError) -> str:
    code: str = error.response.get("Error", {}).get("Code", "")
    return code


def _sequence(record: dict[str, Any]) -> int:
    return int(record["dynamodb"]["SequenceNumber"])


def _jsonable(value: Any) -> Any:
    """Binary attribute values as Lambda's JSON has them (base64 text); boto3 hands bytes."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


class StreamPump:
    """Delivers a table's stream records to a handler the way Lambda's event source mapping does."""

    def __init__(
        self,
        endpoint: str,
        table_name: str,
        *,
        batch_size: int = 100,
        context_factory: Callable[[], Any] | None = None,
        max_redeliveries: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_redeliveries < 0:
            raise ValueError("max_redeliveries must not be negative")
        self.endpoint = endpoint
        self.table_name = table_name
        self.batch_size = batch_size
        self.max_redeliveries = max_redeliveries
        self._context_factory: Callable[[], Any] = context_factory or StreamContext
        self._dynamodb: Any = boto3.client("dynamodb", endpoint_url=endpoint)
        self._streams: Any = boto3.client("dynamodbstreams", endpoint_url=endpoint)
        self._region: str = self._streams.meta.region_name
        self._stream_arn: str | None = None
        self._shards: dict[str, _Shard] = {}
        self._listing: list[dict[str, Any]] | None = None  # DescribeStream's shards; new ones only follow a close
        self._calls = 0  # handler calls of the running drain
        self._lock = threading.Lock()
        self._owner: int | None = None

    # -- public -------------------------------------------------------------------------------------

    def skip_to_now(self) -> None:
        """Put every shard at its latest record: what is already in the stream is never delivered."""
        with self._locked("skip_to_now") as entered:
            if not entered:
                raise RuntimeError("skip_to_now called from inside a stream handler")
            self._listing = self._list_shards()
            for listed in self._listing:
                shard = self._shard(listed["ShardId"])
                shard.reset_reader()
                while not shard.done:
                    records, closed = self._read_page(shard, PAGE_LIMIT)
                    shard.advance(records)
                    if closed:
                        shard.done = True
                    elif not records:
                        break
                shard.reset_reader()

    def drain(self, handler: Handler) -> int:
        """Deliver everything new, in order, until nothing is left; the number of records delivered
        (redeliveries included). A call from inside the handler returns 0 at once: the running drain
        delivers what the handler wrote when it returns."""
        with self._locked("drain") as entered:
            if not entered:
                return 0
            for shard in self._shards.values():
                shard.reset_reader()
                shard.failing = None
            self._calls = delivered = 0
            while True:
                if self._listing is None:
                    self._listing = self._list_shards()
                listed = self._listing
                present = {item["ShardId"] for item in listed}
                progressed = False
                for item in sorted(listed, key=lambda s: int(s["SequenceNumberRange"]["StartingSequenceNumber"])):
                    shard = self._shard(item["ShardId"])
                    parent = item.get("ParentShardId")
                    if shard.done or (parent is not None and parent in present and not self._shard(parent).done):
                        continue
                    if shard.clean_after == self._calls:
                        continue  # nothing new since the last handler call
                    count, closed = self._drain_shard(shard, handler)
                    shard.clean_after = self._calls
                    delivered += count
                    if closed:
                        shard.done = True
                        self._listing = None  # a closed shard may have children: list the shards again
                    progressed = progressed or count > 0 or closed
                if not progressed:
                    return delivered

    # -- the stream ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self, what: str) -> Iterator[bool]:
        if self._owner == threading.get_ident():
            logger.debug("%s of %s re-entered from its own handler", what, self.table_name)
            yield False
            return
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield True
            finally:
                self._owner = None

    def _shard(self, shard_id: str) -> _Shard:
        shard = self._shards.get(shard_id)
        if shard is None:
            shard = self._shards[shard_id] = _Shard(shard_id)
        return shard

    def stream_arn(self) -> str:
        """The stream the pump reads: the table's `LatestStreamArn` when first asked."""
        if self._stream_arn is None:
            table = self._dynamodb.describe_table(TableName=self.table_name)["Table"]
            arn = table.get("LatestStreamArn")
            if not arn or not table.get("StreamSpecification", {}).get("StreamEnabled", False):
                raise RuntimeError(f"table {self.table_name} has no stream enabled")
            self._stream_arn = str(arn)
        return self._stream_arn

    def _list_shards(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamArn": self.stream_arn()}
        while True:
            description = self._streams.describe_stream(**kwargs)["StreamDescription"]
            shards.extend(description.get("Shards", []))
            last = description.get("LastEvaluatedShardId")
            if not last:
                return shards
            kwargs["ExclusiveStartShardId"] = last

    def _iterator(self, shard: _Shard, kind: str, sequence: str | None = None) -> str:
        kwargs: dict[str, Any] = {"StreamArn": self.stream_arn(), "ShardId": shard.shard_id, "ShardIteratorType": kind}
        if sequence is not None:
            kwargs["SequenceNumber"] = sequence
        iterator: str = self._streams.get_shard_iterator(**kwargs)["ShardIterator"]
        return iterator

    def _read_page(self, shard: _Shard, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` records after the shard's position, and whether the shard is closed and read
        to its end (no NextShardIterator)."""
        for _ in range(5):
            if shard.exhausted:
                return [], True
            try:
                if shard.iterator is None:
                    return self._open(shard, limit)
                page = self._streams.get_records(ShardIterator=shard.iterator, Limit=limit)
            except ClientError as error:
                if shard.iterator is not None and _code(error) in ("ExpiredIteratorException",
                                                                   "TrimmedDataAccessException"):
                    shard.reset_reader()  # open again from the position
                    continue
                if _code(error) == "ResourceNotFoundException":
                    logger.warning("shard %s of %s is gone; counted as done", shard.shard_id, self.table_name)
                    shard.reset_reader()
                    return [], True
                raise
            records: list[dict[str, Any]] = page.get("Records", [])
            shard.iterator = page.get("NextShardIterator")
            shard.exhausted = shard.iterator is None
            return records, shard.exhausted
        raise RuntimeError(f"could not read shard {shard.shard_id} of {self.table_name}")

    def _open(self, shard: _Shard, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Open the shard after its position (checking that the stream still holds the record there)
        and read the first page."""
        for _ in range(3):
            if shard.position is None:
                page = self._streams.get_records(ShardIterator=self._iterator(shard, "TRIM_HORIZON"), Limit=limit)
                records: list[dict[str, Any]] = page.get("Records", [])
            else:
                try:
                    iterator = self._iterator(shard, "AT_SEQUENCE_NUMBER", shard.position)
                    page = self._streams.get_records(ShardIterator=iterator, Limit=limit + 1)
                except ClientError as error:
                    if _code(error) != "TrimmedDataAccessException":
                        raise
                    logger.warning(
                        "stream of %s trimmed past record %s of shard %s: going on from TRIM_HORIZON (records lost)",
                        self.table_name, shard.position, shard.shard_id,
                    )
                    shard.position = shard.event_id = None
                    shard.recent.clear()
                    continue
                records = page.get("Records", [])
                first = records[0] if records else None
                if first is None or _sequence(first) != int(shard.position) or first["eventID"] != shard.event_id:
                    self._rewind(shard)
                    continue
                records = records[1:]
            shard.iterator = page.get("NextShardIterator")
            shard.exhausted = shard.iterator is None
            return records, shard.exhausted
        raise RuntimeError(f"the stream of {self.table_name} keeps changing under shard {shard.shard_id}")

    def _rewind(self, shard: _Shard) -> None:
        """The stream no longer holds the record last delivered (moto's rollback of a cancelled
        transaction restores the stream as it was before it): go back to the newest delivered record
        it still holds, or to TRIM_HORIZON."""
        held: dict[int, str] = {}
        if shard.recent:
            try:
                iterator: str | None = self._iterator(shard, "AT_SEQUENCE_NUMBER", shard.recent[0][0])
                while iterator is not None and len(held) <= len(shard.recent):
                    page = self._streams.get_records(ShardIterator=iterator, Limit=1000)
                    for record in page.get("Records", []):
                        held[_sequence(record)] = record["eventID"]
                    if not page.get("Records"):
                        break
                    iterator = page.get("NextShardIterator")
            except ClientError as error:
                logger.debug("rewind of shard %s could not read back: %s", shard.shard_id, error)
        lost = 0
        while shard.recent and held.get(int(shard.recent[-1][0])) != shard.recent[-1][1]:
            shard.recent.pop()
            lost += 1
        if shard.recent:
            shard.position, shard.event_id = shard.recent[-1]
        else:
            shard.position = shard.event_id = None
        logger.warning(
            "the stream of %s no longer holds %d record(s) delivered from shard %s (rewritten history, "
            "as moto's transaction rollback does); going on after %s",
            self.table_name, lost, shard.shard_id, shard.position or "TRIM_HORIZON",
        )

    # -- delivery -----------------------------------------------------------------------------------

    def _drain_shard(self, shard: _Shard, handler: Handler) -> tuple[int, bool]:
        delivered = 0
        while True:
            batch, closed = self._read_batch(shard)
            if not batch:
                return delivered, closed
            delivered += len(batch)
            self._deliver(shard, batch, handler)

    def _read_batch(self, shard: _Shard) -> tuple[list[dict[str, Any]], bool]:
        batch: list[dict[str, Any]] = []
        closed = False
        while len(batch) < self.batch_size:
            wanted = min(PAGE_LIMIT, self.batch_size - len(batch))
            records, closed = self._read_page(shard, wanted)
            batch.extend(records)
            if closed or len(records) < wanted:
                break
        return batch, closed

    def _deliver(self, shard: _Shard, batch: list[dict[str, Any]], handler: Handler) -> None:
        event = {"Records": [self._lambda_record(record) for record in batch]}
        error: BaseException | None = None
        failed: int | None
        self._calls += 1
        try:
            response = handler(event, self._context_factory())
        except Exception as raised:
            error, failed = raised, 0
        else:
            failed = self._first_failure(response, batch)
        if failed is None:
            shard.advance(batch)
            shard.failing = None
            return
        shard.advance(batch[:failed])
        shard.reset_reader()  # read again from the failed record
        head = batch[failed]
        sequence = head["dynamodb"]["SequenceNumber"]
        count = shard.failing[1] + 1 if shard.failing and shard.failing[0] == sequence else 1
        shard.failing = (sequence, count)
        if count > self.max_redeliveries:
            how = f"raised {error!r}" if error is not None else "reported it in batchItemFailures"
            raise RuntimeError(
                f"stream record {sequence} ({head['eventName']} {head['dynamodb'].get('Keys')}) of table "
                f"{self.table_name}, shard {shard.shard_id}: delivered {count} times, failed every time "
                f"(max_redeliveries={self.max_redeliveries}); the handler last {how}"
            ) from error
        logger.debug("redelivering shard %s of %s from record %s (failure %d)", shard.shard_id,
                     self.table_name, sequence, count)

    @staticmethod
    def _first_failure(response: Any, batch: list[dict[str, Any]]) -> int | None:
        """The index the batch failed from (None: success), as Lambda reads ReportBatchItemFailures."""
        if not isinstance(response, dict):
            return None
        failures = response.get("batchItemFailures")
        if not failures:
            return None
        if not isinstance(failures, list):
            return 0
        index = {record["dynamodb"]["SequenceNumber"]: number for number, record in enumerate(batch)}
        found: list[int] = []
        for failure in failures:
            identifier = failure.get("itemIdentifier") if isinstance(failure, dict) else None
            if not isinstance(identifier, str) or identifier not in index:
                return 0  # Lambda fails the whole batch on an identifier it cannot place
            found.append(index[identifier])
        return min(found)

    def _lambda_record(self, record: dict[str, Any]) -> dict[str, Any]:
        stream = record["dynamodb"]
        dynamodb: dict[str, Any] = {}
        for key in (*_DYNAMODB_KEYS, *sorted(set(stream) - set(_DYNAMODB_KEYS))):
            if key not in stream:
                continue
            value = stream[key]
            if key == "ApproximateCreationDateTime":
                value = value.timestamp() if isinstance(value, datetime) else float(value)
            dynamodb[key] = _jsonable(value)
        shaped: dict[str, Any] = {
            "eventID": record["eventID"],
            "eventName": record["eventName"],
            "eventVersion": "1.1",
            "eventSource": "aws:dynamodb",
            "awsRegion": self._region,
            "dynamodb": dynamodb,
            "eventSourceARN": self.stream_arn(),
        }
        if "userIdentity" in record:  # a TTL deletion: {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
            shaped["userIdentity"] = dict(record["userIdentity"])
        return shaped
