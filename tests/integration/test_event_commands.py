"""`parley events tail | dlq list | dlq replay` against real Redis: through `cli.main` in this process,
and through the installed `parley` console script in a child process.

Every stream, group and key is unique to its test (the Redis database is shared with concurrent
runs); every wait is bounded by `DEADLINE_S`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC

import pytest
from redis.asyncio import Redis

from parley.events.v1 import events_pb2
from runtime import cli
from services.common.consumers import Consumer, RedisProcessedEvents, RedisStreamSource, dlq_key
from services.common.streams import encode_entry, stream_key
from tests.support.gateway import free_port
from tests.support.parley_process import PARLEY, REPO_ROOT
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.redis

DEADLINE_S = 30.0
SECRET_TOKEN = "single-use-token-4f1c9a"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass(frozen=True)
class Completed:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


@dataclass
class World:
    """A source (its stream) and a consumer group unique to the test, on a real Redis."""

    redis: Redis
    redis_url: str
    source: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:12]}")
    group: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:12]}")
    handled: list[str] = field(default_factory=list)
    failing: bool = True

    @property
    def stream(self) -> str:
        return stream_key(self.source)

    @property
    def key_prefix(self) -> str:
        return f"parley-test:{self.group}:"

    async def publish(self, *events: events_pb2.Event, stream: str | None = None) -> list[str]:
        ids = []
        for event in events:
            entry_id = await self.redis.xadd(stream or self.stream, encode_entry(event))  # type: ignore[arg-type]
            ids.append(entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
        return ids

    async def handler(self, event: events_pb2.Event) -> None:
        if self.failing:
            raise RuntimeError(f"template missing for {event.id}")
        self.handled.append(event.id)

    def source_of_group(self) -> RedisStreamSource:
        return RedisStreamSource(self.redis, stream=self.stream, group=self.group)

    def consumer(self) -> Consumer:
        source = self.source_of_group()
        processed = RedisProcessedEvents(self.redis, ttl_s=600, key_prefix=self.key_prefix)
        return Consumer(
            self.group, self.handler, source, processed, member="m1", max_attempts=1, block_s=0.05
        )

    async def dead_letter(self, *events: events_pb2.Event) -> None:
        """Publish the events and let a consumer whose handler always fails dead-letter them."""
        await self.publish(*events)
        consumer = self.consumer()
        settled = 0
        async with asyncio.timeout(DEADLINE_S):
            while settled < len(events):
                settled += await consumer.poll_once(block_s=0.05)
        assert await self.redis.xlen(dlq_key(self.group)) == len(events)

    async def handle_until(self, event_ids: set[str]) -> None:
        consumer = self.consumer()
        async with asyncio.timeout(DEADLINE_S):
            while not event_ids <= set(self.handled):
                await consumer.poll_once(block_s=0.05)


@pytest.fixture
async def world(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setenv("PARLEY_REDIS_URL", redis_url)
    client = Redis.from_url(redis_url)
    world = World(client, redis_url)
    try:
        yield world
    finally:
        await delete_namespace(client, world.key_prefix, world.stream, dlq_key(world.group))
        await client.aclose()


async def parley_events(capsys: pytest.CaptureFixture[str], *args: str) -> Completed:
    """`parley events <args>` through `cli.main`, in a thread: it runs its own event loop."""
    capsys.readouterr()
    exit_code = await asyncio.to_thread(cli.main, ["events", *args])
    captured = capsys.readouterr()
    return Completed(exit_code, captured.out, captured.err)


def child_environment(**extra: str) -> dict[str, str]:
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("PARLEY_")}
    return {**inherited, **extra}


async def parley_events_process(*args: str, env: dict[str, str]) -> Completed:
    process = await asyncio.create_subprocess_exec(
        str(PARLEY),
        "events",
        *args,
        env=env,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Completed(process.returncode, out.decode(), err.decode())


def user_registered(user: str) -> events_pb2.Event:
    event = events_pb2.Event(id=str(uuid.uuid4()), type="user.registered", source="auth", subject=user)
    event.time.GetCurrentTime()
    event.trace_context.traceparent = TRACEPARENT
    event.user_registered.CopyFrom(events_pb2.UserRegistered(user_id=user, email=f"{user}@example.com"))
    return event


def email_requested(user: str) -> events_pb2.Event:
    event = events_pb2.Event(id=str(uuid.uuid4()), type="email.requested", source="auth", subject=user)
    event.time.GetCurrentTime()
    event.email_requested.CopyFrom(
        events_pb2.EmailRequested(
            template="verify_email",
            recipient=f"{user}@example.com",
            user_id=user,
            params={"token": SECRET_TOKEN, "display_name": "Ada"},
        )
    )
    return event


# ---- tail ------------------------------------------------------------------------------------------


async def test_tail_prints_the_newest_entries_oldest_first_without_email_params(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    older, registered, mail = user_registered("u-0"), user_registered("u-1"), email_requested("u-2")
    _, registered_entry, mail_entry = await world.publish(older, registered, mail)

    result = await parley_events(capsys, "tail", "--source", world.source, "--count", "2")

    assert result.exit_code == 0, result.stderr
    assert len(result.lines) == 2
    stream, entry_id, time, event_type, event_id, subject, trace_id = result.lines[0].split()
    assert (stream, entry_id, event_type, event_id, subject, trace_id) == (
        world.stream,
        registered_entry,
        "user.registered",
        registered.id,
        "u-1",
        "4bf92f3577b34da6a3ce929d0e0e4736",
    )
    assert time == registered.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")
    stream, entry_id, _time, event_type, event_id, subject, trace_id = result.lines[1].split()
    assert (stream, entry_id, event_type, event_id, subject, trace_id) == (
        world.stream,
        mail_entry,
        "email.requested",
        mail.id,
        "u-2",
        "-",  # no trace context
    )
    assert SECRET_TOKEN not in result.stdout + result.stderr

    as_json = await parley_events(capsys, "tail", "--source", world.source, "--count", "2", "--json")

    assert as_json.exit_code == 0, as_json.stderr
    first, second = (json.loads(line) for line in as_json.lines)
    assert first["id"] == registered.id
    assert first["traceContext"]["traceparent"] == TRACEPARENT
    assert second["id"] == mail.id
    assert second["emailRequested"]["params"] == {"token": "[redacted]", "display_name": "[redacted]"}
    assert second["emailRequested"]["template"] == "verify_email"
    assert SECRET_TOKEN not in as_json.stdout + as_json.stderr


async def test_tail_reports_a_malformed_entry_on_stderr_and_goes_on(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    await world.redis.xadd(world.stream, {"event_id": "x", "type": "user.registered"})
    [good_entry] = await world.publish(user_registered("u-1"))

    result = await parley_events(capsys, "tail", "--source", world.source)

    assert result.exit_code == 0
    assert [line.split()[1] for line in result.lines] == [good_entry]
    assert "not a well-formed event" in result.stderr
    assert "lacks the field(s) event" in result.stderr


async def test_tail_follow_in_a_real_process_prints_new_entries_of_every_stream_until_ctrl_c(
    world: World,
) -> None:
    other = World(world.redis, world.redis_url)
    await world.publish(user_registered("before"))
    await other.publish(user_registered("before"), stream=other.stream)
    process = await asyncio.create_subprocess_exec(
        str(PARLEY),
        "events",
        "tail",
        "--follow",
        "--count",
        "1",
        env=child_environment(PARLEY_REDIS_URL=world.redis_url),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stderr is not None
        async with asyncio.timeout(DEADLINE_S):
            # Printed once the newest entries are: whatever is added from now on is new.
            announcement = (await process.stderr.readline()).decode()
        assert announcement.startswith("following every parley:events:* stream (")
        mail, registered = email_requested("u-new"), user_registered("u-new")
        await world.publish(mail)
        await other.publish(registered, stream=other.stream)
        seen: dict[str, str] = {}
        async with asyncio.timeout(DEADLINE_S):
            while {mail.id, registered.id} - seen.keys():
                line = (await process.stdout.readline()).decode()
                assert line, "the follower stopped early"
                columns = line.split()
                if columns[4] in (mail.id, registered.id):
                    seen[columns[4]] = columns[0]
        assert seen == {mail.id: world.stream, registered.id: other.stream}
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(DEADLINE_S):
            _, err = await process.communicate()
        assert process.returncode == 130
        assert "Traceback" not in err.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await world.redis.delete(other.stream)


# ---- dlq -------------------------------------------------------------------------------------------


async def test_dlq_list_shows_what_a_real_consumer_dead_lettered(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    mail = email_requested("u-1")
    await world.dead_letter(mail)
    [dead] = await world.source_of_group().dead_letters()

    result = await parley_events(capsys, "dlq", "list", "--consumer", world.group)

    assert result.exit_code == 0, result.stderr
    [line] = result.lines
    columns = line.split("  ")
    assert columns[:5] == [dead.dead_letter_id, mail.id, "email.requested", world.stream, "attempts=1"]
    assert columns[6] == f"RuntimeError: template missing for {mail.id}"
    assert SECRET_TOKEN not in result.stdout

    as_json = await parley_events(capsys, "dlq", "list", "--consumer", world.group, "--json")

    [record] = [json.loads(line) for line in as_json.lines]
    assert record == {
        "id": dead.dead_letter_id,
        "event_id": mail.id,
        "type": "email.requested",
        "stream": world.stream,
        "attempts": 1,
        "failed_at": dead.failed_at.isoformat(timespec="milliseconds"),
        "error": f"RuntimeError: template missing for {mail.id}",
    }


async def test_dlq_list_of_a_consumer_without_dead_letters_says_so(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await parley_events(capsys, "dlq", "list", "--consumer", world.group)

    assert (result.exit_code, result.stdout) == (0, "")
    assert f"no dead letters in {dlq_key(world.group)}" in result.stderr


async def test_replay_by_id_puts_the_event_back_and_the_consumer_handles_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = user_registered("u-1"), user_registered("u-2")
    await world.dead_letter(first, second)
    listing = await parley_events(capsys, "dlq", "list", "--consumer", world.group)
    dead_ids = {line.split()[1]: line.split()[0] for line in listing.lines}

    result = await parley_events(capsys, "dlq", "replay", dead_ids[first.id], "--consumer", world.group)

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"replayed 1 dead letter(s) of consumer {world.group}\n"
    world.failing = False  # the fix
    await world.handle_until({first.id})
    assert world.handled == [first.id]
    remaining = await parley_events(capsys, "dlq", "list", "--consumer", world.group)
    assert [line.split()[1] for line in remaining.lines] == [second.id]


async def test_replay_all_in_a_real_process_puts_every_dead_letter_back(world: World) -> None:
    events = [user_registered(f"u-{index}") for index in range(3)]
    await world.dead_letter(*events)

    result = await parley_events_process(
        "dlq",
        "replay",
        "--all",
        "--consumer",
        world.group,
        env=child_environment(PARLEY_REDIS_URL=world.redis_url),
    )

    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"replayed 3 dead letter(s) of consumer {world.group}\n"
    assert await world.redis.xlen(dlq_key(world.group)) == 0
    world.failing = False
    await world.handle_until({event.id for event in events})
    assert sorted(world.handled) == sorted(event.id for event in events)


async def test_replaying_an_unknown_or_malformed_id_fails_clearly(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = await parley_events(capsys, "dlq", "replay", "1-0", "--consumer", world.group)

    assert unknown.exit_code == 1
    assert unknown.stdout == ""
    assert unknown.stderr == f"no dead letter 1-0 in {dlq_key(world.group)}\n"

    # A bare millisecond would make XRANGE pick every entry of that millisecond.
    malformed = await parley_events(capsys, "dlq", "replay", "1718000000000", "--consumer", world.group)

    assert malformed.exit_code == 2
    assert "is not a dead-letter id" in malformed.stderr


# ---- misconfiguration and outages ------------------------------------------------------------------


# Without Redis, `dlq list|replay` work on the embedded database (tests/integration/test_dead_letters.py).
@pytest.mark.parametrize("args", [["tail"]], ids=["tail"])
async def test_without_a_redis_url_the_commands_explain_embedded_mode(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PARLEY_REDIS_URL", raising=False)

    result = await parley_events(capsys, *args)

    assert result.exit_code == 2
    assert result.stdout == ""
    assert "PARLEY_REDIS_URL is not set" in result.stderr
    assert "embedded mode (`parley up`) keeps no Redis streams" in result.stderr


@pytest.mark.parametrize(
    "args", [["tail"], ["dlq", "list"], ["dlq", "replay", "--all"]], ids=["tail", "list", "replay"]
)
async def test_an_unreachable_redis_is_one_line_on_stderr(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PARLEY_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")

    result = await parley_events(capsys, *args)

    assert result.exit_code == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("cannot reach Redis (PARLEY_REDIS_URL): ConnectionError:")


async def test_an_unreachable_redis_shows_no_traceback_in_a_real_process() -> None:
    result = await parley_events_process(
        "tail", env=child_environment(PARLEY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    )

    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("cannot reach Redis (PARLEY_REDIS_URL): ConnectionError:")
