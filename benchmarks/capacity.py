"""A capacity model of one consume, computed from the DynamoDB calls it made (request and stream).

`calls.py` records every DynamoDB call; while an `ImageObserver` is attached to its recorder, each
write call also gets the item(s) it touches read back before and after (consistent GetItem through the
unwrapped client method, so these reads are neither counted nor seen by the product). From those images
each call is priced the way AWS documents on-demand and provisioned writes:

- PutItem / UpdateItem: ceil(max(size before, size after) / 1 KB) write units, at least 1; DeleteItem:
  the size of the deleted item; a write whose condition failed: the size of the existing item, at least
  1 (DynamoDB charges failed conditional writes);
- in TransactWriteItems every item costs twice that (ConditionCheck priced like a write of its item);
- every global secondary index the write changes: 1 unit per index entry put or deleted (2 when an
  index key changes: the old entry goes, a new one comes), and with a KEYS_ONLY projection an update
  that changes no index key writes no entry. Whether a consume touches an index is argued from the item:
  the attributes its UpdateExpression writes, next to each index's key attributes, and the images.

Item size follows AWS's rules: attribute name bytes + value bytes (strings UTF-8, numbers ~1 byte per
2 significant digits + 1, binary its bytes, null/bool 1, lists/maps 3 + 1 per element + elements).
DynamoDB Local's own `ConsumedCapacity` (ReturnConsumedCapacity=INDEXES) is shown beside the model, with
its transactional figures divided by the calibrated factor (it charges 4 where AWS documents 2).

Per partition: one item lives in one partition, which takes at most 1,000 write units per second (AWS's
per-partition limit, whatever the billing mode). A consume writes to the user's partition of the Accounts
table (the balance item) and to the user's partition of the Ledger table (its entry); each has its own
1,000 WCU/s, so consumes/s on one balance = min over those partitions of 1,000 / (units it takes there).

Holds (`hold_model`, issue 12) are priced the same way: a hold, a settle (the balance item then carries the
hold's attributes, so it is larger), a keyed hold, a release, and the average pair over a whole cycle of
MAX_PENDING pairs from one rewrite of the group to the next (the last settle forces it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

PARTITION_WCU_PER_SECOND = 1000.0
WRITE_OPS = {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"}


# ---------------------------------------------------------------- item size (AWS's rules)


def _number_size(text: str) -> int:
    try:
        digits = "".join(str(d) for d in Decimal(text).as_tuple().digits)
    except ArithmeticError:
        digits = text.lstrip("-").replace(".", "")
    significant = digits.strip("0") or "0"
    return (len(significant) + 1) // 2 + 1


def value_size(value: dict[str, Any]) -> int:
    (kind, inner), = value.items()
    if kind == "S":
        return len(str(inner).encode("utf-8"))
    if kind == "N":
        return _number_size(str(inner))
    if kind == "B":
        return len(inner) if isinstance(inner, bytes | bytearray) else len(str(inner)) * 3 // 4
    if kind in ("NULL", "BOOL"):
        return 1
    if kind == "SS":
        return sum(len(s.encode("utf-8")) for s in inner)
    if kind == "NS":
        return sum(_number_size(n) for n in inner)
    if kind == "BS":
        return sum(len(b) for b in inner)
    if kind == "L":
        return 3 + sum(1 + value_size(v) for v in inner)
    if kind == "M":
        return 3 + sum(1 + len(k.encode("utf-8")) + value_size(v) for k, v in inner.items())
    raise ValueError(f"unknown attribute type {kind}")


def item_size(item: dict[str, Any] | None) -> int:
    """Bytes of an item in DynamoDB JSON, as AWS counts them for capacity (0 for no item)."""
    if not item:
        return 0
    return sum(len(name.encode("utf-8")) + value_size(value) for name, value in item.items())


def units(size: int, per: int = 1024) -> int:
    return max(1, math.ceil(size / per))


# ---------------------------------------------------------------- tables and their indexes


@dataclass(frozen=True)
class Index:
    name: str
    keys: tuple[str, ...]
    projection: str  # KEYS_ONLY, INCLUDE or ALL
    included: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableInfo:
    name: str
    keys: tuple[str, ...]
    indexes: tuple[Index, ...]


def describe(call: Any, client: Any, table: str) -> TableInfo:
    """`call(client, operation, params)` is botocore's unwrapped `_make_api_call`."""
    found = call(client, "DescribeTable", {"TableName": table})["Table"]
    indexes = []
    for gsi in found.get("GlobalSecondaryIndexes", []) + found.get("LocalSecondaryIndexes", []):
        projection = gsi.get("Projection", {})
        indexes.append(Index(gsi["IndexName"], tuple(k["AttributeName"] for k in gsi["KeySchema"]),
                             projection.get("ProjectionType", "ALL"), tuple(projection.get("NonKeyAttributes", []))))
    return TableInfo(table, tuple(k["AttributeName"] for k in found["KeySchema"]), tuple(indexes))


