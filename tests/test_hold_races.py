"""Races and limits of holds found in review (each failed before its fix), on moto and DynamoDB Local."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from test_holds import grant, hold, iso, ledger, lots, release, settle
from test_sweep import T0, _on_own_tables

from user_credits.store.holds import MAX_OPEN


@pytest.fixture
def sweep_tables(backend: Any, monkeypatch: pytest.MonkeyPatch, events: Any) -> Any:
    """The service on tables of its own: the sweep's position is table-wide."""
    yield from _on_own_tables(backend, monkeypatch, events)


def stale_once(stale: Any, real: Any, times: int = 1) -> Any:
    """A read_group that answers `stale` the first `times` calls (reads made before another rewrite
    committed), then reads for real (a retry's read)."""
    calls: list[None] = []

    def read(*args: Any) -> Any:
        calls.append(None)
        return stale if len(calls) <= times else real(*args)

    return read


def test_a_release_racing_an_exact_settle_through_rewrites_is_refused(
        service: Any, ids: Any, balanced: Any, monkeypatch: Any) -> None:
    """Both calls take the rewrite path (16 holds wait for the book). The exact settle's rewrite has no
    movement, so it moves neither `seq` nor `hv`; the release, which read the hold open just before,
    then passes its guard and releases the settled hold: 200 twice, and the work cost nothing."""
    import user_credits.logic.holds as holds_logic

    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    hold_id = hold(service, user, group, 50).body["holdId"]
    for _ in range(15):
        hold(service, user, group, 1)
    real_read = holds_logic.read_group
    raced: list[Any] = []

    def read_then_settle(*args: Any) -> Any:
        state = real_read(*args)
        if not raced:
            raced.append(None)
            raced[0] = settle(service, user, hold_id, 50)
        return state

    monkeypatch.setattr(holds_logic, "read_group", read_then_settle)
    second = release(service, user, hold_id)
    monkeypatch.setattr(holds_logic, "read_group", real_read)
    assert raced[0].status == 200 and raced[0].body["settled"] == 50, raced[0].body
    assert second.status == 409, second.body
    assert [(d, r) for d, r, h in ledger(user) if h == hold_id] == [(-50, "hold")]
    balanced(user)


def test_a_rewrite_that_read_before_a_zero_movement_rewrite_reads_again(
        service: Any, ids: Any, balanced: Any, monkeypatch: Any) -> None:
    """An exact settle that goes through a rewrite (16 holds wait for the book) moves neither `seq`
    nor `hv`. A rewrite that read before it (here: the one a consume forces once the hold is past its
    expiresAt, as the item still said) must fail its guard, or it releases the settled hold again."""
    import user_credits.logic.expiry as expiry_logic
    from user_credits.store.balances import read_group

    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    short = hold(service, user, group, 10, ttlSeconds=60).body["holdId"]
    for _ in range(15):
        assert hold(service, user, group, 10, ttlSeconds=3600).status == 201
    stale = read_group(user, group)           # R2 reads here ...
    done = settle(service, user, short, 10)   # ... R1, the exact settle, commits (a rewrite: hs is full) ...
    assert done.status == 200 and done.body["settled"] == 10, done.body
    later = datetime.now(UTC) + timedelta(minutes=2)
    with monkeypatch.context() as patch, time_machine.travel(later, tick=False):
        patch.setattr(expiry_logic, "read_group", stale_once(stale, expiry_logic.read_group))
        expiry_logic.expire_group(user, group, later)   # ... and R2 commits, at a time `short` is due.
    service.drain()
    assert [(d, r) for d, r, h in ledger(user) if h == short] == [(-10, "hold")]
    assert service.call("GET", f"/users/{user}/credits", iam=True).body["groups"][0]["balance"] == 1000 - 160
    balanced(user)


def test_two_sweeps_that_read_the_same_group_warn_about_a_lot_once(
        service: Any, ids: Any, events: Any, monkeypatch: Any) -> None:
    """A warning claim moves neither `seq` nor `hv`: a second sweep that read before it must not
    claim the same lot again (SPEC 2.6: one CreditsExpiringSoon per lot)."""
    import user_credits.logic.expiry as expiry_logic
    from user_credits.store.balances import read_group

    user, group = ids("u"), ids("g")
    grant(service, user, group, 10, expiresAt=iso(datetime.now(UTC) + timedelta(days=1)))
    stale = read_group(user, group)
    now = datetime.now(UTC)
    with monkeypatch.context() as patch:
        patch.setattr(expiry_logic, "read_group", stale_once(stale, expiry_logic.read_group, times=2))
        expiry_logic.warn_group(user, group, now, now + timedelta(days=3))   # sweep A
        expiry_logic.warn_group(user, group, now, now + timedelta(days=3))   # sweep B, read before A wrote
    service.drain()
    warned = [e for e in events.of_type("CreditsExpiringSoon") if e["userId"] == user]
    assert len(warned) == 1, warned


