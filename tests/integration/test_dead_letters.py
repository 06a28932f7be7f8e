"""Embedded mode's dead letters in the database (`SqlDeadLetters`), on SQLite and PostgreSQL, and
`parley events dlq list | replay` on an embedded data dir (through `cli.main`, no Redis)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from parley.events.v1 import events_pb2
from runtime import cli
from services.common.clock import utc_now
from services.common.consumers import DeadLetter
from services.common.db import Database
from services.common.dead_letters import SqlDeadLetters
from services.common.migrate import upgrade_async
from services.common.outbox import OutboxEvent, OutboxRelay, add_event
from services.common.streams import MalformedStreamEntry
from tests.support.gateway import free_port

EMAIL = "email"
ANALYTICS = "analytics"


class RecordingDispatcher:
    """Delivers into a list; `during_dispatch` runs inside the dispatch, before the relay marks rows."""

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.during_dispatch: list[Coroutine[Any, Any, None]] = []

    async def dispatch(self, events: Sequence[events_pb2.Event]) -> None:
        self.delivered.extend(event.id for event in events)
        while self.during_dispatch:
            await self.during_dispatch.pop(0)


async def commit_event(database: Database, user: str = "ada") -> events_pb2.Event:
    async with database.unit_of_work() as session:
        return add_event(
            session,
            source="auth",
            subject=user,
            payload=events_pb2.UserRegistered(user_id=user, email=f"{user}@example.com"),
        )


def dead_letter_of(
    event: events_pb2.Event, *, error: str = "RuntimeError: boom", attempts: int = 3
) -> DeadLetter:
    return DeadLetter(
        dead_letter_id="",
        event_id=event.id,
        stream="parley:events:embedded",
        error=error,
        attempts=attempts,
        failed_at=datetime(2026, 11, 26, 9, 30, 0, 125000, tzinfo=UTC),
        event=event.SerializeToString(),
    )


async def outbox_rows(database: Database, event_id: str) -> list[OutboxEvent]:
    async with database.unit_of_work(read_only=True) as session:
        return list(await session.scalars(select(OutboxEvent).where(OutboxEvent.event_id == event_id)))


async def relayed(database: Database, dispatcher: RecordingDispatcher) -> int:
    relay = OutboxRelay(database, dispatcher)
    total = 0
    while count := await relay.relay_once():
        total += count
    return total


async def test_dead_letters_are_listed_oldest_first_per_consumer(database: Database) -> None:
    store = SqlDeadLetters(database)
    first, second, other = [await commit_event(database, user) for user in ("a", "b", "c")]
    first_id = await store.add(EMAIL, dead_letter_of(first, error="SmtpRefused: 550 no such user"))
    second_id = await store.add(EMAIL, dead_letter_of(second, attempts=5))
    await store.add(ANALYTICS, dead_letter_of(other))

    listed = await store.list(EMAIL)

    assert [dead.dead_letter_id for dead in listed] == [first_id, second_id]
    assert int(first_id) < int(second_id)
    [oldest, newest] = listed
    assert oldest.error == "SmtpRefused: 550 no such user"
    assert newest.attempts == 5
    assert oldest.stream == "parley:events:embedded"
    assert oldest.failed_at == datetime(2026, 11, 26, 9, 30, 0, 125000, tzinfo=UTC)
    assert oldest.failed_at.tzinfo is UTC
    assert events_pb2.Event.FromString(oldest.event).subject == "a"
    assert [dead.event_id for dead in await store.list(ANALYTICS)] == [other.id]
    assert await store.list("nobody") == []


async def test_take_deletes_and_returns_one_or_all_of_a_consumers_letters(database: Database) -> None:
    store = SqlDeadLetters(database)
    events = [await commit_event(database, f"u{index}") for index in range(3)]
    ids = [await store.add(EMAIL, dead_letter_of(event)) for event in events]
    analytics_id = await store.add(ANALYTICS, dead_letter_of(events[0]))

    [taken] = await store.take(EMAIL, ids[1])
    assert (taken.dead_letter_id, taken.event_id) == (ids[1], events[1].id)
    assert [dead.dead_letter_id for dead in await store.list(EMAIL)] == [ids[0], ids[2]]
    # Unknown, malformed, already taken, or another consumer's: nothing is taken.
    for unknown in ("999999", "abc", "-1", "", ids[1], analytics_id):
        assert await store.take(EMAIL, unknown) == []

    assert [dead.event_id for dead in await store.take(EMAIL)] == [events[0].id, events[2].id]
    assert await store.list(EMAIL) == []
    assert [dead.dead_letter_id for dead in await store.list(ANALYTICS)] == [analytics_id]


async def test_ids_of_taken_letters_are_never_given_again(database: Database) -> None:
    store = SqlDeadLetters(database)
    event = await commit_event(database)
    first = await store.add(EMAIL, dead_letter_of(event))
    await store.take(EMAIL, first)

    assert int(await store.add(EMAIL, dead_letter_of(event))) > int(first)


async def test_requeue_replaces_the_relayed_row_with_an_unrelayed_one(database: Database) -> None:
    store = SqlDeadLetters(database)
    event = await commit_event(database)
    dispatcher = RecordingDispatcher()
    assert await relayed(database, dispatcher) == 1
    [old_row] = await outbox_rows(database, event.id)
    dead_letter_id = await store.add(EMAIL, dead_letter_of(event))

    assert await store.requeue_in_outbox(EMAIL, dead_letter_id) == 1

    [row] = await outbox_rows(database, event.id)
    assert row.relayed_at is None
    assert (row.attempts, row.next_attempt_at, row.last_error, row.deliver_after) == (0, None, None, None)
    assert row.sequence > old_row.sequence
    assert (row.source, row.event_type, row.subject) == (old_row.source, old_row.event_type, old_row.subject)
    assert events_pb2.Event.FromString(row.payload) == event
    # Written now, so the outbox lag counts from the replay, not from when the event first occurred.
    assert row.occurred_at >= old_row.occurred_at
    assert await store.list(EMAIL) == []
    assert await relayed(database, dispatcher) == 1
    assert dispatcher.delivered == [event.id, event.id]


async def test_requeue_re_inserts_an_event_whose_row_was_pruned(database: Database) -> None:
    store = SqlDeadLetters(database)
    event = await commit_event(database)
    await relayed(database, RecordingDispatcher())
    dead_letter_id = await store.add(EMAIL, dead_letter_of(event))
    async with database.unit_of_work() as session:
        await session.execute(delete(OutboxEvent))

    assert await store.requeue_in_outbox(EMAIL, dead_letter_id) == 1

    [row] = await outbox_rows(database, event.id)
    assert (row.source, row.event_type, row.subject) == ("auth", "user.registered", "ada")
    assert row.relayed_at is None
    dispatcher = RecordingDispatcher()
    assert await relayed(database, dispatcher) == 1
    assert dispatcher.delivered == [event.id]


async def test_requeue_of_an_unknown_id_changes_nothing(database: Database) -> None:
    store = SqlDeadLetters(database)
    event = await commit_event(database)
    await relayed(database, RecordingDispatcher())
    dead_letter_id = await store.add(EMAIL, dead_letter_of(event))

    for unknown in ("999999", "not-a-number"):
        assert await store.requeue_in_outbox(EMAIL, unknown) == 0
    assert await store.requeue_in_outbox(ANALYTICS, dead_letter_id) == 0  # another consumer's id

    [row] = await outbox_rows(database, event.id)
    assert row.relayed_at is not None
    assert [dead.dead_letter_id for dead in await store.list(EMAIL)] == [dead_letter_id]


async def test_requeue_all_takes_only_that_consumers_letters(database: Database) -> None:
    store = SqlDeadLetters(database)
    mine = [await commit_event(database, f"mine{index}") for index in range(2)]
    theirs = await commit_event(database, "theirs")
    await relayed(database, RecordingDispatcher())
    for event in mine:
        await store.add(EMAIL, dead_letter_of(event))
    await store.add(ANALYTICS, dead_letter_of(theirs))

    assert await store.requeue_in_outbox(EMAIL) == 2

    dispatcher = RecordingDispatcher()
    assert await relayed(database, dispatcher) == 2
    assert dispatcher.delivered == [event.id for event in mine]
    assert await store.list(EMAIL) == []
    assert [dead.event_id for dead in await store.list(ANALYTICS)] == [theirs.id]


async def test_an_event_dead_lettered_twice_is_requeued_once(database: Database) -> None:
    store = SqlDeadLetters(database)
    event = await commit_event(database)
    await store.add(EMAIL, dead_letter_of(event))
    await store.add(EMAIL, dead_letter_of(event))

    assert await store.requeue_in_outbox(EMAIL) == 2

    assert len(await outbox_rows(database, event.id)) == 1
    assert await store.list(EMAIL) == []


async def test_a_letter_without_a_decodable_event_is_refused_and_kept(database: Database) -> None:
    store = SqlDeadLetters(database)
    event = await commit_event(database)
    broken = DeadLetter(
        "", event.id, "parley:events:embedded", "MalformedStreamEntry: x", 1, utc_now(), b"\xff\xff"
    )
    dead_letter_id = await store.add(EMAIL, broken)

    with pytest.raises(MalformedStreamEntry, match=f"dead letter {dead_letter_id} holds no decodable event"):
        await store.requeue_in_outbox(EMAIL, dead_letter_id)

    assert [dead.dead_letter_id for dead in await store.list(EMAIL)] == [dead_letter_id]
    [row] = await outbox_rows(database, event.id)
    assert row.relayed_at is None  # the original row, untouched


async def test_a_requeue_while_the_relay_marks_the_old_row_is_not_lost(database: Database) -> None:
    """The relay hands an event out, the consumer dead-letters it, and the operator replays it before
    the relay marks the row relayed: the requeued event must still be delivered."""
    store = SqlDeadLetters(database)
    event = await commit_event(database)

    async def dead_lettered_and_replayed_meanwhile() -> None:
        dead_letter_id = await store.add(EMAIL, dead_letter_of(event))
        assert await store.requeue_in_outbox(EMAIL, dead_letter_id) == 1

    dispatcher = RecordingDispatcher()
    dispatcher.during_dispatch.append(dead_lettered_and_replayed_meanwhile())
    relay = OutboxRelay(database, dispatcher)
    await relay.relay_once()

    [row] = await outbox_rows(database, event.id)
    assert row.relayed_at is None
    assert await relay.relay_once() == 1
    assert dispatcher.delivered == [event.id, event.id]


# ---- `parley events dlq` on an embedded data dir ----------------------------------------------------


@dataclass(frozen=True)
class Completed:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PARLEY_REDIS_URL", "PARLEY_DATABASE_URL", "PARLEY_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def embedded_database(tmp_path: Path) -> Database:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite+aiosqlite:///{data_dir / 'parley.db'}"
    await upgrade_async(url)
    return Database(url)


async def parley_events(capsys: pytest.CaptureFixture[str], *args: str) -> Completed:
    """`parley events <args>` through `cli.main`, in a thread: it runs its own event loop."""
    capsys.readouterr()
    exit_code = await asyncio.to_thread(cli.main, ["events", *args])
    captured = capsys.readouterr()
    return Completed(exit_code, captured.out, captured.err)


@pytest.mark.usefixtures("no_redis")
async def test_dlq_list_and_replay_work_on_the_data_dir(
    embedded_database: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = str(tmp_path / "data")
    store = SqlDeadLetters(embedded_database)
    try:
        first, second = await commit_event(embedded_database, "a"), await commit_event(embedded_database, "b")
        await relayed(embedded_database, RecordingDispatcher())
        first_id = await store.add(EMAIL, dead_letter_of(first, error="line one\nline two"))
        await store.add(EMAIL, dead_letter_of(second))

        listed = await parley_events(capsys, "dlq", "list", "--data-dir", data_dir, "--json")
        assert listed.exit_code == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert rows[0] == {
            "id": first_id,
            "event_id": first.id,
            "type": "user.registered",
            "stream": "parley:events:embedded",
            "attempts": 3,
            "failed_at": "2026-11-26T09:30:00.125+00:00",
            "error": "line one\nline two",
        }
        assert [row["event_id"] for row in rows] == [first.id, second.id]
        plain = await parley_events(capsys, "dlq", "list", "--data-dir", data_dir)
        assert plain.stdout.splitlines()[0] == "  ".join(
            (
                first_id,
                first.id,
                "user.registered",
                "parley:events:embedded",
                "attempts=3",
                "2026-11-26T09:30:00.125+00:00",
                "line one\\nline two",
            )
        )

        one = await parley_events(capsys, "dlq", "replay", first_id, "--data-dir", data_dir)
        assert (one.exit_code, one.stdout) == (0, "replayed 1 dead letter(s) of consumer email\n")
        again = await parley_events(capsys, "dlq", "replay", first_id, "--data-dir", data_dir)
        assert again.exit_code == 1
        assert f"no dead letter {first_id} of email" in again.stderr
        malformed = await parley_events(capsys, "dlq", "replay", "1718000000000-0", "--data-dir", data_dir)
        assert malformed.exit_code == 2
        assert "is not a dead-letter id" in malformed.stderr

        every = await parley_events(capsys, "dlq", "replay", "--all", "--data-dir", data_dir)
        assert (every.exit_code, every.stdout) == (0, "replayed 1 dead letter(s) of consumer email\n")
        empty = await parley_events(capsys, "dlq", "list", "--data-dir", data_dir)
        assert (empty.exit_code, empty.stdout) == (0, "")
        assert "no dead letters of email" in empty.stderr

        dispatcher = RecordingDispatcher()
        assert await relayed(embedded_database, dispatcher) == 2
        assert sorted(dispatcher.delivered) == sorted([first.id, second.id])
    finally:
        await embedded_database.dispose()


async def test_dlq_reads_the_data_dir_of_the_environment_without_redis(
    embedded_database: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("PARLEY_REDIS_URL", raising=False)
    monkeypatch.delenv("PARLEY_DATABASE_URL", raising=False)
    monkeypatch.setenv("PARLEY_DATA_DIR", str(tmp_path / "data"))
    try:
        event = await commit_event(embedded_database)
        dead_letter_id = await SqlDeadLetters(embedded_database).add(EMAIL, dead_letter_of(event))
    finally:
        await embedded_database.dispose()

    listed = await parley_events(capsys, "dlq", "list")

    assert listed.exit_code == 0, listed.stderr
    assert listed.stdout.startswith(f"{dead_letter_id}  {event.id}  user.registered  ")


@pytest.mark.usefixtures("no_redis")
@pytest.mark.parametrize("args", [["dlq", "list"], ["dlq", "replay", "--all"]], ids=["list", "replay"])
async def test_a_data_dir_without_a_database_is_refused_not_created(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"

    result = await parley_events(capsys, *args, "--data-dir", str(missing))

    assert (result.exit_code, result.stdout) == (2, "")
    assert f"no embedded database at {missing / 'parley.db'}" in result.stderr
    assert not missing.exists()


@pytest.mark.usefixtures("no_redis")
async def test_tail_without_redis_points_at_the_outbox(capsys: pytest.CaptureFixture[str]) -> None:
    result = await parley_events(capsys, "tail")

    assert (result.exit_code, result.stdout) == (2, "")
    assert "PARLEY_REDIS_URL is not set" in result.stderr
    assert "outbox" in result.stderr


@pytest.mark.usefixtures("no_redis")
async def test_an_unreachable_database_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"

    result = await parley_events(capsys, "dlq", "list", "--database-url", url)

    assert (result.exit_code, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("cannot use the dead_letters table of postgresql+asyncpg://")