# ---------------------------------------------------------------- what a write call touched


@dataclass
class Touched:
    """One item a write call targets, with the item before and after the call."""

    action: str  # Put, Update, Delete, ConditionCheck
    table: str
    key: dict[str, Any]
    update_expression: str | None = None
    names: dict[str, str] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


def targets(operation: str, params: dict[str, Any], key_of: Any) -> list[Touched]:
    """The items a write request names. `key_of(table, item)` gives an item's key (for Put)."""
    found: list[Touched] = []

    def add(action: str, body: dict[str, Any]) -> None:
        table = body["TableName"]
        key = body["Key"] if "Key" in body else key_of(table, body["Item"])
        found.append(Touched(action, table, dict(key), body.get("UpdateExpression"),
                             dict(body.get("ExpressionAttributeNames") or {})))

    if operation == "PutItem":
        add("Put", params)
    elif operation == "UpdateItem":
        add("Update", params)
    elif operation == "DeleteItem":
        add("Delete", params)
    elif operation == "TransactWriteItems":
        for entry in params.get("TransactItems", []):
            (action, body), = entry.items()
            add(action, body)
    elif operation == "BatchWriteItem":
        for table, requests in params.get("RequestItems", {}).items():
            for request in requests:
                if "PutRequest" in request:
                    add("Put", {"TableName": table, "Item": request["PutRequest"]["Item"]})
                else:
                    add("Delete", {"TableName": table, "Key": request["DeleteRequest"]["Key"]})
    return found


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts]


def written_attributes(expression: str | None, names: dict[str, str]) -> set[str]:
    """The top-level attributes an UpdateExpression sets, adds, deletes or removes (names resolved)."""
    if not expression:
        return set()
    written: set[str] = set()
    clauses = re.split(r"\b(SET|REMOVE|ADD|DELETE)\b", expression, flags=re.IGNORECASE)
    for verb, body in zip(clauses[1::2], clauses[2::2], strict=True):
        for part in _split_top(body):
            target = part.split("=", 1)[0] if verb.upper() == "SET" else part.split()[0]
            path = re.split(r"[.\[]", target.strip(), maxsplit=1)[0]
            written.add(names.get(path, path))
    return written


# ---------------------------------------------------------------- pricing


@dataclass
class Priced:
    """One call's write units under the model."""

    operation: str
    table_units: float
    index_units: float
    per_table: dict[str, float]  # table -> units there (its indexes included)
    detail: list[dict[str, Any]]

    @property
    def total(self) -> float:
        return self.table_units + self.index_units


def _index_entry(index: Index, table: TableInfo, item: dict[str, Any] | None) -> dict[str, Any] | None:
    if not item or any(k not in item for k in index.keys):
        return None
    names = set(index.keys) | set(table.keys)
    if index.projection == "ALL":
        return dict(item)
    if index.projection == "INCLUDE":
        names |= set(index.included)
    return {k: v for k, v in item.items() if k in names}