def test_a_release_into_a_group_in_debt_pays_the_debt_first(service: Any, ids: Any, balanced: Any) -> None:
    """SPEC 1: a negative balance means every live lot has remaining 0. A release that refills the
    lot while the group owes more than it gets back leaves balance -5 beside a lot of 10; when that
    lot then expires, its 10 tokens expire and the debt stays: the group ends at -15, not -5."""
    user, group = ids("u"), ids("g")
    soon = datetime.now(UTC) + timedelta(hours=1)
    lot = grant(service, user, group, 10, expiresAt=iso(soon)).body["lotId"]
    hold_id = hold(service, user, group, 10).body["holdId"]
    reply = service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 15, "maxOverdraft": 15},
                         iam=True)
    assert reply.status == 200 and reply.body["balance"] == -15, reply.body
    assert release(service, user, hold_id).body["balance"] == -5
    assert lots(service, user, group) == [(lot, 0)]
    with time_machine.travel(soon + timedelta(minutes=1), tick=True):
        service.invoke_schedule()
        credits = service.call("GET", f"/users/{user}/credits", iam=True).body
        assert credits["groups"][0]["balance"] == -5, ledger(user)


def test_a_hold_indexed_after_the_rewrite_that_folded_it_does_not_hide_the_groups_lots_from_the_sweep(
        sweep_tables: Any, ids: Any) -> None:
    """The stream brings byDue forward to a new hold's expiry in `finish`, after every record of its
    batch: when the batch also holds the hold's release and a rewrite that folded it (a late stream,
    BatchSize 100), the entry moves to a hold that is gone. The sweep then finds nothing to do there,
    moves its position past it, and never sees the lot's own expiry."""
    service = sweep_tables
    user, group = ids("u"), ids("g")
    with time_machine.travel(T0, tick=True):
        lot = grant(service, user, group, 10, expiresAt=iso(T0 + timedelta(days=2))).body["lotId"]
        with service.stream_late():
            hold_id = hold(service, user, group, 4, ttlSeconds=60).body["holdId"]
            assert release(service, user, hold_id).status == 200
            grant(service, user, group, 1)   # a rewrite: folds the hold, dueSort back to the lot's expiry
    with time_machine.travel(T0 + timedelta(minutes=10), tick=True):
        service.invoke_schedule()
    with time_machine.travel(T0 + timedelta(days=2, hours=1), tick=True):
        service.invoke_schedule()
        assert (-10, "expire", None) in [(d, r, h) for d, r, h in ledger(user)], ledger(user)
        assert [e["lotId"] for e in service.events.of_type("CreditsExpired") if e["userId"] == user] == [lot]


def test_the_sweep_releases_every_due_hold_not_only_the_first_sixteen(sweep_tables: Any, ids: Any) -> None:
    """release_due releases 16 holds per rewrite and leaves holdDue (so byDue) at the 17th's expiry,
    which is behind the sweep's position by the next run: the sweep never comes back for the rest."""
    service = sweep_tables
    user, group = ids("u"), ids("g")
    with time_machine.travel(T0, tick=True):
        grant(service, user, group, 1000)
        placed = [hold(service, user, group, 10, ttlSeconds=60) for _ in range(20)]
        assert all(reply.status == 201 for reply in placed), [r.body for r in placed]
    for minutes in (10, 20, 30):
        with time_machine.travel(T0 + timedelta(minutes=minutes), tick=True):
            service.invoke_schedule()
    released = [h for d, r, h in ledger(user) if r == "release"]
    assert len(released) == 20, len(released)
    with time_machine.travel(T0 + timedelta(minutes=31), tick=True):
        credits = service.call("GET", f"/users/{user}/credits", iam=True).body
        assert credits["groups"][0]["balance"] == 1000


def test_a_settle_after_the_hold_expired_is_refused_even_with_many_due_holds(service: Any, ids: Any) -> None:
    """README: a hold past its expiresAt was released when it expired, a settle then is 409. With more
    than 16 due holds, release_due stops at 16 and `_close_by_rewrite` settles the 17th instead."""
    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    placed = [hold(service, user, group, 10, ttlSeconds=60).body["holdId"] for _ in range(18)]
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=5), tick=True):
        late = settle(service, user, placed[-1], 10)
        assert late.status == 409, late.body


