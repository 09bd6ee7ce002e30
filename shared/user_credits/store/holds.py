"""Holds on the balance item (SPEC 2.9): placed and closed by one conditional UpdateItem each.

A hold lives on its group's balance item, so placing, settling and releasing it are plain writes of
that one item (no transaction, like a consume):

- `h_<rid>`: the hold (`id`, `n` tokens held, `exp`, `at`), and once closed its outcome (`st`
  settled | released, `t` settled, `r` released) with the item's `seq` and `balance` just before the
  close (`cq`, `cb`). `lx`: the soonest expiry among the lots it took from, once a rewrite knows them.
- `hq_<rid>`, `hb_<rid>`: the item's `seq` and `balance` just before the hold was placed (set from the
  old item by the same UpdateItem, so they are exact).
- `hs`: the ids of the holds with an event not yet in the book; `ho`: how many are open (at most
  `MAX_OPEN`); `holdDue`: no hold expires before it;
  `hv`: counts hold writes, so a rewrite also fails when a hold changed since it read (a settle that
  returns nothing changes no `seq`).

Those stamps are what `domain.lots.replay` needs to know which lots each hold took and got back. The
next rewrite of the group (a purchase, grant, refund, expiry, or one forced here) stores the result in
the book, removes the stamps and the closed holds, and remembers each closed hold's outcome for a day
(an Idempotency record), so a repeated settle still answers. Every hold write is refused while
`MAX_PENDING` holds wait for a rewrite, so the balance item stays small (a write costs by item size).

The hold id names the group and the tokens held (`<rid>-<n>-<group>`): a settle names neither, and this
way it is still one write; the condition checks both against the item, so a forged id finds nothing.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from botocore.exceptions import ClientError

from user_credits.domain.changes import Change
from user_credits.domain.lots import HoldEvent, Movement
from user_credits.store.due import due_shard, due_sort
from user_credits.store.idempotency import TTL_SECONDS, StoredResponse, scoped_key
from user_credits.store.models import BalanceRecord, IdempotencyRecord, group_sk
from user_credits.store.transactions import StaleRead

HOLD_ROUTE: Final = "hold"
# The remembered outcomes of closed holds: a key space of their own (not an Idempotency-Key's).
OUTCOME_ROUTE: Final = "hold-outcome"
PREFIX, OPEN_SEQ, OPEN_BALANCE = "h_", "hq_", "hb_"
PENDING, HOLD_DUE, HOLD_WRITES, OPEN = "hs", "holdDue", "hv", "ho"
# Holds with an event not yet in the book, at most: the next write forces a rewrite first.
MAX_PENDING: Final = 16
# Open holds per group, at most: each weighs ~200 bytes on the balance item, which every consume pays
# for by size (a write unit per KB), so past this a hold is refused (409 too_many_holds).
MAX_OPEN: Final = 64
# Errors that guarantee nothing was applied: retried by the one loop (`transactions.optimistic`).
CONFLICTS: Final = frozenset({
    "TransactionConflictException", "TransactionInProgressException", "ThrottlingException",
    "ProvisionedThroughputExceededException", "RequestLimitExceeded",
})
_HOLD_ID = re.compile(r"^([0-9a-f]{20})-([0-9]{1,16})-(.+)$")


@dataclass(frozen=True)
class HoldRef:
    """What a hold id says: its attribute's suffix, the tokens held, the group."""

    rid: str
    tokens: int
    offer_group: str

    @property
    def hold_id(self) -> str:
        return f"{self.rid}-{self.tokens}-{self.offer_group}"

    @property
    def attribute(self) -> str:
        return PREFIX + self.rid


def new_ref(offer_group: str, tokens: int, seed: str | None = None) -> HoldRef:
    """A fresh hold id; from `seed` (a keyed request's key and body) the same one every time."""
    rid = hashlib.sha256(seed.encode()).hexdigest()[:20] if seed is not None else uuid.uuid4().hex[:20]
    return HoldRef(rid, tokens, offer_group)


def parse_ref(hold_id: str) -> HoldRef | None:
    match = _HOLD_ID.match(hold_id)
    if match is None:
        return None
    return HoldRef(match.group(1), int(match.group(2)), match.group(3))


@dataclass(frozen=True)
class Outcome:
    """A closed hold's answer (SPEC 3), and the call that closed it."""

    hold_id: str
    status: str  # settled | released
    settled: int
    released: int
    balance: int

    def body(self) -> dict[str, Any]:
        return {"holdId": self.hold_id, "settled": self.settled, "released": self.released,
                "balance": self.balance, "status": self.status}

    def same_call(self, status: str, settled: int) -> bool:
        """A repeat of the call that closed it: the same kind, and for a settle the same tokens."""
        return self.status == status and (status == "released" or self.settled == settled)