def index_writes(index: Index, table: TableInfo, before: dict[str, Any] | None,
                 after: dict[str, Any] | None) -> tuple[int, str]:
    """(index entries written, why), per AWS's rules for global secondary indexes."""
    old, new = _index_entry(index, table, before), _index_entry(index, table, after)
    if old is None and new is None:
        return 0, "not in the index before or after"
    if old is None:
        return units(item_size(new)), "item enters the index"
    if new is None:
        return units(item_size(old)), "item leaves the index"
    if any(old[k] != new[k] for k in index.keys):
        return units(item_size(old)) + units(item_size(new)), "an index key changes (delete + put)"
    if old != new:
        return units(max(item_size(old), item_size(new))), "a projected attribute changes"
    return 0, "in the index, no index key or projected attribute changes"


def price(operation: str, touched: list[Touched], tables: dict[str, TableInfo], failed: str | None) -> Priced:
    factor = 2.0 if operation == "TransactWriteItems" else 1.0
    table_units = index_units = 0.0
    per_table: dict[str, float] = {}
    detail = []
    for item in touched:
        info = tables[item.table]
        before, after = item.before, item.after
        if failed or item.action == "ConditionCheck":
            base = units(item_size(before))  # the existing item's size, at least 1
        elif item.action == "Delete":
            base = units(item_size(before))
        else:
            base = units(max(item_size(before), item_size(after)))
        idx_total = 0
        idx_detail = []
        for index in info.indexes:
            count, why = (0, "write failed") if failed else index_writes(index, info, before, after)
            idx_total += count
            idx_detail.append({"index": index.name, "entries": count, "why": why, "keys": list(index.keys)})
        cost = base * factor + idx_total * factor
        table_units += base * factor
        index_units += idx_total * factor
        per_table[item.table] = per_table.get(item.table, 0.0) + cost
        written = written_attributes(item.update_expression, item.names) if item.action == "Update" else None
        detail.append({
            "action": item.action, "table": item.table, "key": item.key,
            "size_before": item_size(before), "size_after": item_size(after), "units": base * factor,
            "index_units": idx_total * factor, "indexes": idx_detail,
            "written_attributes": sorted(written) if written is not None else None,
        })
    return Priced(operation, table_units, index_units, per_table, detail)


class ImageObserver:
    """Attached to calls.CallRecorder: reads each written item before and after its write call."""

    def __init__(self) -> None:
        self.tables: dict[str, TableInfo] = {}

    def _info(self, call: Any, client: Any, table: str) -> TableInfo:
        if table not in self.tables:
            self.tables[table] = describe(call, client, table)
        return self.tables[table]

    def _read(self, call: Any, client: Any, touched: list[Touched]) -> list[dict[str, Any] | None]:
        return [call(client, "GetItem", {"TableName": t.table, "Key": t.key, "ConsistentRead": True}).get("Item")
                for t in touched]

    def before(self, call: Any, client: Any, operation: str, params: dict[str, Any]) -> list[Touched] | None:
        if operation not in WRITE_OPS:
            return None

        def key_of(table: str, item: dict[str, Any]) -> dict[str, Any]:
            return {k: item[k] for k in self._info(call, client, table).keys}

        touched = targets(operation, params, key_of)
        for item in touched:
            self._info(call, client, item.table)
        for item, image in zip(touched, self._read(call, client, touched), strict=True):
            item.before = image
        return touched

    def after(self, call: Any, client: Any, touched: list[Touched] | None) -> None:
        if touched is None:
            return
        for item, image in zip(touched, self._read(call, client, touched), strict=True):
            item.after = image


# ---------------------------------------------------------------- the model of a consume