def test_an_idempotency_key_shaped_like_a_hold_id_is_not_taken_for_a_closed_hold(service: Any, ids: Any) -> None:
    """A keyed hold's record and a closed hold's archive share one key space ("hold#<user>#<x>")."""
    user, group = ids("u"), ids("g")
    grant(service, user, group, 100)
    lookalike = f"{'0' * 20}-5-{group}"
    assert hold(service, user, group, 5, key=lookalike).status == 201
    reply = settle(service, user, lookalike, 5)
    assert reply.status == 404, reply.body



def test_open_holds_are_bounded_and_the_group_stays_writable(local_service: Any, ids: Any) -> None:
    """Each open hold weighs on the balance item (every consume pays by size): past MAX_OPEN, 409."""
    service = local_service
    user, group = ids("u"), ids("g")
    grant(service, user, group, 100_000, expiresAt=iso(datetime.now(UTC) + timedelta(days=30)))
    placed = []
    for number in range(MAX_OPEN):
        reply = hold(service, user, group, 1, ttlSeconds=86_400)
        assert reply.status == 201, (number, reply.status, reply.body)
        placed.append(reply.body["holdId"])
    refused = hold(service, user, group, 1)
    assert refused.status == 409 and refused.body["error"] == "too_many_holds", refused.body
    assert settle(service, user, placed[0], 1).status == 200
    assert hold(service, user, group, 1).status == 201
    grant(service, user, group, 1)
    balance = service.call("GET", f"/users/{user}/credits", iam=True).body["groups"][0]["balance"]
    assert balance == 100_001 - MAX_OPEN - 1


def test_a_writer_refused_at_the_gate_writes_once_another_has_folded(service: Any, ids: Any, monkeypatch: Any) -> None:
    """16 hold events wait for the book, so a hold is refused at the gate and folds them first. Another
    writer folds before it and writes again (1 event waits): the refused writer must not fold again (a
    rewrite that the other writer's next write would make lose, over and over, until 503), only write."""
    import user_credits.logic.consumption as consumption_logic
    import user_credits.logic.expiry as expiry_logic

    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    for _ in range(16):
        assert hold(service, user, group, 1).status == 201
    real_expire, real_commit, real_rewrite = expiry_logic.expire_group, expiry_logic.commit, expiry_logic.rewrite_group
    own_commits: list[None] = []
    mine = {"on": False}

    def counted_commit(build: Any) -> None:
        if mine["on"]:
            own_commits.append(None)
        real_commit(build)

    def counted_rewrite(*args: Any, **kwargs: Any) -> Any:
        # A fold is a rewrite without a transaction: counted as one all the same.
        if mine["on"]:
            own_commits.append(None)
        return real_rewrite(*args, **kwargs)

    def expire_after_another_writer(user_id: str, offer_group: str, now: datetime, **kwargs: Any) -> Any:
        if not mine["on"]:
            real_expire(user_id, offer_group, now)  # the other writer's fold ...
            assert hold(service, user, group, 1).status == 201  # ... and its next write
        mine["on"] = True
        try:
            return real_expire(user_id, offer_group, now, **kwargs)
        finally:
            mine["on"] = False

    monkeypatch.setattr(expiry_logic, "commit", counted_commit)
    monkeypatch.setattr(expiry_logic, "rewrite_group", counted_rewrite)
    monkeypatch.setattr(consumption_logic.expiry, "expire_group", expire_after_another_writer)
    placed = hold(service, user, group, 1)
    assert placed.status == 201, placed.body
    assert own_commits == []
    assert [remaining for _lot, remaining in lots(service, user, group)] == [1000 - 18]
    assert [reason for _delta, reason, _hold in ledger(user)].count("hold") == 18


def test_a_settle_refused_at_the_gate_closes_plainly_once_another_has_folded(
        service: Any, ids: Any, monkeypatch: Any) -> None:
    """The settle's side of the same race: refused at the gate, it reads the group for a rewrite, but
    another writer folded meanwhile and wrote again: the settle closes with its one plain write."""
    import user_credits.logic.expiry as expiry_logic
    import user_credits.logic.holds as holds_logic

    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    hold_id = hold(service, user, group, 10).body["holdId"]
    for _ in range(15):
        assert hold(service, user, group, 1).status == 201
    real_read, real_commit, real_rewrite = holds_logic.read_group, holds_logic.commit, holds_logic.rewrite_group
    raced: list[Any] = []
    rewrites: list[None] = []

    def counted_rewrite(*args: Any, **kwargs: Any) -> Any:
        rewrites.append(None)
        return real_rewrite(*args, **kwargs)

    def read_after_another_writer(*args: Any) -> Any:
        if not raced:
            expiry_logic.expire_group(user, group, datetime.now(UTC))  # the other writer's fold ...
            raced.append(hold(service, user, group, 1))  # ... and its next write
        return real_read(*args)

    def counted_commit(build: Any) -> None:
        rewrites.append(None)
        real_commit(build)

    monkeypatch.setattr(holds_logic, "read_group", read_after_another_writer)
    monkeypatch.setattr(holds_logic, "commit", counted_commit)
    monkeypatch.setattr(holds_logic, "rewrite_group", counted_rewrite)
    settled = settle(service, user, hold_id, 4)
    assert raced[0].status == 201, raced[0].body
    assert settled.status == 200 and settled.body["released"] == 6, settled.body
    assert rewrites == []
    assert [remaining for _lot, remaining in lots(service, user, group)] == [1000 - 4 - 16]


