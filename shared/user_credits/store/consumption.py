"""The hot consume path: one conditional UpdateItem decides and records; the stream does the rest.

Why one write: DynamoDB serialises the updates of one item, so a conditional UpdateItem never
conflicts with another, and it costs one write unit on a small item. A transaction that includes
the balance item would make every concurrent plain write to it fail with
TransactionConflictException on AWS, and costs double. So the consume path has none:

- **Unkeyed**: one `UpdateItem` (`ReturnValues=ALL_NEW`) that decrements `balance` and bumps `seq`
  under SPEC 2.5's condition, and sets the item's `change` (`domain.changes`): the stream function
  writes the ledger entry and sends CreditsLow from the images before and after.
- **Keyed** (an Idempotency-Key): (1) a conditional `PutItem` of the key's record `in_progress` (a
  record that exists is replayed, refused as reused, or found unfinished); (2) the same `UpdateItem`,
  also conditioned on `attribute_not_exists(ikb_<key hash>)`, which it sets to the balance after
  (computed by DynamoDB from the old item) with the group's expiry in `ike_<key hash>`: the marker
  says that this key's debit happened, and holds its answer. The stream function completes the
  record with that answer, then removes the marker.
- **A retry that finds the record unfinished** (the first attempt died between (1) and (2), or a
  concurrent duplicate is between them). If the balance item carries the key's marker, the debit
  happened: replay its answer. Otherwise, while the claim is younger than `HOLD_SECONDS`, the first
  attempt may still be on its way (a request lives at most the function's timeout): 503, retry
  shortly. Once it is older, nobody can land (2) any more, and one `TransactWriteItems` of a
  ConditionCheck that the record is still `in_progress` and the update of (2) decides: the marker
  there means the debit happened (replay), a completed record is replayed, else this debits. It is
  the only transaction on the consume path, and runs only on that rare retry.
- Why that is sound: the marker is removed only after the record is completed, and (2) is sent once
  (`models.single_attempt_client`: botocore's own retries would resend it after an answer lost on the way,
  possibly after the stream removed the marker); only errors that guarantee nothing was applied
  (throttling, conflicts) are retried, by the one loop. An ambiguous failure is the caller's to retry,
  with the same key.

A refusal writes nothing to the balance; a keyed refusal deletes its claim, so a retry after a top-up
decides afresh instead of replaying the 402.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from botocore.exceptions import ClientError

from user_credits.domain.changes import Change, KeyedRequest
from user_credits.domain.clock import to_iso
from user_credits.domain.lots import Movement
from user_credits.errors import CreditsExpired, IdempotencyKeyReused, InsufficientCredits, TooManyHolds
from user_credits.store import holds
from user_credits.store.balances import GroupState
from user_credits.store.idempotency import TTL_SECONDS, StoredResponse
from user_credits.store.models import BalanceRecord, IdempotencyRecord, group_sk, single_attempt_client
from user_credits.store.transactions import StaleRead, optimistic

CONSUME_ROUTE: Final = "consume"
MARKER_BALANCE, MARKER_EXPIRY = "ikb_", "ike_"

# Errors that guarantee nothing was applied: a plain write to an item while a transaction that includes
# it is in flight (AWS), and throttling. Retried by the one loop (`transactions.optimistic`).
_CONFLICTS: Final = holds.CONFLICTS
# A keyed consume's first attempt lands its update within the function's timeout (15 s) of its claim;
# a retry that finds the claim unfinished and no marker waits until the claim is older than this.
HOLD_SECONDS: Final = 60


@dataclass(frozen=True)
class Placing:
    """The hold a debit places (SPEC 2.9): a hold takes its tokens exactly as a consume would."""

    ref: holds.HoldRef
    expires_at: datetime
    # The hold expires before the item's holdDue: this attempt lowers it (see `store.holds`).
    lower_due: bool = False


@dataclass(frozen=True)
class Debit:
    """A consumption (or a hold placed) that happened: what the deciding request reports."""

    user_id: str
    offer_group: str
    tokens: int
    balance_after: int
    expires_at: datetime | None
    placing: Placing | None = None

    def receipt(self) -> dict[str, Any]:
        if self.placing is not None:
            return hold_receipt(self.user_id, self.placing.ref, self.balance_after, self.placing.expires_at)
        return receipt(self.user_id, self.offer_group, self.tokens, self.balance_after, self.expires_at)


def receipt(
    user_id: str, offer_group: str, tokens: int, balance_after: int, expires_at: datetime | None,
) -> dict[str, Any]:
    """The 200 body of a consume: built here because the stream function stores exactly this answer
    under the key of a keyed consume."""
    return {"userId": user_id, "offerGroup": offer_group, "consumed": tokens, "balance": balance_after,
            "expiresAt": to_iso(expires_at)}


def hold_receipt(user_id: str, ref: holds.HoldRef, balance_after: int, expires_at: datetime) -> dict[str, Any]:
    """The 201 body of a hold (the stream function stores it under a keyed hold's key, too)."""
    return {"holdId": ref.hold_id, "userId": user_id, "offerGroup": ref.offer_group, "tokens": ref.tokens,
            "balance": balance_after, "expiresAt": to_iso(expires_at)}


class LowerHoldDue(Exception):
    """The hold expires before the balance item's holdDue: place it again, lowering holdDue."""


class HoldDueMoved(Exception):
    """An attempt to lower holdDue found it at or below the hold's expiry already: place it plainly."""


class LotsDue(Exception):
    """The consume was refused because a lot that held tokens has expired since the group's last
    rewrite (the stored balance still counts it), a hold is due, or too many holds wait for the book:
    the caller must rewrite the group first."""


class HoldsWaiting(LotsDue):
    """Refused only because `holds.MAX_PENDING` hold events wait for the book: a fold lifts it, and one
    that another writer made does as well (`gates_open`)."""


def gates_open(state: GroupState, now: datetime) -> bool:
    """Whether the group as read passes the gates of `_debit_update`'s condition: no lot nor hold due by
    what the item stores, and room for one more hold event. A writer refused at the gate goes back to its
    write once they are open, whoever folded: otherwise writers that keep writing would keep making
    another writer's fold lose its race."""
    waiting = sum(1 for hold in state.holds if hold.opened is not None or hold.closed is not None)
    return ((state.stored_next_expiry is None or state.stored_next_expiry > now)
            and (state.stored_hold_due is None or state.stored_hold_due > now)
            and waiting < holds.MAX_PENDING)


class KeyFinished(Exception):
    """An unfinished key's record changed while we decided (completed, or expired): claim it again."""


# ----------------------------------------------------------------------------- low-level plumbing

def _client() -> Any:
    # The client of the connection pynamodb uses for this table: one connection pool, one endpoint.
    return BalanceRecord._get_connection().connection.client




def _time(moment: datetime) -> str:
    # The same fixed-width serialization as BalanceRecord.expiresAt, so string order is time order.
    return str(BalanceRecord.expiresAt.serialize(moment))


def _expiry(value: Mapping[str, Any] | None) -> datetime | None:
    text = (value or {}).get("S")
    return BalanceRecord.expiresAt.deserialize(text) if text else None


def _key(user_id: str, offer_group: str) -> dict[str, Any]:
    return {"userId": {"S": user_id}, "sk": {"S": group_sk(offer_group)}}


def _balance_item(user_id: str, offer_group: str) -> dict[str, Any] | None:
    """The balance item as it is now (one consistent GetItem), markers included."""
    item: dict[str, Any] | None = _client().get_item(
        TableName=BalanceRecord.Meta.table_name, Key=_key(user_id, offer_group), ConsistentRead=True).get("Item")
    return item


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _reasons(error: ClientError) -> list[dict[str, Any]]:
    reasons: Any = error.response.get("CancellationReasons") or []
    return [dict(reason) for reason in reasons]


def _conflict(error: ClientError) -> bool:
    if _error_code(error) in _CONFLICTS:
        return True
    codes = {r.get("Code") for r in _reasons(error)}
    return "TransactionConflict" in codes and "ConditionalCheckFailed" not in codes


def _still_unfinished(keyed: KeyedRequest) -> dict[str, Any]:
    """The condition that the key's record is still an unfinished claim of this request's body."""
    return {
        "ConditionExpression": "#st = :open AND #h = :h",
        "ExpressionAttributeNames": {"#st": "status", "#h": "requestHash"},
        "ExpressionAttributeValues": {":open": {"S": "in_progress"}, ":h": {"S": keyed.request_hash}},
    }


def marker_names(keyed: KeyedRequest) -> tuple[str, str]:
    """The two attributes that say a keyed consume's debit happened, and hold its answer. Named after the
    key and the body: a marker that outlived its record never answers a new request with another body."""
    digest = hashlib.sha256(f"{keyed.record_key}#{keyed.request_hash}".encode()).hexdigest()[:24]
    return MARKER_BALANCE + digest, MARKER_EXPIRY + digest


# ----------------------------------------------------------------------------- the decision

def _debit_update(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, now: datetime, keyed: KeyedRequest | None,
    placing: Placing | None = None,
) -> dict[str, Any]:
    movement = Movement(delta=-tokens, reason="consume" if placing is None else "hold",
                        idempotency_key=None if keyed is None else keyed.key,
                        hold_id=None if placing is None else placing.ref.hold_id)
    change = Change(uuid.uuid4().hex, now, (movement,), keyed=keyed,
                    hold_until=None if placing is None else placing.expires_at)
    floor = tokens - max_overdraft
    names = {"#b": "balance", "#s": "seq", "#n": "nextExp", "#c": "change"}
    values: dict[str, Any] = {
        ":minus": {"N": str(-tokens)}, ":one": {"N": "1"}, ":now": {"S": _time(now)},
        ":change": {"S": change.to_json()}, ":floor": {"N": str(floor)},
    }
    expression = "SET #c = :change"
    # ADD counts a missing attribute as 0, as a new group's balance and seq are; less work for DynamoDB
    # than SET with if_not_exists (measured: -0.06 ms a write on DynamoDB Local).
    adds = ["#b :minus", "#s :one"]
    if floor <= 0:
        # Only a debit within its overdraft can pass on a group that does not exist yet, and so create
        # its item: only then the item's kind and group (any other finds them there; each attribute a
        # write sets is work for DynamoDB on the hot path).
        names.update({"#t": "itemType", "#g": "offerGroup"})
        values.update({":type": {"S": "balance"}, ":g": {"S": offer_group}})
        expression += ", #t = if_not_exists(#t, :type), #g = if_not_exists(#g, :g)"
    # SPEC 2.5: balance - tokens >= -maxOverdraft, counting live lots only. While no lot that held
    # tokens at the last rewrite has expired (nextExp > now), the stored balance is exactly that; once
    # one has, the condition fails and the caller expires it first (`LotsDue`). A missing group has
    # balance 0, which passes exactly when tokens <= maxOverdraft (decided here: it involves no attribute).
    funds = "#b >= :floor OR attribute_not_exists(#b)" if floor <= 0 else "#b >= :floor"
    # A hold that is due is released first, as soon as its group is touched (SPEC 2.9).
    # Holds waiting for the book gate every write, consumes too: when `MAX_PENDING` wait, all writers
    # go through the rewrite that folds them, so none of them starves behind the others.
    names.update({"#due": holds.HOLD_DUE, "#pend": holds.PENDING})
    values[":pmax"] = {"N": str(holds.MAX_PENDING)}
    condition = (f"(attribute_not_exists(#n) OR #n > :now) AND (attribute_not_exists(#due) OR #due > :now)"
                 f" AND (attribute_not_exists(#pend) OR size(#pend) < :pmax) AND ({funds})")
    if placing is not None:
        sets, added, placed, hold_names, hold_values = holds.placing_clauses(
            placing.ref, placing.expires_at, now, placing.lower_due)
        expression += ", " + sets
        adds.append(added)
        condition = f"{placed} AND {condition}"
        names.update(hold_names)
        values.update(hold_values)
    if keyed is not None:
        balance_marker, expiry_marker = marker_names(keyed)
        names.update({"#mb": balance_marker, "#me": expiry_marker})
        if placing is None:
            names["#e"] = "expiresAt"
            values[":nul"] = {"NULL": True}
        # Right-hand sides read the OLD item: the marker holds exactly this debit's balance after (and
        # the answer's expiresAt: the group's, or the hold's).
        values.update({":t": {"N": str(tokens)}, ":z": {"N": "0"}})
        expression += ", #mb = if_not_exists(#b, :z) - :t, "
        expression += "#me = if_not_exists(#e, :nul)" if placing is None else "#me = :hexp"
        condition = f"attribute_not_exists(#mb) AND {condition}"
    expression += " ADD " + ", ".join(adds)
    return {
        "TableName": BalanceRecord.Meta.table_name, "Key": _key(user_id, offer_group), "UpdateExpression": expression,
        "ConditionExpression": condition, "ExpressionAttributeNames": names, "ExpressionAttributeValues": values,
    }


def _refusal(
    old: Mapping[str, Any] | None, now: datetime, placing: Placing | None = None,
) -> InsufficientCredits | CreditsExpired | LotsDue | HoldsWaiting | LowerHoldDue | HoldDueMoved | TooManyHolds:
    """Why a condition failed, from the item as it was (ReturnValuesOnConditionCheckFailure=ALL_OLD)."""
    old = old or {}
    next_expiry = old.get("nextExp", {}).get("S")
    if next_expiry is not None and next_expiry <= _time(now):
        return LotsDue(f"a lot of {old.get('offerGroup', {}).get('S')!r} is due")
    hold_due = old.get(holds.HOLD_DUE, {}).get("S")
    if hold_due is not None and hold_due <= _time(now):
        return LotsDue(f"a hold of {old.get('offerGroup', {}).get('S')!r} is due")
    if len(old.get(holds.PENDING, {}).get("SS", [])) >= holds.MAX_PENDING:
        return HoldsWaiting("holds wait for the book")
    if placing is not None:
        if int(old.get(holds.OPEN, {}).get("N", "0")) >= holds.MAX_OPEN:
            return TooManyHolds(f"at most {holds.MAX_OPEN} open holds per group: settle or release one first")
        if placing.ref.attribute in old:
            # Only a keyed hold whose record expired and whose old hold is still there: rare, retry.
            return LotsDue(f"hold {placing.ref.hold_id!r} is still on the item")
        if hold_due is not None and hold_due > _time(placing.expires_at) and not placing.lower_due:
            return LowerHoldDue(placing.ref.hold_id)
        if placing.lower_due and (hold_due is None or hold_due <= _time(placing.expires_at)):
            return HoldDueMoved(placing.ref.hold_id)
    balance = int(old["balance"]["N"]) if "balance" in old else 0
    expires = old.get("expiresAt", {}).get("S")
    if expires is not None and expires <= _time(now):
        return CreditsExpired("the credits of this group have expired", balance=balance)
    return InsufficientCredits("not enough credits in this group", balance=balance)


def _replayed(
    user_id: str, offer_group: str, tokens: int, keyed: KeyedRequest, old: Mapping[str, Any] | None,
    placing: Placing | None = None,
) -> StoredResponse | None:
    """The answer of this key's debit when the item carries its marker (the debit already happened)."""
    balance_marker, expiry_marker = marker_names(keyed)
    if not old or balance_marker not in old:
        return None
    balance, expires = int(old[balance_marker]["N"]), _expiry(old.get(expiry_marker))
    if placing is not None:
        assert expires is not None
        return StoredResponse(201, hold_receipt(user_id, placing.ref, balance, expires))
    return StoredResponse(200, receipt(user_id, offer_group, tokens, balance, expires))


def debit(
    user_id: str, offer_group: str, tokens: int, max_overdraft: int, now: datetime,
    keyed: KeyedRequest | None = None, *, unfinished: bool = False, placing: Placing | None = None,
) -> Debit | StoredResponse:
    """Take `tokens` (one UpdateItem); a keyed debit whose marker is already there replays its answer.

    `unfinished`: the key's record was found `in_progress` (not claimed by this request), so the
    update goes in a transaction with a check that the record is still unfinished. `placing`: the
    debit places that hold.
    """
    request = _debit_update(user_id, offer_group, tokens, max_overdraft, now, keyed, placing)
    # A consume answers the group's expiresAt, which it does not write: the whole item. A hold answers its
    # own expiry, and its balance always changes: only what it wrote, not the other holds on the item.
    returned = "ALL_NEW" if placing is None else "UPDATED_NEW"

    def decide() -> dict[str, Any]:
        try:
            response: dict[str, Any] = single_attempt_client().update_item(
                **request, ReturnValues=returned, ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as error:
            if _error_code(error) == "ConditionalCheckFailedException":
                old: Any = error.response.get("Item")
                if keyed is not None and (replay := _replayed(user_id, offer_group, tokens, keyed, old, placing)):
                    raise _Replay(replay) from error
                raise _refusal(old, now, placing) from error
            if _conflict(error):
                raise StaleRead(_error_code(error)) from error
            raise
        return dict(response["Attributes"])

    def decide_unfinished() -> dict[str, Any]:
        assert keyed is not None
        check = {"ConditionCheck": {
            "TableName": IdempotencyRecord.Meta.table_name, "Key": {"key": {"S": keyed.record_key}},
            **_still_unfinished(keyed),
        }}
        try:
            single_attempt_client().transact_write_items(TransactItems=[
                check, {"Update": {**request, "ReturnValuesOnConditionCheckFailure": "ALL_OLD"}}])
        except ClientError as error:
            reasons = _reasons(error)
            if _conflict(error):
                raise StaleRead(_error_code(error)) from error
            if _error_code(error) != "TransactionCanceledException" or len(reasons) != 2:
                raise
            if reasons[0].get("Code") == "ConditionalCheckFailed":
                raise KeyFinished(keyed.record_key) from error
            if reasons[1].get("Code") == "ConditionalCheckFailed":
                old = reasons[1].get("Item")
                if replay := _replayed(user_id, offer_group, tokens, keyed, old, placing):
                    raise _Replay(replay) from error
                raise _refusal(old, now, placing) from error
            raise
        # The transaction returns nothing: the marker it set holds this debit's answer, unless the stream
        # has already completed the record (and removed the marker): then the record holds it.
        item = _balance_item(user_id, offer_group) or {}
        balance_marker, expiry_marker = marker_names(keyed)
        if balance_marker not in item:
            raise KeyFinished(keyed.record_key)
        return {"balance": item[balance_marker], "expiresAt": item.get(expiry_marker, {"NULL": True})}

    try:
        item = optimistic(decide_unfinished if unfinished else decide, attempts=10, base_delay=0.004,
                          metric="ConsumeRetries")
    except _Replay as replay:
        return replay.response
    return Debit(user_id, offer_group, tokens, int(item["balance"]["N"]), _expiry(item.get("expiresAt")), placing)


class _Replay(Exception):
    def __init__(self, response: StoredResponse) -> None:
        super().__init__("replay")
        self.response = response


# ----------------------------------------------------------------------------- the key's record

@dataclass(frozen=True)
class Claim:
    """What claiming a key found: nothing (`fresh`: this request decides), the first answer, or a
    record still `in_progress` (`unfinished`)."""

    fresh: bool = False
    replay: StoredResponse | None = None
    unfinished: bool = False
    # When the unfinished claim was made.
    claimed_at: datetime | None = None


def claim(keyed: KeyedRequest, now: datetime) -> Claim:
    """One conditional PutItem of the key's record `in_progress`; what was there, if anything."""
    record = IdempotencyRecord(
        keyed.record_key, requestHash=keyed.request_hash, status="in_progress",
        ttl=int(now.timestamp()) + TTL_SECONDS, createdAt=now,
    )
    try:
        _client().put_item(
            TableName=IdempotencyRecord.Meta.table_name, Item=record.serialize(),
            # An expired record is no record (DynamoDB's TTL deletes lazily).
            ConditionExpression="attribute_not_exists(#k) OR #ttl <= :epoch",
            ExpressionAttributeNames={"#k": "key", "#ttl": "ttl"},
            ExpressionAttributeValues={":epoch": {"N": str(int(now.timestamp()))}},
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
    except ClientError as error:
        if _error_code(error) != "ConditionalCheckFailedException":
            raise
        found: Any = error.response.get("Item")
        old: Mapping[str, Any] = found or {}
        if old.get("requestHash", {}).get("S") != keyed.request_hash:
            raise IdempotencyKeyReused("this Idempotency-Key was used with a different request body") from error
        stored = IdempotencyRecord.from_raw_data(dict(old))
        if stored.status == "completed":
            return Claim(replay=StoredResponse(int(stored.statusCode or 200), stored.response))
        return Claim(unfinished=True, claimed_at=stored.createdAt)
    return Claim(fresh=True)


def marked(
    user_id: str, offer_group: str, tokens: int, keyed: KeyedRequest, placing: Placing | None = None,
) -> StoredResponse | None:
    """The answer of this key's debit if the balance item carries its marker (one consistent GetItem)."""
    return _replayed(user_id, offer_group, tokens, keyed, _balance_item(user_id, offer_group), placing)


def release(keyed: KeyedRequest) -> None:
    """Delete this request's own unfinished claim after its debit was refused (nothing was debited), so
    that a retry decides afresh. A claim already gone, or not ours, is left alone."""
    try:
        _client().delete_item(
            TableName=IdempotencyRecord.Meta.table_name, Key={"key": {"S": keyed.record_key}},
            **_still_unfinished(keyed),
        )
    except ClientError as error:
        if _error_code(error) != "ConditionalCheckFailedException":
            raise


def remove_markers(user_id: str, offer_group: str, keys: Sequence[KeyedRequest]) -> None:
    """After the keys' records are completed, their markers have done their job (see the module's doc):
    one UpdateItem for all of one balance item's. Removing a marker that is gone changes nothing."""
    names: dict[str, str] = {}
    for number, keyed in enumerate(dict.fromkeys(keys)):
        balance_marker, expiry_marker = marker_names(keyed)
        names[f"#b{number}"], names[f"#e{number}"] = balance_marker, expiry_marker
    if not names:
        return
    try:
        _client().update_item(
            TableName=BalanceRecord.Meta.table_name, Key=_key(user_id, offer_group),
            UpdateExpression="REMOVE " + ", ".join(names),
            # Never create a balance item from nothing (REMOVE on a missing key would).
            ConditionExpression="attribute_exists(#sk)", ExpressionAttributeNames={**names, "#sk": "sk"},
        )
    except ClientError as error:
        if _error_code(error) != "ConditionalCheckFailedException":
            raise