def call_signature(status: str, settled: int) -> str:
    return "release" if status == "released" else f"settle:{settled}"


@dataclass(frozen=True)
class ItemHold:
    """One hold as the balance item shows it."""

    ref: HoldRef
    expires_at: datetime
    opened: HoldEvent | None  # not yet in the book
    closed: HoldEvent | None  # closed, not yet folded into the book
    outcome: Outcome | None
    lots_expire: datetime | None

    @property
    def is_open(self) -> bool:
        return self.outcome is None


def stamp(moment: datetime) -> str:
    """Times on the item are fixed-width (pynamodb's form), so string order is time order in conditions."""
    return str(BalanceRecord.expiresAt.serialize(moment))


def _parse(text: str) -> datetime:
    moment: datetime = BalanceRecord.expiresAt.deserialize(text)
    return moment


def _number(value: Mapping[str, Any] | None) -> int | None:
    return int(value["N"]) if value and "N" in value else None


def hold_writes(item: Mapping[str, Any]) -> int | None:
    return _number(item.get(HOLD_WRITES))


def hold_due(item: Mapping[str, Any]) -> datetime | None:
    text = item.get(HOLD_DUE, {}).get("S")
    return _parse(text) if text else None


def holds_on(item: Mapping[str, Any]) -> list[ItemHold]:
    """The holds on a balance item (DynamoDB JSON)."""
    found = []
    for name, value in item.items():
        if not name.startswith(PREFIX) or "M" not in value:
            continue
        rid = name[len(PREFIX):]
        data = value["M"]
        ref = parse_ref(data["id"]["S"])
        if ref is None or ref.rid != rid:
            raise ValueError(f"a hold attribute {name!r} with id {data.get('id')!r}")
        expires = _parse(data["exp"]["S"])
        open_seq, open_balance = _number(item.get(OPEN_SEQ + rid)), _number(item.get(OPEN_BALANCE + rid))
        opened = None
        if open_seq is not None and open_balance is not None:
            opened = HoldEvent(ref.hold_id, "open", open_seq, open_balance, ref.tokens, expires)
        closed = outcome = None
        if "st" in data:
            status, settled, released = data["st"]["S"], int(data["t"]["N"]), int(data["r"]["N"])
            seq, balance = int(data["cq"]["N"]), int(data["cb"]["N"])
            closed = HoldEvent(ref.hold_id, "close", seq, balance, settled)
            outcome = Outcome(ref.hold_id, status, settled, released,
                              balance + released - max(0, settled - ref.tokens))
        lots_expire = _parse(data["lx"]["S"]) if "lx" in data else None
        found.append(ItemHold(ref, expires, opened, closed, outcome, lots_expire))
    return found


# ----------------------------------------------------------------------------- placing (with a debit)

def placing_clauses(ref: HoldRef, expires_at: datetime, now: datetime, lower_due: bool) -> tuple[
        str, str, str, dict[str, str], dict[str, Any]]:
    """What placing a hold adds to the debit's UpdateItem (`store.consumption`): SET clauses, ADD
    clauses, a condition, names, values. `lower_due`: a hold that expires before the item's `holdDue`
    lowers it (a second attempt, see `logic.holds`)."""
    names = {"#h": ref.attribute, "#hq": OPEN_SEQ + ref.rid, "#hb": OPEN_BALANCE + ref.rid, "#hs": PENDING,
             "#hd": HOLD_DUE, "#hv": HOLD_WRITES, "#ho": OPEN}
    values: dict[str, Any] = {
        ":hold": {"M": {"id": {"S": ref.hold_id}, "n": {"N": str(ref.tokens)}, "exp": {"S": stamp(expires_at)},
                        "at": {"S": stamp(now)}}},
        ":hid": {"SS": [ref.rid]}, ":hexp": {"S": stamp(expires_at)},
        ":hnow": {"S": stamp(now)}, ":hone": {"N": "1"}, ":homax": {"N": str(MAX_OPEN)}, ":z": {"N": "0"},
    }
    # The right-hand sides read the old item: the stamps are the seq and balance just before this write.
    sets = ("#h = :hold, #hq = if_not_exists(#s, :z), #hb = if_not_exists(#b, :z), "
            + ("#hd = :hexp" if lower_due else "#hd = if_not_exists(#hd, :hexp)"))
    due = "#hd > :hexp AND #hd > :hnow" if lower_due else "attribute_not_exists(#hd) OR (#hd > :hnow AND #hd <= :hexp)"
    # (The gate on `hs` is the debit's own, as for every write.)
    condition = f"attribute_not_exists(#h) AND ({due}) AND (attribute_not_exists(#ho) OR #ho < :homax)"
    return sets, "#hs :hid, #hv :hone, #ho :hone", condition, names, values