OLD_DESIGN = (
    "Before the stream (the outbox design this replaces; benchmarks/README.md of issue 7 and the text of issue "
    "11): an unkeyed consume was the UpdateItem (1 unit) plus a flush TransactWriteItems of the ledger entry, "
    "its `byGroup` index entry and the balance item, each doubled (6): about 7 units by the benchmark's AWS "
    "estimate, 6 (8 when the group expires) as issue 11 counts them; the balance item alone took 1 + 2 = 3 units "
    "per consume, so one balance could take about 1,000 / 3 = 330 consumes/s on paper."
)


def _partition(logical: str, touched: Touched) -> str:
    if logical == "IdempotencyTable":
        return "IdempotencyTable: the key's own record (a partition per key)"
    (name, value), = list(touched.key.items())[:1]
    return f"{logical}: {name} partition" if name == "userId" else f"{logical}: {name}={next(iter(value.values()))}"


def model(service: Any, recorder: Any, stream: Any) -> dict[str, Any]:
    """Price each consume case from its recorded calls, the stream function's calls included."""
    from datetime import UTC, datetime, timedelta

    from benchmarks import calls as calls_module
    from benchmarks.common import function_ready, new_id

    user = new_id("capacity")
    logical = {name: key for key, name in service.tables.items()}
    group, expiring, big = new_id("cap"), new_id("capexp"), new_id("cap10")
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": 1000}, iam=True)
    service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": expiring, "tokens": 1000, "expiresAt": later},
                 iam=True)
    for number in range(10):
        service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": big, "tokens": 100 + number}, iam=True)
    calls_module.drain_attributed(stream, recorder)
    key = new_id("capkey")
    cases = [
        ("unkeyed", "unkeyed consume", group, None),
        ("unkeyed_expiring", "unkeyed consume, group with an expiry (its balance item is in `byDue`)", expiring, None),
        ("unkeyed_10_lots", "unkeyed consume, group of 10 lots", big, None),
        ("keyed", "keyed consume (Idempotency-Key, first)", group, key),
        ("replay", "keyed replay (after the stream completed the record)", group, key),
        ("keyed_lagging", f"keyed consume while the stream is {LAG} keyed consumes behind (their markers are still "
         "on the balance item); stream figures: per consume, over the drain of all of them", group, None),
    ]
    observer = ImageObserver()
    results: dict[str, Any] = {}
    try:
        for name, label, offer_group, case_key in cases:
            lagging = name == "keyed_lagging"
            if lagging:
                # Keyed consumes the stream has not caught up with yet (uncounted): each leaves its marker.
                for _ in range(LAG):
                    _consume(service, user, offer_group, new_id("lagkey"))
            recorder.take()
            recorder.observer = observer
            reply = _consume(service, user, offer_group, new_id("lagkey") if lagging else case_key)
            request_calls = recorder.take()
            drained, stream_calls = calls_module.drain_attributed(stream, recorder)
            recorder.observer = None
            results[name] = _price_case(label, reply.status, request_calls, stream_calls, observer, logical,
                                        stream_share=1.0 / (LAG + 1) if lagging else 1.0)
            results[name]["stream_records"] = drained.records
    finally:
        recorder.observer = None
    holds = hold_model(service, recorder, stream, user) if function_ready("holds") else None
    return {"cases": results, "old_design": OLD_DESIGN, "partition_limit": PARTITION_WCU_PER_SECOND,
            "tx_factor_local": calls_module._TX_FACTOR, "holds": holds}


