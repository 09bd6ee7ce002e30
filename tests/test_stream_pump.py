"""StreamPump: Lambda's DynamoDB-stream event source mapping, on moto and on DynamoDB Local."""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from user_credits_dev.streams import StreamPump


@dataclass
class Table:
    name: str
    endpoint: str
    engine: str
    client: Any

    def put(self, pk: str, **attrs: Any) -> None:
        item = {"pk": {"S": pk}, **{k: v if isinstance(v, dict) else {"N": str(v)} for k, v in attrs.items()}}
        self.client.put_item(TableName=self.name, Item=item)

    def put_many(self, count: int, prefix: str = "item") -> list[str]:
        keys = [f"{prefix}-{n:03d}" for n in range(count)]
        for key in keys:
            self.put(key, v=1)
        return keys

    def stream_arn(self) -> str:
        arn: str = self.client.describe_table(TableName=self.name)["Table"]["LatestStreamArn"]
        return arn

    def pump(self, **kwargs: Any) -> StreamPump:
        return StreamPump(self.endpoint, self.name, **kwargs)


@pytest.fixture(params=["moto", "ddblocal"])
def table(request: pytest.FixtureRequest) -> Iterator[Table]:
    backend = request.getfixturevalue(f"{request.param}_backend")
    client = boto3.client("dynamodb", endpoint_url=backend.endpoint)
    name = f"stream-pump-{uuid.uuid4().hex[:12]}"
    client.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    yield Table(name, backend.endpoint, request.param, client)
    client.delete_table(TableName=name)


@dataclass
class Recorder:
    """A stream handler that keeps every event; `respond(event, call_number)` decides the answer."""

    respond: Callable[[dict[str, Any], int], Any] = lambda event, call: None
    events: list[dict[str, Any]] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.events.append(copy.deepcopy(event))
        self.contexts.append(context)
        return self.respond(event, len(self.events))

    @property
    def batches(self) -> list[list[str]]:
        """The pk of each record, batch by batch."""
        return [[r["dynamodb"]["Keys"]["pk"]["S"] for r in event["Records"]] for event in self.events]

    @property
    def keys(self) -> list[str]:
        return [key for batch in self.batches for key in batch]


def sequence(record: dict[str, Any]) -> str:
    value: str = record["dynamodb"]["SequenceNumber"]
    return value


def test_records_arrive_in_write_order_in_lambdas_shape(table: Table) -> None:
    table.put("a", v=1)
    table.client.update_item(TableName=table.name, Key={"pk": {"S": "a"}}, UpdateExpression="SET v = :v",
                             ExpressionAttributeValues={":v": {"N": "2"}})
    table.client.delete_item(TableName=table.name, Key={"pk": {"S": "a"}})
    table.put("b", blob={"B": b"\x00\x01\xff"})
    handler = Recorder()

    assert table.pump().drain(handler) == 4

    records = [record for event in handler.events for record in event["Records"]]
    assert [r["eventName"] for r in records] == ["INSERT", "MODIFY", "REMOVE", "INSERT"]
    assert [int(sequence(r)) for r in records] == sorted(int(sequence(r)) for r in records)
    assert len({sequence(r) for r in records}) == 4
    insert, modify, remove, binary = records
    assert insert["dynamodb"]["NewImage"] == {"pk": {"S": "a"}, "v": {"N": "1"}}
    assert "OldImage" not in insert["dynamodb"]
    assert modify["dynamodb"]["OldImage"] == {"pk": {"S": "a"}, "v": {"N": "1"}}
    assert modify["dynamodb"]["NewImage"] == {"pk": {"S": "a"}, "v": {"N": "2"}}
    assert remove["dynamodb"]["OldImage"] == {"pk": {"S": "a"}, "v": {"N": "2"}}
    assert "NewImage" not in remove["dynamodb"]
    assert binary["dynamodb"]["NewImage"]["blob"] == {"B": "AAH/"}  # base64, as in Lambda's JSON
    arn = table.stream_arn()
    now = time.time()
    for record in records:
        assert set(record) == {"eventID", "eventName", "eventVersion", "eventSource", "awsRegion", "dynamodb",
                               "eventSourceARN"}
        assert record["eventVersion"] == "1.1"
        assert record["eventSource"] == "aws:dynamodb"
        assert record["awsRegion"] == "us-east-1"
        assert record["eventSourceARN"] == arn
        stream = record["dynamodb"]
        assert stream["Keys"] == {"pk": {"S": stream["Keys"]["pk"]["S"]}}
        assert stream["StreamViewType"] == "NEW_AND_OLD_IMAGES"
        assert isinstance(stream["SizeBytes"], int) and stream["SizeBytes"] > 0
        created = stream["ApproximateCreationDateTime"]
        assert isinstance(created, float)
        assert now - 120 < created <= now + 1  # DynamoDB Local rounds down to the minute
    json.dumps(handler.events)  # what Lambda sends is JSON
    for context in handler.contexts:
        assert context.function_name == "stream"
        assert context.get_remaining_time_in_millis() == 60_000
        assert context.memory_limit_in_mb == 256
        assert context.invoked_function_arn == "arn:aws:lambda:us-east-1:123456789012:function:stream"
    assert len({context.aws_request_id for context in handler.contexts}) == len(handler.contexts)