# ----------------------------------------------------------------------------- closing

class HoldGone(Exception):
    """The hold is not on the balance item (closed and folded, never placed, or another user's)."""


class HoldNeedsRewrite(Exception):
    """The group must be rewritten before this close can be one write: a lot or a hold is due, a lot
    the hold took from has expired, or too many holds wait for the book."""


@dataclass(frozen=True)
class Closing:
    """A close to make: `settled` tokens kept (0 for a release), `status` settled | released."""

    ref: HoldRef
    status: str
    settled: int
    max_overdraft: int = 0

    @property
    def returned(self) -> int:
        return max(0, self.ref.tokens - self.settled)

    @property
    def excess(self) -> int:
        return max(0, self.settled - self.ref.tokens)

    def movements(self, key: str | None = None) -> tuple[Movement, ...]:
        if self.returned:
            return (Movement(self.returned, "release", hold_id=self.ref.hold_id, idempotency_key=key),)
        if self.excess:
            return (Movement(-self.excess, "consume", hold_id=self.ref.hold_id, idempotency_key=key),)
        return ()


def close_update(closing: Closing, now: datetime, table: str, key: Mapping[str, Any]) -> dict[str, Any]:
    """One UpdateItem that closes the hold: the balance gets back what is returned (or loses the
    excess, under SPEC 2.5's condition), the hold records its outcome and the stamps."""
    movements = closing.movements()
    change = Change(uuid.uuid4().hex, now, movements)
    delta = sum(m.delta for m in movements)
    names = {"#b": "balance", "#s": "seq", "#c": "change", "#h": closing.ref.attribute,
             "#st": "st", "#t": "t", "#r": "r", "#cq": "cq", "#cb": "cb", "#n": "n", "#lx": "lx", "#ne": "nextExp",
             "#hd": HOLD_DUE, "#hs": PENDING, "#hv": HOLD_WRITES, "#ho": OPEN}
    values: dict[str, Any] = {
        ":d": {"N": str(abs(delta))}, ":k": {"N": str(len(movements))}, ":change": {"S": change.to_json()},
        ":now": {"S": stamp(now)}, ":st": {"S": closing.status},
        ":t": {"N": str(closing.settled)}, ":r": {"N": str(closing.returned)}, ":n": {"N": str(closing.ref.tokens)},
        ":hid": {"SS": [closing.ref.rid]}, ":hmax": {"N": str(MAX_PENDING)}, ":one": {"N": "1"},
        ":less": {"N": "-1"},
    }
    sign = "-" if delta < 0 else "+"
    expression = (f"SET #b = #b {sign} :d, #s = #s + :k, #c = :change, #h.#st = :st, #h.#t = :t, "
                  "#h.#r = :r, #h.#cq = #s, #h.#cb = #b ADD #hs :hid, #hv :one, #ho :less")
    condition = ("attribute_exists(#h) AND attribute_not_exists(#h.#st) AND #h.#n = :n"
                 " AND (attribute_not_exists(#h.#lx) OR #h.#lx > :now)"
                 " AND (attribute_not_exists(#ne) OR #ne > :now)"
                 " AND (attribute_not_exists(#hd) OR #hd > :now)"
                 " AND (attribute_not_exists(#hs) OR size(#hs) < :hmax)")
    if closing.excess:
        # SPEC 2.5 for the excess, with the settle's maxOverdraft.
        values[":floor"] = {"N": str(closing.excess - closing.max_overdraft)}
        condition += " AND #b >= :floor"
    return {"TableName": table, "Key": dict(key), "UpdateExpression": expression, "ConditionExpression": condition,
            "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}


def why_not_closed(closing: Closing, old: Mapping[str, Any] | None, now: datetime) -> Exception:
    """Why the close's condition failed, from the item as it was (ReturnValuesOnConditionCheckFailure)."""
    old = old or {}
    value = old.get(closing.ref.attribute)
    if value is None or "M" not in value:
        return HoldGone(closing.ref.hold_id)
    data = value["M"]
    if int(data["n"]["N"]) != closing.ref.tokens or data["id"]["S"] != closing.ref.hold_id:
        return HoldGone(closing.ref.hold_id)
    hold = next(h for h in holds_on(old) if h.ref.rid == closing.ref.rid)
    if hold.outcome is not None:
        return AlreadyClosed(hold.outcome)
    at = stamp(now)
    due = (("lx" in data and data["lx"]["S"] <= at)
           or old.get("nextExp", {}).get("S", "\uffff") <= at
           or old.get(HOLD_DUE, {}).get("S", "\uffff") <= at
           or len(old.get(PENDING, {}).get("SS", [])) >= MAX_PENDING)
    if due:
        return HoldNeedsRewrite(closing.ref.hold_id)
    return InsufficientForExcess(int(old["balance"]["N"]) if "balance" in old else 0)


class AlreadyClosed(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.status)
        self.outcome = outcome


class InsufficientForExcess(Exception):
    """A settle above the hold whose excess the balance cannot cover (the hold stays open)."""

    def __init__(self, balance: int) -> None:
        super().__init__(balance)
        self.balance = balance


def close(closing: Closing, now: datetime, key: Mapping[str, Any]) -> int:
    """Close the hold with one UpdateItem; the balance after. Raises what `why_not_closed` finds, or
    `StaleRead` for an error that guarantees nothing was applied (a conflict, throttling).

    botocore may resend it after an answer lost on the way: harmless, the resent close finds the
    hold closed by this very call and replays it (`Outcome.same_call`)."""
    request = close_update(closing, now, BalanceRecord.Meta.table_name, key)
    client: Any = BalanceRecord._get_connection().connection.client
    try:
        # Only what the close wrote, not the other holds on the item.
        response = client.update_item(**request, ReturnValues="UPDATED_NEW",
                                      ReturnValuesOnConditionCheckFailure="ALL_OLD")
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code == "ConditionalCheckFailedException":
            old: Any = error.response.get("Item")
            raise why_not_closed(closing, old, now) from error
        if code in CONFLICTS:
            raise StaleRead(str(code)) from error
        raise
    written = response["Attributes"]
    if "balance" in written:
        return int(written["balance"]["N"])
    # An engine may leave out an attribute its SET did not change (moto does, for a settle of exactly the
    # held tokens): the balance is then the one before, which the close stamped on the hold (`cb`).
    return int(written[closing.ref.attribute]["M"]["cb"]["N"])


# ----------------------------------------------------------------------------- closed holds, remembered

def archive_key(user_id: str, hold_id: str) -> str:
    return scoped_key(user_id, OUTCOME_ROUTE, hold_id)


def archive_record(user_id: str, outcome: Outcome, now: datetime) -> IdempotencyRecord:
    """A closed hold's outcome, kept for a day after the rewrite that folds it out of the balance item."""
    return IdempotencyRecord(
        archive_key(user_id, outcome.hold_id), requestHash=call_signature(outcome.status, outcome.settled),
        status="completed", statusCode=200, response=outcome.body(), ttl=int(now.timestamp()) + TTL_SECONDS,
        createdAt=now,
    )


def archived(user_id: str, hold_id: str, now: datetime) -> Outcome | None:
    """The outcome of a hold closed and folded out of its balance item (one GetItem), if remembered."""
    try:
        record = IdempotencyRecord.get(archive_key(user_id, hold_id), consistent_read=True)
    except IdempotencyRecord.DoesNotExist:
        return None
    if int(record.ttl) <= int(now.timestamp()):
        return None
    body = record.response
    return Outcome(body["holdId"], body["status"], int(body["settled"]), int(body["released"]), int(body["balance"]))


def stored(outcome: Outcome) -> StoredResponse:
    return StoredResponse(200, outcome.body())


def index_hold(user_id: str, offer_group: str, hold_id: str, until: datetime) -> None:
    """Bring the group's entry in the sweep's index (`byDue`) forward to a hold's expiry, if sooner, so
    the sweep releases it (SPEC 2.9). Not on the hold's own write: an index write there would double
    its write units. The stream function does it, well before any hold is due; only while the hold is
    still open on the item (a late batch must not point the entry at a hold that is gone)."""
    ref = parse_ref(hold_id)
    if ref is None:
        return
    client: Any = BalanceRecord._get_connection().connection.client
    sort = due_sort(user_id, offer_group, until)
    try:
        client.update_item(
            TableName=BalanceRecord.Meta.table_name,
            Key={"userId": {"S": user_id}, "sk": {"S": group_sk(offer_group)}},
            UpdateExpression="SET #sh = :sh, #so = :so",
            ConditionExpression=("attribute_exists(#h) AND attribute_not_exists(#h.#st)"
                                 " AND (attribute_not_exists(#so) OR #so > :so)"),
            ExpressionAttributeNames={"#sh": "dueShard", "#so": "dueSort", "#h": ref.attribute, "#st": "st"},
            ExpressionAttributeValues={":sh": {"S": due_shard(user_id, offer_group)}, ":so": {"S": sort}},
        )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