def hold_model(service: Any, recorder: Any, stream: Any, user: str) -> dict[str, Any]:
    """Price a hold and a settle from their recorded calls (and the stream function's for them), with each
    written item read back before and after: the balance item carries the hold (`h_<id>` and its stamps)
    from the hold until a rewrite folds it into the book, so a settle writes a larger item than a consume.
    Then a whole cycle of MAX_PENDING pairs on one group, from a rewrite to the next (the last settle
    forces it: plain writes, no transaction since `store.balances.rewrite_group`): the average pair, and its
    largest balance item."""
    from benchmarks import calls as calls_module
    from benchmarks.common import new_id

    pending = calls_module.max_pending()
    logical = {name: key for key, name in service.tables.items()}
    single, cycle = new_id("caphold"), new_id("capcycle")
    for group in (single, cycle):
        service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": group, "tokens": 1000}, iam=True)
    calls_module.drain_attributed(stream, recorder)
    observer = ImageObserver()
    results: dict[str, Any] = {}

    def counted(send: Any) -> tuple[Any, list[Any], list[Any], int]:
        recorder.take()
        recorder.observer = observer
        try:
            reply = send()
            request_calls = recorder.take()
            drained, stream_calls = calls_module.drain_attributed(stream, recorder)
        finally:
            recorder.observer = None
        return reply, request_calls, stream_calls, drained.records

    def hold(group: str, tokens: int, key: str | None = None) -> Any:
        headers = {"Idempotency-Key": key} if key else None
        return service.call("POST", f"/users/{user}/holds", {"offerGroup": group, "tokens": tokens}, iam=True,
                            headers=headers)

    def settle(hold_id: str, tokens: int) -> Any:
        return service.call("POST", f"/users/{user}/holds/{hold_id}/settle", {"tokens": tokens}, iam=True)

    def release(hold_id: str) -> Any:
        return service.call("POST", f"/users/{user}/holds/{hold_id}/release", iam=True)

    reply, made, streamed, _ = counted(lambda: hold(single, 2))
    results["hold"] = _price_case("hold (unkeyed, the group's first)", reply.status, made, streamed, observer, logical)
    held = reply.body["holdId"]
    reply, made, streamed, _ = counted(lambda: settle(held, 1))
    results["settle"] = _price_case("settle of that hold (returns the rest)", reply.status, made, streamed, observer,
                                    logical)
    reply, made, streamed, _ = counted(lambda: hold(single, 2, new_id("holdkey")))
    results["keyed_hold"] = _price_case("hold with an Idempotency-Key (first)", reply.status, made, streamed,
                                        observer, logical)
    keyed_hold = reply.body["holdId"]
    reply, made, streamed, _ = counted(lambda: release(keyed_hold))
    results["release"] = _price_case("release of that hold", reply.status, made, streamed, observer, logical)
    # A whole cycle on a group nothing else rewrites: MAX_PENDING pairs, the last settle forcing the rewrite.
    all_made: list[Any] = []
    all_streamed: list[Any] = []
    statuses: set[int] = set()
    for number in range(pending):
        reply, made, streamed, _ = counted(lambda: hold(cycle, 2))
        statuses.add(reply.status)
        held = reply.body["holdId"]
        last_hold = (reply.status, made, streamed)
        all_made += made
        all_streamed += streamed
        reply, made, streamed, _ = counted(lambda held=held: settle(held, 1))
        statuses.add(reply.status)
        all_made += made
        all_streamed += streamed
        if number == pending - 1:
            results["fullest_hold"] = _price_case(
                f"the {pending}th hold since the group's last rewrite ({pending - 1} closed holds on the item)",
                last_hold[0], last_hold[1], last_hold[2], observer, logical)
            results["forced_rewrite"] = _price_case(
                f"its settle: {pending} holds waiting, the settle rewrites the group (forced rewrite)", reply.status,
                made, streamed, observer, logical)
    results["cycle_pair"] = _price_case(
        f"one pair (hold 2, settle 1), average over a cycle of {pending} pairs from one rewrite to the next "
        "(per second on paper: pairs/s)", "/".join(sorted(map(str, statuses))), all_made, all_streamed,
        observer, logical, stream_share=1.0 / pending, request_share=1.0 / pending)
    results["cycle_pair"]["calls_per_pair"] = len(all_made) / pending
    results["cycle_pair"]["balance_item_bytes"] = max(
        (max(t.get("size_before", 0), t.get("size_after", 0)) for c in all_made for t in _accounts_items(c, logical)),
        default=None)
    pair_partitions: dict[str, float] = {}
    for name in ("hold", "settle"):
        for part, value in results[name]["per_partition"].items():
            pair_partitions[part] = pair_partitions.get(part, 0.0) + value
    bounded = {p: u for p, u in pair_partitions.items() if "userId partition" in p and u > 0}
    return {"cases": results, "max_pending": pending,
            "pair_first": {"units": results["hold"]["units_total"] + results["settle"]["units_total"],
                           "per_partition": pair_partitions,
                           "pairs_per_second": min((PARTITION_WCU_PER_SECOND / u for u in bounded.values()),
                                                   default=None)}}