def test_batches_never_exceed_batch_size(table: Table) -> None:
    keys = table.put_many(10)
    handler = Recorder()

    assert table.pump(batch_size=3).drain(handler) == 10

    assert handler.keys == keys
    assert max(len(batch) for batch in handler.batches) == 3


def test_a_second_drain_delivers_only_what_is_new(table: Table) -> None:
    first = table.put_many(3, "first")
    pump = table.pump()
    handler = Recorder()
    assert pump.drain(handler) == 3
    assert pump.drain(handler) == 0
    assert len(handler.events) == 1

    second = table.put_many(2, "second")
    assert pump.drain(handler) == 2

    assert handler.batches == [first, second]


def test_skip_to_now_skips_what_is_already_there(table: Table) -> None:
    old = table.put_many(3, "old")
    pump = table.pump()
    pump.skip_to_now()
    new = table.put_many(2, "new")
    handler = Recorder()

    assert pump.drain(handler) == 2
    assert handler.keys == new

    from_the_start = Recorder()
    assert table.pump().drain(from_the_start) == 5
    assert from_the_start.keys == old + new


def test_a_reported_item_failure_redelivers_from_that_record(table: Table) -> None:
    keys = table.put_many(5)

    def fail_third_once(event: dict[str, Any], call: int) -> Any:
        if call == 1:
            return {"batchItemFailures": [{"itemIdentifier": sequence(event["Records"][2])}]}
        return {"batchItemFailures": []}

    handler = Recorder(fail_third_once)
    assert table.pump().drain(handler) == 5 + 3

    assert handler.batches == [keys, keys[2:]]
    assert Counter(handler.keys) == {**dict.fromkeys(keys[:2], 1), **dict.fromkeys(keys[2:], 2)}


@pytest.mark.parametrize("answer", ["lowest of several", "unknown", "empty", "malformed"])
def test_how_batch_item_failures_are_read(table: Table, answer: str) -> None:
    keys = table.put_many(5)

    def respond(event: dict[str, Any], call: int) -> Any:
        if call > 1:
            return None
        records = event["Records"]
        failures = {
            "lowest of several": [{"itemIdentifier": sequence(records[3])}, {"itemIdentifier": sequence(records[1])}],
            "unknown": [{"itemIdentifier": "99999999999999999999999"}],
            "empty": [{"itemIdentifier": ""}],
            "malformed": [{"id": sequence(records[3])}],
        }[answer]
        return {"batchItemFailures": failures}

    handler = Recorder(respond)
    table.pump().drain(handler)

    redelivered_from = 1 if answer == "lowest of several" else 0  # Lambda fails the whole batch otherwise
    assert handler.batches == [keys, keys[redelivered_from:]]


def test_a_handler_raising_once_gets_the_whole_batch_again(table: Table) -> None:
    keys = table.put_many(4)

    def crash_once(event: dict[str, Any], call: int) -> Any:
        if call == 1:
            raise RuntimeError("the function crashed")
        return None

    handler = Recorder(crash_once)
    assert table.pump().drain(handler) == 8

    assert handler.batches == [keys, keys]
    assert handler.events[0] == handler.events[1]


def test_a_handler_failing_forever_makes_drain_raise_after_the_cap(table: Table) -> None:
    keys = table.put_many(3)

    def crash(event: dict[str, Any], call: int) -> Any:
        raise ValueError(f"broken {call}")

    handler = Recorder(crash)
    pump = table.pump(max_redeliveries=3)
    with pytest.raises(RuntimeError, match="max_redeliveries=3") as raised:
        pump.drain(handler)

    assert handler.batches == [keys] * 4  # the first delivery and 3 redeliveries
    assert isinstance(raised.value.__cause__, ValueError)
    assert str(raised.value.__cause__) == "broken 4"