def test_a_fold_that_loses_after_preparing_its_book_leaves_the_group_whole(
        service: Any, ids: Any, balanced: Any, monkeypatch: Any) -> None:
    """A fold is plain writes: its book prepared on the book item, then the balance swung to it. Another
    writer folds and writes in between: the first one's swing fails its guard, it reads again (its gate
    is open now) and writes; its prepared book, never swung to, is dropped by the other's promotion."""
    import user_credits.store.balances as balances
    from user_credits.logic import expiry

    user, group = ids("u"), ids("g")
    grant(service, user, group, 1000)
    for _ in range(15):
        assert settle(service, user, hold(service, user, group, 2).body["holdId"], 1).status == 200
    assert hold(service, user, group, 2).status == 201  # 16 holds wait: the gate is shut
    real_write, real_swing = balances._write, balances._swing
    raced: list[Any] = []
    lost: list[None] = []

    def swing(*args: Any) -> None:
        try:
            real_swing(*args)
        except balances.StaleRead:
            lost.append(None)
            raise

    def write_then_race(model: Any, *args: Any) -> None:
        real_write(model, *args)
        if model is balances.BookRecord and not raced:
            raced.append(None)
            expiry.expire_group(user, group, datetime.now(UTC))  # the other writer's fold ...
            raced.append(hold(service, user, group, 3))          # ... and its next write

    monkeypatch.setattr(balances, "_write", write_then_race)
    monkeypatch.setattr(balances, "_swing", swing)
    placed = hold(service, user, group, 4)
    monkeypatch.setattr(balances, "_write", real_write)
    assert raced[1].status == 201, raced[1].body
    assert lost == [None]  # the first fold's swing lost to the other writer's
    assert placed.status == 201 and placed.body["balance"] == 1000 - 15 - 2 - 3 - 4, placed.body
    assert [remaining for _lot, remaining in lots(service, user, group)] == [1000 - 15 - 2 - 3 - 4]
    balanced(user)
    state = balances.read_group(user, group)
    assert state.book_item_version == state.book_version
    assert state.prepared == ()


def test_a_fold_that_loses_its_swing_to_a_consume_drops_the_book_it_prepared(
        service: Any, ids: Any, balanced: Any, monkeypatch: Any) -> None:
    """Found in review: the sweep's warning is a fold too, and on a hot balance consumes keep moving `seq`
    between its prepared book and its swing. A fold that loses must drop what it prepared, or every
    attempt of every run leaves a copy of the book on the book item (until it outgrows DynamoDB's 400 KB)."""
    from test_holds import consume

    import user_credits.store.balances as balances
    from user_credits.errors import ServiceBusy
    from user_credits.logic import expiry

    user, group = ids("u"), ids("g")
    now = datetime.now(UTC)
    grant(service, user, group, 100, expiresAt=iso(now + timedelta(days=1)))
    real_write = balances._write
    raced: list[None] = []

    def write_then_consume(model: Any, *args: Any) -> None:
        real_write(model, *args)
        preparing = [action for action in args[2] if type(action).__name__ == "SetAction"
                     and balances.PREPARED in str(action)]
        if model is balances.BookRecord and preparing:
            raced.append(None)
            assert consume(service, user, group, 1).status == 200  # seq moves under the fold's read

    monkeypatch.setattr(balances, "_write", write_then_consume)
    with pytest.raises(ServiceBusy):
        expiry.warn_group(user, group, now, now + timedelta(days=2))  # every attempt loses its swing
    monkeypatch.setattr(balances, "_write", real_write)
    assert len(raced) == 12
    state = balances.read_group(user, group)
    assert state.prepared == ()
    assert len(expiry.warn_group(user, group, now, now + timedelta(days=2))) == 1
    state = balances.read_group(user, group)
    assert state.prepared == () and state.book_item_version == state.book_version
    assert state.balance == 100 - 12
    balanced(user)