def _accounts_items(call: Any, logical: dict[str, str]) -> list[dict[str, int]]:
    """The balance items (Accounts, `GROUP#...`) a recorded write call touched, with their sizes."""
    found = []
    for item in call.touched or []:
        if logical.get(item.table) == "AccountsTable" and str(item.key.get("sk", {}).get("S", "")).startswith(
                "GROUP#"):
            found.append({"size_before": item_size(item.before), "size_after": item_size(item.after)})
    return found


LAG = 100


def _consume(service: Any, user: str, offer_group: str, key: str | None) -> Any:
    headers = {"Idempotency-Key": key} if key else None
    return service.call("POST", f"/users/{user}/consume", {"offerGroup": offer_group, "tokens": 1}, iam=True,
                        headers=headers)


def _price_case(label: str, status: int | str, request_calls: list[Any], stream_calls: list[Any],
                observer: ImageObserver, logical: dict[str, str], *, stream_share: float = 1.0,
                request_share: float = 1.0) -> dict[str, Any]:
    """`stream_share`: the part of the stream's calls that is this consume's (1 / records drained);
    `request_share`: the same for the request calls (1 / requests, for an average over several)."""
    from benchmarks import calls as calls_module

    lines: list[dict[str, Any]] = []
    per_partition: dict[str, float] = {}
    totals = {"request": 0.0, "stream": 0.0}
    local = {"request": 0.0, "stream": 0.0}
    index_units = 0.0
    index_keys = {k for info in observer.tables.values() for index in info.indexes for k in index.keys}
    consume_writes: list[str] = []
    for who, made in (("request", request_calls), ("stream", stream_calls)):
        share = stream_share if who == "stream" else request_share
        for call in made:
            factor = calls_module._TX_FACTOR if call.operation in calls_module.TRANSACTION_OPS else 1.0
            local[who] += (call.wcu or 0.0) / factor * share
            if call.touched is None:
                if share == 1.0:
                    lines.append({"who": who, "operation": call.operation, "error": call.error, "units": 0.0,
                                  "local_wcu": (call.wcu or 0.0) / factor, "items": []})
                continue
            priced = price(call.operation, call.touched, observer.tables, call.error)
            totals[who] += priced.total * share
            index_units += priced.index_units * share
            for item, detail in zip(call.touched, priced.detail, strict=True):
                part = _partition(logical.get(item.table, item.table), item)
                per_partition[part] = per_partition.get(part, 0.0) + (detail["units"] + detail["index_units"]) * share
                detail["table"] = logical.get(item.table, item.table)
                detail["partition"] = part
                if who == "request" and detail["action"] == "Update" and detail["table"] == "AccountsTable":
                    consume_writes = detail["written_attributes"] or []
            if share == 1.0:  # a lagging drain's hundreds of calls are summed above, not listed
                lines.append({"who": who, "operation": call.operation, "error": call.error, "units": priced.total,
                              "local_wcu": (call.wcu or 0.0) / factor, "items": priced.detail})
    balance_sizes = [max(item["size_before"], item["size_after"]) for line in lines for item in line["items"]
                     if item["table"] == "AccountsTable" and str(item["key"].get("sk", {}).get("S", "")).startswith(
                         "GROUP#")]
    bounded = {p: u for p, u in per_partition.items() if "userId partition" in p and u > 0}
    per_second = min((PARTITION_WCU_PER_SECOND / u for u in bounded.values()), default=None)
    return {
        "label": label, "status": status, "lines": lines,
        "request_calls": len(request_calls), "stream_calls": len(stream_calls),
        "units_request": totals["request"], "units_stream": totals["stream"],
        "units_total": totals["request"] + totals["stream"], "index_units": index_units,
        "local_request": local["request"], "local_stream": local["stream"],
        "per_partition": per_partition, "consumes_per_second": per_second,
        "bounding_partition": min(bounded, key=lambda p: PARTITION_WCU_PER_SECOND / bounded[p]) if bounded else None,
        "consume_update_writes": consume_writes,
        "balance_item_bytes": max(balance_sizes, default=None),
        "consume_update_writes_index_key": sorted(set(consume_writes) & index_keys),
        "index_keys": sorted(index_keys),
    }