def test_an_item_failure_forever_raises_and_keeps_what_went_before(table: Table) -> None:
    keys = table.put_many(3)

    def fail_second(event: dict[str, Any], call: int) -> Any:
        records = event["Records"]
        failing = next(r for r in records if r["dynamodb"]["Keys"]["pk"]["S"] == keys[1])
        return {"batchItemFailures": [{"itemIdentifier": sequence(failing)}]}

    handler = Recorder(fail_second)
    pump = table.pump(max_redeliveries=2)
    with pytest.raises(RuntimeError, match=keys[1]):
        pump.drain(handler)
    assert handler.batches == [keys, keys[1:], keys[1:]]

    # The position stays on the failing record: the next drain starts there, never before it.
    fixed = Recorder()
    assert pump.drain(fixed) == 2
    assert fixed.keys == keys[1:]


def test_concurrent_drains_deliver_each_record_exactly_once(table: Table) -> None:
    pump = table.pump(batch_size=4)
    seen: list[str] = []

    def slow(event: dict[str, Any], call: int) -> Any:
        time.sleep(0.002)  # widen the window two unguarded drains would share
        seen.extend(sequence(r) for r in event["Records"])
        return None

    handler = Recorder(slow)
    threads_count, writes = 6, 5
    barrier = threading.Barrier(threads_count)
    delivered: list[int] = []
    errors: list[BaseException] = []

    def request(worker: int) -> None:
        try:
            barrier.wait()
            for number in range(writes):
                table.put(f"w{worker}-{number}", v=number)
                delivered.append(pump.drain(handler))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=request, args=(worker,)) for worker in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    assert len(seen) == threads_count * writes
    assert Counter(seen).most_common(1)[0][1] == 1
    assert sum(delivered) == threads_count * writes
    assert sorted(handler.keys) == sorted(f"w{w}-{n}" for w in range(threads_count) for n in range(writes))


def test_a_drain_from_inside_the_handler_returns_at_once(table: Table) -> None:
    table.put_many(2, "first")
    pump = table.pump()
    inner: list[int] = []

    def nested(event: dict[str, Any], call: int) -> Any:
        if call == 1:
            table.put("written-by-the-handler", v=1)
            inner.append(pump.drain(Recorder()))
        return None

    handler = Recorder(nested)
    assert pump.drain(handler) == 3
    assert inner == [0]
    assert handler.batches == [["first-000", "first-001"], ["written-by-the-handler"]]


