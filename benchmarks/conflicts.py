"""TransactionConflictException as AWS documents it, simulated for DynamoDB Local (which serialises every
request and never raises it).

AWS: a PutItem, UpdateItem or DeleteItem on an item that an ongoing TransactWriteItems includes is
rejected with `TransactionConflictException`, and a TransactWriteItems that includes an item of another
ongoing TransactWriteItems is cancelled (`TransactionCanceledException`, reason `TransactionConflict`).

`install(slots)` wraps `botocore.client.BaseClient._make_api_call` in one process (as calls.py does for
counting): while a TransactWriteItems is in flight (from sending it until DynamoDB Local answered), the
keys of the items it includes are held in `slots`, a `multiprocessing.Array` shared by every worker process
of the hot-balance benchmark, so a transaction in one worker (one Lambda container) conflicts with a plain
write in another, as on AWS. The hook never reaches DynamoDB Local for a request it rejects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

PLAIN_WRITES = {"PutItem", "UpdateItem", "DeleteItem"}
SLOTS = 256


def item_hash(table: str, key: dict[str, Any]) -> int:
    """A non-zero signed 64-bit id of (table, key) for the shared slots (0 = free)."""
    digest = hashlib.blake2b(f"{table}|{json.dumps(key, sort_keys=True)}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "big", signed=True)
    return value or 1


@dataclass
class ConflictHook:
    slots: Any  # multiprocessing.Array("q", SLOTS)
    counters: dict[str, int] = field(default_factory=dict)
    _original: Any = None
    _keys: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def _key_names(self, client: Any, table: str) -> tuple[str, ...]:
        if table not in self._keys:
            described = self._original(client, "DescribeTable", {"TableName": table})["Table"]
            self._keys[table] = tuple(k["AttributeName"] for k in described["KeySchema"])
        return self._keys[table]

    def _hash(self, client: Any, body: dict[str, Any]) -> int:
        table = body["TableName"]
        key = body.get("Key")
        if key is None:
            item = body["Item"]
            key = {name: item[name] for name in self._key_names(client, table)}
        return item_hash(table, key)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def install(self) -> None:
        from botocore.client import BaseClient
        from botocore.exceptions import ClientError

        if self._original is not None:
            return
        original = BaseClient._make_api_call  # type: ignore[attr-defined]
        self._original = original
        hook = self

        def hooked(client: Any, operation: str, params: dict[str, Any]) -> Any:
            if client.meta.service_model.service_name != "dynamodb":
                return original(client, operation, params)
            if operation in PLAIN_WRITES:
                mine = hook._hash(client, params)
                with hook.slots.get_lock():
                    busy = mine in hook.slots.get_obj()[:]
                if busy:
                    hook._count(f"TransactionConflictException on {operation}")
                    raise ClientError({"Error": {"Code": "TransactionConflictException",
                                                 "Message": "Transaction is ongoing for the item"}}, operation)
                hook._count(f"{operation} passed")
                return original(client, operation, params)
            if operation != "TransactWriteItems":
                return original(client, operation, params)
            hashes = []
            for entry in params.get("TransactItems", []):
                (_action, body), = entry.items()
                hashes.append(hook._hash(client, body))
            taken: list[int] = []
            with hook.slots.get_lock():
                shared = hook.slots.get_obj()
                current = shared[:]
                clash = [h in current for h in hashes]
                if not any(clash):
                    for index, value in enumerate(current):
                        if value == 0 and len(taken) < len(hashes):
                            shared[index] = hashes[len(taken)]
                            taken.append(index)
            if any(clash):
                hook._count("TransactWriteItems cancelled: TransactionConflict")
                reasons = [{"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"}
                           if hit else {"Code": "None"} for hit in clash]
                response: Any = {"Error": {"Code": "TransactionCanceledException",
                                           "Message": "Transaction cancelled (TransactionConflict)"},
                                 "CancellationReasons": reasons}
                raise ClientError(response, operation)
            if len(taken) < len(hashes):
                raise RuntimeError("conflict simulation: no free slot for a transaction's items")
            hook._count("TransactWriteItems passed")
            try:
                return original(client, operation, params)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                hook._count(f"TransactWriteItems failed at DynamoDB: {code}")
                raise
            finally:
                with hook.slots.get_lock():
                    shared = hook.slots.get_obj()
                    for index in taken:
                        shared[index] = 0

        BaseClient._make_api_call = hooked  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        from botocore.client import BaseClient

        if self._original is not None:
            BaseClient._make_api_call = self._original  # type: ignore[attr-defined]
            self._original = None

    def take(self) -> dict[str, int]:
        taken, self.counters = self.counters, {}
        return taken
