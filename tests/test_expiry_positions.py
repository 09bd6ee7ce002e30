"""The sweep's positions in the byDue index, and its shards (pure: no engine).

Keys are `<iso expiresAt>#<userId>#<group>` where the ISO text has microseconds only when present, so
inside one second `...16.5Z` sorts before `...16Z` ('.' < 'Z'). Positions are second prefixes, which
sort before every key of their second whatever its form.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from user_credits.domain.clock import to_iso
from user_credits.logic.expiry import MIN_SAFETY_MS, SAFETY_MS, Deadline
from user_credits.store.due import DUE_SHARDS, due_shard, due_shards, due_sort
from user_credits.store.expiry import LOWEST, DueEntry, position_before, position_through


def key(moment: datetime, user: str = "u", group: str = "g") -> str:
    return f"{to_iso(moment)}#{user}#{group}"


def test_a_position_through_now_covers_every_key_due_now_whatever_its_fraction() -> None:
    now = datetime(2031, 3, 10, 12, 0, 16, 700_000, tzinfo=UTC)
    due = [now.replace(microsecond=0), now.replace(microsecond=500_000), now, now - timedelta(days=1)]
    for moment in due:
        assert key(moment) <= position_through(now), moment
    # The rest of the current second is included too (the sweep compares expiresAt itself)...
    assert key(now.replace(microsecond=900_000)) <= position_through(now)
    # ...but nothing from the next second on.
    assert key(now.replace(microsecond=0) + timedelta(seconds=1)) > position_through(now)


def test_a_position_before_a_moment_covers_exactly_the_earlier_seconds() -> None:
    moment = datetime(2031, 3, 10, 12, 0, 17, 200_000, tzinfo=UTC)
    assert key(moment.replace(second=16)) < position_before(moment)
    assert key(moment.replace(second=16, microsecond=999_999)) < position_before(moment)
    assert key(moment.replace(microsecond=0)) > position_before(moment)


def test_resuming_after_a_key_skips_exactly_that_key() -> None:
    stopped = key(datetime(2031, 3, 10, 12, 0, 16, tzinfo=UTC), "u1", "g")
    # Another group of the same user whose name extends the first one comes after it, and is not skipped.
    assert stopped < stopped + LOWEST <= key(datetime(2031, 3, 10, 12, 0, 16, tzinfo=UTC), "u1", "g2")
    assert stopped + LOWEST > stopped


def test_what_falls_due_at_one_moment_spreads_over_every_shard() -> None:
    shards = Counter(due_shard(f"user-{n}", "tokens") for n in range(1600))
    assert set(shards) == set(due_shards()) and len(shards) == DUE_SHARDS >= 16
    # No shard takes more than twice its share (100 each if even).
    assert max(shards.values()) < 200
    assert due_shard("a", "b") == due_shard("a", "b")


def test_an_index_key_says_who_and_when() -> None:
    moment = datetime(2031, 2, 27, 23, 59, 59, 250_000, tzinfo=UTC)
    entry = DueEntry.from_sort_key(due_sort("user:1@x", "g.1", moment))
    assert (entry.due_at, entry.user_id, entry.offer_group) == (moment, "user:1@x", "g.1")
    assert entry.sort_key == key(moment, "user:1@x", "g.1")


def test_the_safety_margin_follows_the_budget() -> None:
    assert Deadline(lambda: 300_000).safety_ms == SAFETY_MS
    assert Deadline(lambda: 15_000).safety_ms == 3_000
    assert Deadline(lambda: 100).safety_ms == MIN_SAFETY_MS
    assert Deadline(lambda: 100).reached()