def test_moto_rolled_back_stream_history_is_followed(moto_backend: Any) -> None:
    """moto cancels a transaction by restoring a copy of the table (stream included) taken before it;
    the next writes reuse the sequence numbers of the records rolled back."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dynamodb.models import dynamodb_backends

    client = boto3.client("dynamodb", endpoint_url=moto_backend.endpoint)
    name = f"stream-pump-{uuid.uuid4().hex[:12]}"
    client.create_table(
        TableName=name, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    table = Table(name, moto_backend.endpoint, "moto", client)
    backend = dynamodb_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
    table.put_many(2, "kept")
    pump = table.pump()
    handler = Recorder()
    assert pump.drain(handler) == 2

    before = copy.deepcopy(backend.tables[name])  # what transact_write_items keeps for its rollback
    table.put_many(2, "rolled-back")
    assert pump.drain(handler) == 2  # a drain that ran while the transaction was under way
    backend.tables[name] = before  # the transaction is cancelled
    table.put_many(3, "after")

    assert pump.drain(handler) == 3
    assert handler.batches[-1] == ["after-000", "after-001", "after-002"]
    assert sequence(handler.events[-1]["Records"][0]) == sequence(handler.events[1]["Records"][0])
    client.delete_table(TableName=name)


# -- shard lineage, closed shards and expired iterators, on a scripted stream ------------------------


def _record(seq: int, key: str) -> dict[str, Any]:
    return {
        "eventID": f"event-{seq}", "eventName": "INSERT", "eventVersion": "1.1", "eventSource": "aws:dynamodb",
        "awsRegion": "ddblocal",
        "dynamodb": {"ApproximateCreationDateTime": datetime(2025, 1, 1, tzinfo=UTC), "Keys": {"pk": {"S": key}},
                     "NewImage": {"pk": {"S": key}}, "SequenceNumber": f"{seq:021d}", "SizeBytes": 9,
                     "StreamViewType": "NEW_AND_OLD_IMAGES"},
    }


class ScriptedStreams:
    """A dynamodbstreams client with shards that close and have children, one shard per DescribeStream
    page, and iterators that expire once (as DynamoDB Local's do after 15 minutes)."""

    def __init__(self) -> None:
        # shard -> (parent, start, records, closed); the child starts "lower" than its parent so that
        # only the ParentShardId rule, not the order of the listing, puts the parent first.
        self.shards: dict[str, tuple[str | None, int, list[dict[str, Any]], bool]] = {
            "shard-child": ("shard-parent", 10, [_record(10, "c1"), _record(11, "c2")], False),
            "shard-parent": (None, 100, [_record(100, "p1"), _record(101, "p2"), _record(102, "p3")], True),
            "shard-orphan": ("shard-trimmed", 500, [_record(500, "o1")], False),
        }
        self.expire_next = True

    def describe_stream(self, StreamArn: str, ExclusiveStartShardId: str | None = None) -> dict[str, Any]:
        ids = list(self.shards)
        at = 0 if ExclusiveStartShardId is None else ids.index(ExclusiveStartShardId) + 1
        shard_id = ids[at]
        parent, start, records, closed = self.shards[shard_id]
        numbers = {"StartingSequenceNumber": f"{start:021d}"}
        shard: dict[str, Any] = {"ShardId": shard_id, "SequenceNumberRange": numbers}
        if closed:
            shard["SequenceNumberRange"]["EndingSequenceNumber"] = sequence(records[-1])
        if parent:
            shard["ParentShardId"] = parent
        description: dict[str, Any] = {"StreamArn": StreamArn, "Shards": [shard]}
        if at + 1 < len(ids):
            description["LastEvaluatedShardId"] = shard_id
        return {"StreamDescription": description}

    def get_shard_iterator(self, StreamArn: str, ShardId: str, ShardIteratorType: str,
                           SequenceNumber: str | None = None) -> dict[str, Any]:
        records = self.shards[ShardId][2]
        seqs = [int(sequence(r)) for r in records]
        index = {
            "TRIM_HORIZON": lambda: 0,
            "AT_SEQUENCE_NUMBER": lambda: seqs.index(int(SequenceNumber or "0")),
            "AFTER_SEQUENCE_NUMBER": lambda: seqs.index(int(SequenceNumber or "0")) + 1,
        }[ShardIteratorType]()
        return {"ShardIterator": f"{ShardId}|{index}|fresh"}

    def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:
        shard_id, index_text, kind = ShardIterator.split("|")
        if kind == "next" and self.expire_next:
            self.expire_next = False
            raise ClientError({"Error": {"Code": "ExpiredIteratorException", "Message": "expired"}}, "GetRecords")
        _, _, records, closed = self.shards[shard_id]
        index = int(index_text)
        page = records[index:index + Limit]
        answer: dict[str, Any] = {"Records": copy.deepcopy(page)}
        end = index + len(page)
        if not (closed and end >= len(records)):
            answer["NextShardIterator"] = f"{shard_id}|{end}|next"
        return answer


def test_parent_shards_before_children_closed_shards_and_expired_iterators() -> None:
    pump = StreamPump("http://127.0.0.1:9", "scripted-table", batch_size=2)
    scripted = ScriptedStreams()
    pump._streams = scripted
    pump._stream_arn = "arn:aws:dynamodb:ddblocal:000000000000:table/scripted-table/stream/2025-01-01T00:00:00.000"
    handler = Recorder()

    assert pump.drain(handler) == 6

    assert handler.keys.index("p3") < handler.keys.index("c1")
    assert sorted(handler.keys) == ["c1", "c2", "o1", "p1", "p2", "p3"]
    assert handler.batches[:2] == [["p1", "p2"], ["p3"]]  # batches do not cross shards
    assert not scripted.expire_next  # an iterator expired on the way, and was opened again
    created = handler.events[0]["Records"][0]["dynamodb"]["ApproximateCreationDateTime"]
    assert created == datetime(2025, 1, 1, tzinfo=UTC).timestamp()

    scripted.shards["shard-child"][2].append(_record(12, "c3"))
    assert pump.drain(handler) == 1
    assert handler.keys[-1] == "c3"

    # The child closes (a rollover) and a grandchild appears: the pump reads the child to its end,
    # lists the shards again and goes on in the grandchild.
    parent, start, records, _ = scripted.shards["shard-child"]
    records.append(_record(13, "c4"))
    scripted.shards["shard-child"] = (parent, start, records, True)
    scripted.shards["shard-grandchild"] = ("shard-child", 1000, [_record(1000, "g1")], False)
    assert pump.drain(handler) == 2
    assert handler.keys[-2:] == ["c4", "g1"]
    assert pump.drain(handler) == 0