def _writes_text(writes: list[str], index_hit: str) -> str:
    markers = [w for w in writes if w.startswith(("ikb_", "ike_"))]
    plain = [w for w in writes if w not in markers]
    text = ", ".join(plain) + (f", {len(markers)} marker attributes (ikb_/ike_<key hash>)" if markers else "")
    return f"{text or '-'} (index keys among them: {index_hit})"


def _item_text(item: dict[str, Any]) -> str:
    text = f"{item['action']} {item['table']} {item['size_before']} -> {item['size_after']} B = {item['units']:g}"
    if item["index_units"]:
        text += f" + index {item['index_units']:g}"
    indexes = ", ".join(f"{x['index']}: {x['why']}" for x in item["indexes"])
    return text + (f" ({indexes})" if indexes else "")


def markdown(result: dict[str, Any]) -> str:
    from benchmarks.common import markdown_table

    cases = result["cases"]
    out = [
        "Write units per consume on AWS's prices, computed from the calls each consume made and the stream "
        "function's calls for it, with each written item read back before and after its write (`benchmarks/"
        "capacity.py`): ceil(item KB) per PutItem/UpdateItem (the larger of the item before and after), "
        "transactions x2, every index entry written counted. `Local` = DynamoDB Local's own ConsumedCapacity "
        "(INDEXES) for the same calls, transactions divided by its factor. consumes/s = "
        f"{result['partition_limit']:,.0f} WCU/s per partition / the units the consume takes in the busiest of "
        "the user's two partitions it writes (Accounts, where the balance item is, and Ledger); an idempotency "
        "record has a partition of its own per key.",
        "",
    ]
    rows = []
    for case in cases.values():
        parts = "; ".join(f"{p} {u:.3g}" for p, u in case["per_partition"].items())
        index_hit = ", ".join(case["consume_update_writes_index_key"]) or "none"
        rows.append([
            case["label"], case["status"], f"{case['request_calls']} + {case['stream_calls']}",
            f"{case['units_request']:.3g}", f"{case['units_stream']:.3g}", f"**{case['units_total']:.3g}**",
            f"{case['local_request'] + case['local_stream']:.3g}", f"{case['index_units']:.3g}", parts,
            "-" if case["consumes_per_second"] is None else f"**{case['consumes_per_second']:,.0f}**",
            _writes_text(case["consume_update_writes"], index_hit),
        ])
    out.append(markdown_table(
        ["case", "status", "calls (request + stream)", "WCU request", "WCU stream", "WCU total", "Local reports",
         "of which index writes", "WCU per partition", "consumes/s per balance (on paper)",
         "attributes the consume's UpdateItem writes"], rows))
    out += ["", "Per call (sizes in bytes, as AWS counts them):", ""]
    detail = []
    for case in cases.values():
        for line in case["lines"]:
            op = line["operation"] + (f"!{line['error']}" if line["error"] else "")
            items = "; ".join(_item_text(i) for i in line["items"]) or "-"
            detail.append([case["label"], line["who"], op, items, f"{line['units']:g}", f"{line['local_wcu']:g}"])
    out.append(markdown_table(["case", "by", "call", "items (before -> after, units)", "WCU (model)", "Local"],
                              detail))
    out += ["", result["old_design"]]
    if result.get("holds"):
        out += ["", hold_markdown(result["holds"], result["partition_limit"])]
    return "\n".join(out)


