"""`parley events …`: operator commands on the event pipeline.

- `tail` prints the newest entries of one source's stream (`--source auth`) or of every
  `parley:events:*` stream, and with `--follow` keeps printing new ones until Ctrl-C.
- `dlq list` prints a consumer group's dead letters; `dlq replay` puts one (or all) back where it
  came from.

Microservices mode keeps streams and dead letters in Redis (PARLEY_REDIS_URL): `dlq` goes through
`RedisStreamSource.dead_letters` and `RedisStreamSource.replay`. Embedded mode (`parley up`) keeps
no Redis streams: its outbox relay hands events to in-process consumers, and their dead letters are
rows of its database (`SqlDeadLetters`), replayed by putting the event back in the outbox. `dlq`
works on that database when `--data-dir` or `--database-url` is given or PARLEY_REDIS_URL is not
set (embedded mode may use Redis for rate limits, and its dead letters are still in its database);
`tail` needs Redis, and says so when PARLEY_REDIS_URL is missing.

Nothing read_after here holds `EmailRequested.params`: they may carry single-use tokens (verification,
password reset), and terminals end up in scrollback, screenshots and tickets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, Final, TextIO

from google.protobuf.json_format import MessageToJson
from google.protobuf.message import DecodeError
from redis import ConnectionError as RedisConnectionError
from redis import RedisError
from redis import TimeoutError as RedisTimeoutError
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import KeyT, StreamIdT
from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError

from parley.events.v1 import events_pb2
from runtime.command_errors import EXIT_BAD_INPUT, EXIT_FAILED, CommandError
from services.common.consumers import DeadLetter, RedisStreamSource, dlq_key
from services.common.db import Database, DatabaseUnavailable
from services.common.dead_letters import SqlDeadLetters
from services.common.migrate import upgrade_async
from services.common.redis_multiplex import reply_text
from services.common.settings import Settings
from services.common.streams import (
    STREAM_KEY_PREFIX,
    MalformedStreamEntry,
    decode_entry,
    stream_key,
)

# What a shell reports for a command ended by Ctrl-C (128 + SIGINT), as `parley` does for the others.
EXIT_INTERRUPTED: Final = 130

REDACTED: Final = "[redacted]"

# XREAD BLOCK per round while following; the socket timeout must outlast it.
FOLLOW_BLOCK_MS: Final = 1000
FOLLOW_BATCH: Final = 100
# While following every source, look for streams created since at most this often: SCAN walks the
# whole keyspace (idempotency records and cache keys included), too much to do every round.
FOLLOW_DISCOVERY_INTERVAL_S: Final = 30.0
REDIS_TIMEOUT_S: Final = 5.0
_SCAN_PAGE: Final = 1000

# A full stream id. XRANGE would read a bare "<ms>" as every entry of that millisecond, so replay
# accepts only ids that name one entry.
_ENTRY_ID: Final = re.compile(r"\d+-\d+")

NO_REDIS_MESSAGE: Final = (
    "PARLEY_REDIS_URL is not set. `parley events tail` reads the Redis streams of microservices mode; "
    "embedded mode (`parley up`) keeps no Redis streams: read its events in the outbox "
    "(the outbox_events table) instead."
)


@dataclass(frozen=True)
class Output:
    """Where a command writes: the report on `stdout`, problems on `stderr`."""

    stdout: TextIO
    stderr: TextIO

    def line(self, text: str) -> None:
        self.stdout.write(text + "\n")

    def problem(self, text: str) -> None:
        self.stderr.write(text + "\n")


def run_events_command(arguments: argparse.Namespace, settings: Settings, output: Output) -> int:
    """Run the `parley events` action in `arguments`; returns the exit code. Never shows a traceback
    for Redis or the database being down or misconfigured."""
    redis_url = settings.redis_url
    on_database = arguments.events_command == "dlq" and _dead_letters_in_database(arguments, settings)
    if redis_url is None and not on_database:
        output.problem(NO_REDIS_MESSAGE)
        return EXIT_BAD_INPUT
    try:
        if on_database or redis_url is None:
            return asyncio.run(_run_on_database(arguments, settings, output))
        return asyncio.run(_run(arguments, redis_url, output))
    except CommandError as error:
        output.problem(error.message)
        return error.exit_code
    except (RedisConnectionError, RedisTimeoutError) as error:
        output.problem(f"cannot reach Redis (PARLEY_REDIS_URL): {type(error).__name__}: {error}")
        return EXIT_FAILED
    except RedisError as error:
        output.problem(f"Redis refused the command: {type(error).__name__}: {error}")
        return EXIT_FAILED


def stream_client(redis_url: str) -> Redis:
    """A client for reading streams: binary replies (the event field is protobuf), no retries (an
    operator wants to hear at once that Redis is down), and a socket that outlasts XREAD's BLOCK."""
    try:
        return Redis.from_url(
            redis_url,
            decode_responses=False,
            socket_timeout=REDIS_TIMEOUT_S + FOLLOW_BLOCK_MS / 1000,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as error:
        raise CommandError(
            f"PARLEY_REDIS_URL is not a Redis URL: {error}", exit_code=EXIT_BAD_INPUT
        ) from None


async def _run(arguments: argparse.Namespace, redis_url: str, output: Output) -> int:
    client = stream_client(redis_url)
    try:
        if arguments.events_command == "tail":
            with _stopped_by_ctrl_c(install=arguments.follow) as stop:
                return await tail_events(
                    client,
                    output,
                    source=arguments.source,
                    count=arguments.count,
                    follow=arguments.follow,
                    as_json=arguments.json,
                    stop=stop,
                )
        if arguments.dlq_command == "list":
            return await list_dead_letters(
                client, output, consumer=arguments.consumer, as_json=arguments.json
            )
        return await replay_dead_letters(
            client,
            output,
            consumer=arguments.consumer,
            dead_letter_id=None if arguments.all else arguments.dead_letter_id,
        )
    finally:
        await client.aclose()


@contextlib.contextmanager
def _stopped_by_ctrl_c(*, install: bool) -> Iterator[asyncio.Event]:
    """An event set by the first Ctrl-C (when `install`); a second Ctrl-C interrupts at once.

    `--follow` stops between two XREAD rounds instead of relying on task cancellation: on Python
    3.11, redis-py's internal `asyncio.wait_for` can swallow a cancellation, and the follower would
    then run on after Ctrl-C.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_ctrl_c() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)  # back to KeyboardInterrupt for the next one

    # Only the main thread can take signals (a test may run the command in another one).
    installed = install and threading.current_thread() is threading.main_thread()
    if installed:
        loop.add_signal_handler(signal.SIGINT, first_ctrl_c)
    try:
        yield stop
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


# ---- tail ------------------------------------------------------------------------------------------


def redacted(event: events_pb2.Event) -> events_pb2.Event:
    """The event, with every `EmailRequested.params` value replaced by "[redacted]" (keys kept: they
    tell which parameters a template got)."""
    if event.WhichOneof("payload") != "email_requested" or not event.email_requested.params:
        return event
    copy = events_pb2.Event()
    copy.CopyFrom(event)
    for name in list(copy.email_requested.params):  # a map must not change while iterated
        copy.email_requested.params[name] = REDACTED
    return copy


def _order(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def _trace_id(event: events_pb2.Event) -> str:
    # traceparent is "<version>-<trace id>-<parent span id>-<flags>".
    parts = event.trace_context.traceparent.split("-")
    return parts[1] if len(parts) == 4 else "-"


def _entry_line(stream: str, entry_id: str, event: events_pb2.Event) -> str:
    time = (
        event.time.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")
        if event.HasField("time")
        else "-"
    )
    return "  ".join((stream, entry_id, time, event.type, event.id, event.subject or "-", _trace_id(event)))


@dataclass(frozen=True)
class _Entry:
    stream: str
    entry_id: str
    fields: dict[Any, Any]


def _show(entry: _Entry, output: Output, *, as_json: bool) -> None:
    try:
        event = decode_entry(entry.fields)
    except MalformedStreamEntry as error:
        # On stderr, so that stdout stays one event per line for whatever reads it.
        output.problem(f"{entry.stream} {entry.entry_id}: not a well-formed event: {error}")
        return
    if as_json:
        output.line(MessageToJson(redacted(event), indent=None))
    else:
        output.line(_entry_line(entry.stream, entry.entry_id, event))


async def event_streams(client: Redis) -> list[str]:
    """Every `parley:events:*` stream, by name."""
    keys = [
        reply_text(key)
        async for key in client.scan_iter(match=STREAM_KEY_PREFIX + "*", count=_SCAN_PAGE, _type="stream")
    ]
    return sorted(set(keys))


async def _newest(client: Redis, streams: Sequence[str], count: int) -> tuple[list[_Entry], dict[str, str]]:
    """The `count` newest entries across `streams`, oldest first; and the newest entry id of each
    stream ("0-0" when empty), where following it starts: nothing is printed twice or skipped."""
    entries: list[_Entry] = []
    newest_ids: dict[str, str] = {}
    for stream in streams:
        reply: Any = await client.xrevrange(stream, count=count)
        newest_ids[stream] = reply_text(reply[0][0]) if reply else "0-0"
        entries += [
            _Entry(stream, reply_text(entry_id), fields) for entry_id, fields in reply if fields is not None
        ]
    # Entry ids are "<ms>-<seq>" on every stream, so they order entries of different streams by time.
    entries.sort(key=lambda entry: _order(entry.entry_id))
    return entries[-count:], newest_ids


async def tail_events(
    client: Redis,
    output: Output,
    *,
    source: str | None,
    count: int,
    follow: bool = False,
    as_json: bool = False,
    stop: asyncio.Event | None = None,
) -> int:
    """Print the newest `count` entries (one stream, or all), then with `follow` every new one
    until `stop` is set (returns `EXIT_INTERRUPTED` then) or the task is cancelled."""
    streams = [stream_key(source)] if source else await event_streams(client)
    if not streams and not follow:
        output.problem(f"no {STREAM_KEY_PREFIX}* streams in this Redis database")
        return 0
    entries, newest_ids = await _newest(client, streams, count)
    for entry in entries:
        _show(entry, output, as_json=as_json)
    output.stdout.flush()
    if follow:
        # On stderr, like every note to the operator: stdout carries only entries.
        watched = stream_key(source) if source else f"every {STREAM_KEY_PREFIX}* stream ({len(streams)} now)"
        output.problem(f"following {watched}; Ctrl-C to stop")
        output.stderr.flush()
        await _follow(
            client, output, newest_ids, discover=source is None, as_json=as_json, stop=stop or asyncio.Event()
        )
        return EXIT_INTERRUPTED
    return 0


async def _follow(
    client: Redis,
    output: Output,
    last_ids: dict[str, str],
    *,
    discover: bool,
    as_json: bool,
    stop: asyncio.Event,
) -> None:
    """Print new entries until `stop` is set (at most one XREAD BLOCK later) or cancelled."""
    # Per stream, the id of the last entry printed (typed as XREAD takes it).
    read_after: dict[KeyT, StreamIdT] = {}
    read_after.update(last_ids)
    loop = asyncio.get_running_loop()
    discovered_at = loop.time()
    while not stop.is_set():
        if discover and loop.time() - discovered_at >= FOLLOW_DISCOVERY_INTERVAL_S:
            for stream in await event_streams(client):
                # A stream that appeared since the last look holds only entries written since.
                read_after.setdefault(stream, "0-0")
            discovered_at = loop.time()
        if not read_after:
            # Nothing to block on until a stream appears.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOW_BLOCK_MS / 1000):
                    await stop.wait()
            continue
        reply: Any = await client.xread(read_after, count=FOLLOW_BATCH, block=FOLLOW_BLOCK_MS)
        entries = [
            _Entry(reply_text(stream), reply_text(entry_id), fields)
            for stream, stream_entries in reply or []
            for entry_id, fields in stream_entries
            if fields is not None
        ]
        entries.sort(key=lambda entry: _order(entry.entry_id))
        for entry in entries:
            read_after[entry.stream] = entry.entry_id
            _show(entry, output, as_json=as_json)
        output.stdout.flush()


# ---- dlq -------------------------------------------------------------------------------------------


def _dead_letter_source(client: Redis, consumer: str) -> RedisStreamSource:
    # Listing and replaying touch only the group's dead-letter stream: each dead letter names the
    # stream it came from, and a consumer may read several (email reads auth's and billing's).
    return RedisStreamSource(client, stream=dlq_key(consumer), group=consumer)


def _event_type(dead: DeadLetter) -> str:
    try:
        return events_pb2.Event.FromString(dead.event).type or "-"
    except DecodeError:
        return "(undecodable)"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


async def list_dead_letters(client: Redis, output: Output, *, consumer: str, as_json: bool = False) -> int:
    """Print the consumer's dead letters, oldest first; the event itself is never read_after."""
    dead_letters = await _dead_letter_source(client, consumer).dead_letters()
    return _print_dead_letters(
        dead_letters, output, as_json=as_json, empty=f"no dead letters in {dlq_key(consumer)}"
    )


def _print_dead_letters(
    dead_letters: Sequence[DeadLetter], output: Output, *, as_json: bool, empty: str
) -> int:
    """One line per dead letter (`empty` on stderr when there is none); the event is never printed."""
    for dead in dead_letters:
        failed_at = dead.failed_at.isoformat(timespec="milliseconds")
        if as_json:
            output.line(
                json.dumps(
                    {
                        "id": dead.dead_letter_id,
                        "event_id": dead.event_id,
                        "type": _event_type(dead),
                        "stream": dead.stream,
                        "attempts": dead.attempts,
                        "failed_at": failed_at,
                        "error": dead.error,
                    }
                )
            )
        else:
            output.line(
                "  ".join(
                    (
                        dead.dead_letter_id,
                        dead.event_id,
                        _event_type(dead),
                        dead.stream,
                        f"attempts={dead.attempts}",
                        failed_at,
                        _one_line(dead.error),
                    )
                )
            )
    if not dead_letters:
        output.problem(empty)
    return 0


async def replay_dead_letters(
    client: Redis, output: Output, *, consumer: str, dead_letter_id: str | None
) -> int:
    """Put one dead letter (or every one when `dead_letter_id` is None) back on its stream."""
    source = _dead_letter_source(client, consumer)
    if dead_letter_id is not None:
        if not _ENTRY_ID.fullmatch(dead_letter_id):
            raise CommandError(
                f"{dead_letter_id!r} is not a dead-letter id (like 1718000000000-0; see "
                f"`parley events dlq list --consumer {consumer}`)",
                exit_code=EXIT_BAD_INPUT,
            )
        chosen = [dead_letter_id]
    else:
        chosen = [dead.dead_letter_id for dead in await source.dead_letters()]
    replayed, failures = await _replay_each(chosen, source.replay, output)
    if dead_letter_id is not None and replayed == 0 and failures == 0:
        raise CommandError(f"no dead letter {dead_letter_id} in {dlq_key(consumer)}")
    output.line(f"replayed {replayed} dead letter(s) of consumer {consumer}")
    return EXIT_FAILED if failures else 0


async def _replay_each(
    chosen: Sequence[str], replay_one: Callable[[str], Awaitable[int]], output: Output
) -> tuple[int, int]:
    """Replay the chosen dead letters one at a time (a dead letter that cannot be replayed must not
    stop the others); returns how many were replayed and how many could not be."""
    replayed = 0
    failures = 0
    for chosen_id in chosen:
        try:
            replayed += await replay_one(chosen_id)
        except MalformedStreamEntry as error:
            output.problem(str(error))
            failures += 1
    return replayed, failures


# ---- dlq on the embedded database ------------------------------------------------------------------


def _dead_letters_in_database(arguments: argparse.Namespace, settings: Settings) -> bool:
    """Whether `dlq` works on the database (embedded mode's dead letters) rather than on Redis."""
    named = arguments.data_dir is not None or arguments.database_url is not None
    return named or settings.redis_url is None


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


async def _run_on_database(arguments: argparse.Namespace, settings: Settings, output: Output) -> int:
    url = settings.resolved_database_url
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.is_file():
        # Opening it would create an empty database, and "no dead letters" would be a wrong answer.
        raise CommandError(
            f"no embedded database at {sqlite_file}: pass the --data-dir that `parley up` uses "
            "(or --database-url), or set PARLEY_REDIS_URL for the dead letters of microservices mode",
            exit_code=EXIT_BAD_INPUT,
        )
    database = Database(url)
    where = f"the dead_letters table of {database.url.render_as_string(hide_password=True)}"
    try:
        await database.ping()
        # As `parley up` and `parley admin` do: a database from before the table gets it.
        await upgrade_async(url)
        store = SqlDeadLetters(database)
        if arguments.dlq_command == "list":
            dead_letters = await store.list(arguments.consumer)
            return _print_dead_letters(
                dead_letters,
                output,
                as_json=arguments.json,
                empty=f"no dead letters of {arguments.consumer} in {where}",
            )
        return await _requeue_dead_letters(
            store,
            output,
            consumer=arguments.consumer,
            dead_letter_id=None if arguments.all else arguments.dead_letter_id,
            where=where,
        )
    except (DatabaseUnavailable, SQLAlchemyError) as error:
        raise CommandError(f"cannot use {where}: {type(error).__name__}: {error}") from None
    finally:
        await database.dispose()


async def _requeue_dead_letters(
    store: SqlDeadLetters, output: Output, *, consumer: str, dead_letter_id: str | None, where: str
) -> int:
    """Put one dead letter (or every one) back in the outbox, for the relay to deliver again."""
    if dead_letter_id is not None:
        if not (dead_letter_id.isascii() and dead_letter_id.isdigit()):
            raise CommandError(
                f"{dead_letter_id!r} is not a dead-letter id (a number; see "
                f"`parley events dlq list --consumer {consumer}`)",
                exit_code=EXIT_BAD_INPUT,
            )
        chosen = [dead_letter_id]
    else:
        chosen = [dead.dead_letter_id for dead in await store.list(consumer)]
    replayed, failures = await _replay_each(
        chosen, lambda chosen_id: store.requeue_in_outbox(consumer, chosen_id), output
    )
    if dead_letter_id is not None and replayed == 0 and failures == 0:
        raise CommandError(f"no dead letter {dead_letter_id} of {consumer} in {where}")
    output.line(f"replayed {replayed} dead letter(s) of consumer {consumer}")
    return EXIT_FAILED if failures else 0