def hold_markdown(holds: dict[str, Any], limit: float) -> str:
    """Write units of a hold and a settle (issue 12), priced as a consume is above."""
    from benchmarks.common import markdown_table

    cases = holds["cases"]
    pair = holds["pair_first"]
    out = [
        "Write units of a hold and a settle (AWS prices, from the calls each made and the stream function's calls "
        "for it, each written item read back before and after, as above). The balance item carries each hold "
        "(`h_<id>`, its stamps `hq_`/`hb_`, the set `hs`) from the hold until a rewrite of the group folds it "
        f"into the book; with nothing else rewriting the group, the write that would make more than "
        f"{holds['max_pending']} holds wait rewrites it (a fold made of plain writes: the closed holds' outcomes "
        "archived, the book prepared on the book item, the balance item swung to it, the book promoted), so a "
        f"balance cycles through {holds['max_pending']} pairs per rewrite and the item grows along the way. "
        "`per second on paper` = "
        f"{limit:,.0f} WCU/s / the units in the busiest of the user's partitions (holds/s, settles/s; pairs/s for "
        "the cycle's average pair). The stream was drained after every request (one record per batch, the most "
        "stream writes a pair can cause: the stream function's UpdateItem of the hold's `byDue` entry runs once "
        "per batch and group, and is charged even when its condition fails).",
        "",
    ]
    rows = []
    for case in cases.values():
        parts = "; ".join(f"{p} {u:.3g}" for p, u in case["per_partition"].items())
        calls = case.get("calls_per_pair")
        rows.append([
            case["label"], case["status"],
            f"{calls:.2f} per pair" if calls is not None else f"{case['request_calls']} + {case['stream_calls']}",
            f"{case['units_request']:.3g}", f"{case['units_stream']:.3g}", f"**{case['units_total']:.3g}**",
            f"{case['local_request'] + case['local_stream']:.3g}", parts,
            "-" if case["consumes_per_second"] is None else f"**{case['consumes_per_second']:,.0f}**",
            "-" if case.get("balance_item_bytes") is None else f"{case['balance_item_bytes']:,} B",
        ])
    pairs = pair["pairs_per_second"]
    rows.append(["hold + settle above (the group's first pair)", "-", "-", "-", "-", f"**{pair['units']:.3g}**", "-",
                 "; ".join(f"{p} {u:.3g}" for p, u in pair["per_partition"].items()),
                 "-" if pairs is None else f"**{pairs:,.0f}** pairs/s", "-"])
    out.append(markdown_table(
        ["case", "status", "calls (request + stream)", "WCU request", "WCU stream", "WCU total", "Local reports",
         "WCU per partition", "per second on paper", "largest balance item written"], rows))
    out += ["", "Per call (sizes in bytes, as AWS counts them):", ""]
    detail = []
    for case in cases.values():
        for line in case["lines"]:
            op = line["operation"] + (f"!{line['error']}" if line["error"] else "")
            items = "; ".join(_item_text(i) for i in line["items"]) or "-"
            detail.append([case["label"], line["who"], op, items, f"{line['units']:g}", f"{line['local_wcu']:g}"])
    out.append(markdown_table(["case", "by", "call", "items (before -> after, units)", "WCU (model)", "Local"],
                              detail))
    return "\n".join(out)
