"""The email pipeline end to end (issue 5): from the outbox through Redis Streams (or in process) to a
real SMTP server (aiosmtpd), with real `parley` processes, PostgreSQL and Redis.

- Microservices: sign-up and password reset through the gateway, the tokens followed from the mails
  the SMTP server received, the trace carried from the HTTP request to the worker's log.
- Embedded (`parley up`): `.eml` files without SMTP, the SMTP server with it.
- Faults, each ending in exact counts (every mail once, no Message-ID twice): Redis down while jobs
  are produced, the email worker SIGKILLed mid-batch, the SMTP server down, a poison job.

The pipeline's Redis keys have fixed names, so every test clears them before and after
(`pipeline_redis`), and this module must not run concurrently with itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from parley.events.v1 import events_pb2
from services.common.db import Database
from services.common.migrate import upgrade_async
from services.common.streams import stream_key
from services.email.worker import EMAIL_CONSUMER
from tests.support.domain import outbox
from tests.support.email_pipeline import (
    MAIL_FROM,
    PUBLIC_BASE_URL,
    PipelineWorkers,
    WorkerConfig,
    assert_each_delivered_once,
    clear_pipeline_keys,
    delivery_report,
    link_token,
    mails_to,
    pipeline_settled,
    pipeline_workers,
    processed_count,
    produce_email_jobs,
    read_eml,
    recipients,
    redis_address,
    redis_url_via,
    text_body,
    text_of,
)
from tests.support.gateway import free_port
from tests.support.mail import RecordingHandler, SteerableHandler, smtp_server, smtp_server_at
from tests.support.microservices import migrate, run_parley, running_microservices
from tests.support.parley_process import EmbeddedPorts, ParleyProcess
from tests.support.polling import eventually
from tests.support.tcp_proxy import TcpProxy

logger = logging.getLogger(__name__)

PASSWORD = "violet-harbour-lantern-42"
NEW_PASSWORD = "copper-meadow-falcon-77"
# Bounds of the waits: a mail through the whole pipeline, and the pipeline settling after a fault.
MAIL_WAIT_S = 30.0
SETTLE_WAIT_S = 90.0
OUTAGE_JOBS = 1_000
OUTAGE_JOBS_PER_TRANSACTION = 50
OUTAGE_S = 10.0


# ---- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
async def pipeline_redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client on the test Redis database, with the pipeline's keys cleared before and after."""
    client = Redis.from_url(redis_url, decode_responses=False)
    await clear_pipeline_keys(client)
    try:
        yield client
    finally:
        await clear_pipeline_keys(client)
        await client.aclose()


@pytest.fixture
async def pipeline_database(postgres_url: str) -> AsyncIterator[Database]:
    """The migrated PostgreSQL database the workers run on; the test writes jobs into its outbox."""
    await upgrade_async(postgres_url)
    db = Database(postgres_url)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture
def domain() -> str:
    """A recipient domain of the test's own: its rate-limit counters in Redis are the test's alone."""
    return f"pipeline-{uuid.uuid4().hex[:10]}.example.com"


def settled_with(
    client: Redis, database: Database, recorder: RecordingHandler, count: int
) -> Callable[[], Awaitable[bool]]:
    """`count` mails received and nothing left in the pipeline that could send another."""

    async def check() -> bool:
        return len(recorder.received) >= count and await pipeline_settled(client, database)

    return check


async def wait_for_mail(
    recorder: RecordingHandler,
    address: str,
    containing: str,
    *,
    context: Callable[[], str],
    alive: Callable[[], None] = lambda: None,
) -> str:
    """The text of the one mail to `address` whose text contains `containing`, once it arrived."""

    async def arrived() -> bool:
        return any(containing in text_body(mail) for mail in mails_to(recorder, address))

    await eventually(
        arrived,
        what=f"a mail to {address} with {containing!r}",
        timeout_s=MAIL_WAIT_S,
        details=context,
        alive=alive,
    )
    [text] = [text_body(mail) for mail in mails_to(recorder, address) if containing in text_body(mail)]
    return text


async def mailed_link_token(
    recorder: RecordingHandler, address: str, path: str, *, alive: Callable[[], None]
) -> str:
    """The token in the link to `path` (e.g. "/verify-email") of the mail to `address`, once it arrived."""
    text = await wait_for_mail(
        recorder, address, f"{path}?", context=lambda: delivery_report(recorder, [address]), alive=alive
    )
    return link_token(text, base_url=PUBLIC_BASE_URL, path=path)


def json_log_lines(process: ParleyProcess) -> list[dict[str, Any]]:
    lines = []
    for line in process.output().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short while the process writes it
    return lines


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


async def register(client: httpx.AsyncClient, address: str, *, headers: dict[str, str] | None = None) -> str:
    """Sign up through the gateway; returns the new user's id."""
    body = ok(
        await client.post(
            "/v1/auth/register",
            json={"email": address, "password": PASSWORD, "display_name": "Pipeline"},
            headers=headers,
        )
    )
    user_id: str = body["user"]["id"]
    return user_id


async def assert_verified(
    client: httpx.AsyncClient, address: str, user_id: str, *, password: str = PASSWORD
) -> None:
    """Signing in works, and the account (as GetCurrentUser sees it) has a verified address."""
    login = ok(await client.post("/v1/auth/login", json={"email": address, "password": password}))
    access_token = login["tokens"]["access_token"]
    me = ok(await client.get("/v1/users/me", headers={"authorization": f"Bearer {access_token}"}))
    assert (me["user"]["id"], me["user"]["email_verified"]) == (user_id, True), me


async def start_both(workers: PipelineWorkers, config: WorkerConfig) -> None:
    await asyncio.gather(workers.start("relay", config), workers.start("email", config))


async def dead_letters_via_cli(redis_url: str) -> list[dict[str, Any]]:
    listed = await run_parley(
        "events", "dlq", "list", "--consumer", EMAIL_CONSUMER, "--json", env={"PARLEY_REDIS_URL": redis_url}
    )
    assert listed.returncode == 0, listed.describe()
    return [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]


# ---- 1. microservices, through the gateway ------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.redis
@pytest.mark.postgres
async def test_sign_up_and_password_reset_mails_arrive_and_their_links_work(
    postgres_url: str, redis_url: str, pipeline_redis: Redis, tmp_path: Path
) -> None:
    await migrate(postgres_url)
    recorder = RecordingHandler()
    with smtp_server(recorder) as smtp:
        config = WorkerConfig(postgres_url, redis_url, smtp.port)
        async with pipeline_workers(tmp_path) as workers:
            await start_both(workers, config)
            email_worker = workers.started[1].process
            async with running_microservices(tmp_path, postgres_url, redis_url) as mesh:
                try:
                    await mesh.gateway.wait_for_http_status(
                        f"{mesh.gateway_url}/healthz", 200, timeout_s=30.0
                    )
                    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=15.0) as client:
                        trace_id = secrets.token_hex(16)
                        traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
                        address = f"pipeline-{uuid.uuid4().hex[:10]}@example.com"
                        user_id = await register(client, address, headers={"traceparent": traceparent})

                        token = await mailed_link_token(
                            recorder, address, "/verify-email", alive=workers.check_alive
                        )
                        verified = ok(await client.post("/v1/auth/verify-email", json={"token": token}))
                        assert verified["user"]["email_verified"] is True
                        await assert_verified(client, address, user_id)

                        # The trace of the sign-up request reaches the worker that sent its mail.
                        async def sent_in_the_trace() -> bool:
                            return any(
                                line.get("message") == "email sent"
                                and line.get("template") == "verify_email"
                                and line.get("trace_id") == trace_id
                                for line in json_log_lines(email_worker)
                            )

                        await eventually(
                            sent_in_the_trace,
                            what=f"an 'email sent' log line in trace {trace_id}",
                            timeout_s=10.0,
                        )

                        ok(await client.post("/v1/auth/forgot-password", json={"email": address}))
                        reset_token = await mailed_link_token(
                            recorder, address, "/reset-password", alive=workers.check_alive
                        )
                        ok(
                            await client.post(
                                "/v1/auth/reset-password",
                                json={"token": reset_token, "new_password": NEW_PASSWORD},
                            )
                        )
                        await assert_verified(client, address, user_id, password=NEW_PASSWORD)
                        old = await client.post(
                            "/v1/auth/login", json={"email": address, "password": PASSWORD}
                        )
                        assert old.status_code == 401, old.text
                    assert len(mails_to(recorder, address)) == 2, delivery_report(recorder, [address])
                except AssertionError as failure:
                    raise AssertionError(f"{failure}\n{mesh.output_tails()}") from None


# ---- 2. embedded -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedded:
    process: ParleyProcess
    client: httpx.AsyncClient
    data_dir: Path

    def check_alive(self) -> None:
        if self.process.exited():
            raise AssertionError("parley up exited unexpectedly")


@asynccontextmanager
async def running_embedded(tmp_path: Path, **env: str) -> AsyncIterator[Embedded]:
    """`parley up` with these extra settings, once it has said where everything is and its gateway
    answers; killed at the end. A failing assertion inside gets its output tail appended."""
    data_dir = tmp_path / "data"
    ports = EmbeddedPorts()
    process = ParleyProcess(
        ["up"],
        env={
            **ports.env(),
            "PARLEY_DATA_DIR": str(data_dir),
            "PARLEY_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            **env,
        },
        log_path=tmp_path / "parley.log",
    )
    process.start()
    try:
        await process.wait_for_output("Press Ctrl-C to stop.", timeout_s=60.0)
        gateway_url = f"http://127.0.0.1:{ports.http}"
        await process.wait_for_http_status(f"{gateway_url}/healthz", 200, timeout_s=30.0)
        async with httpx.AsyncClient(base_url=gateway_url, timeout=15.0) as client:
            yield Embedded(process, client, data_dir)
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{process.output()[-4000:]}") from None
    finally:
        process.kill()


@pytest.mark.envoy
async def test_embedded_without_smtp_writes_eml_files_whose_link_verifies(tmp_path: Path) -> None:
    async with running_embedded(tmp_path) as parley:
        printed = re.search(r"Mail \(no SMTP configured\)\s+(\S+)/\*\.eml", parley.process.output())
        assert printed is not None, "parley up does not say where the mails go"
        mail_dir = Path(printed.group(1))
        assert mail_dir == parley.data_dir / "mail"
        address = f"embedded-{uuid.uuid4().hex[:10]}@example.com"
        user_id = await register(parley.client, address)

        def mails_to_address() -> list[str]:
            messages = (read_eml(path) for path in sorted(mail_dir.glob("*.eml")))
            return [text_of(message) for message in messages if str(message["To"]) == address]

        async def written() -> bool:
            return bool(mails_to_address())

        await eventually(
            written,
            what=f"an .eml file for {address} in {mail_dir}",
            timeout_s=MAIL_WAIT_S,
            alive=parley.check_alive,
        )
        [text] = mails_to_address()
        token = link_token(text, base_url=PUBLIC_BASE_URL, path="/verify-email")
        ok(await parley.client.post("/v1/auth/verify-email", json={"token": token}))
        await assert_verified(parley.client, address, user_id)


@pytest.mark.envoy
async def test_embedded_with_smtp_sends_to_the_server(tmp_path: Path) -> None:
    recorder = RecordingHandler()
    with smtp_server(recorder) as smtp:
        async with running_embedded(
            tmp_path,
            PARLEY_SMTP_HOST="127.0.0.1",
            PARLEY_SMTP_PORT=str(smtp.port),
            PARLEY_SMTP_SECURITY="none",
            PARLEY_MAIL_FROM=MAIL_FROM,
        ) as parley:
            assert re.search(r"Mail\s+sent by SMTP", parley.process.output())
            address = f"embedded-smtp-{uuid.uuid4().hex[:10]}@example.com"
            user_id = await register(parley.client, address)
            token = await mailed_link_token(recorder, address, "/verify-email", alive=parley.check_alive)
            ok(await parley.client.post("/v1/auth/verify-email", json={"token": token}))
            await assert_verified(parley.client, address, user_id)
            [mail] = mails_to(recorder, address)
            assert mail.mail_from == email.utils.parseaddr(MAIL_FROM)[1]
            assert not (parley.data_dir / "mail").exists()


async def test_requests_never_wait_on_smtp(tmp_path: Path) -> None:
    """The SMTP server holds the first mail without answering; meanwhile sign-ups keep completing,
    since a request only commits its `email.requested` and the worker sends later."""
    recorder = SteerableHandler(hold_data_number=1)
    with smtp_server(recorder) as smtp:
        async with running_embedded(
            tmp_path,
            PARLEY_SMTP_HOST="127.0.0.1",
            PARLEY_SMTP_PORT=str(smtp.port),
            PARLEY_SMTP_SECURITY="none",
            PARLEY_MAIL_FROM=MAIL_FROM,
        ) as parley:
            first = f"held-{uuid.uuid4().hex[:10]}@example.com"
            await register(parley.client, first)

            async def first_mail_held() -> bool:
                return recorder.holding.is_set()

            await eventually(
                first_mail_held,
                what="the SMTP server holds the first verification mail",
                timeout_s=MAIL_WAIT_S,
                alive=parley.check_alive,
            )
            # While the worker waits on SMTP, more people sign up and sign in.
            later = [f"while-held-{index}-{uuid.uuid4().hex[:8]}@example.com" for index in range(3)]
            for address in later:
                await register(parley.client, address)
                ok(await parley.client.post("/v1/auth/login", json={"email": address, "password": PASSWORD}))
            assert recorder.holding.is_set() and not recorder.received, "the first mail is still held"

            recorder.release("250 2.0.0 OK: queued")
            for address in [first, *later]:
                await wait_for_mail(
                    recorder,
                    address,
                    "/verify-email?",
                    context=lambda: delivery_report(recorder, [first, *later]),
                    alive=parley.check_alive,
                )
            assert_each_delivered_once(recorder, [first, *later])


# ---- 3. faults ---------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_redis_outage_loses_and_repeats_no_mail(
    pipeline_database: Database,
    postgres_url: str,
    redis_url: str,
    pipeline_redis: Redis,
    domain: str,
    tmp_path: Path,
) -> None:
    """1,000 jobs committed in transactions of 50 before, during and after 10 s without Redis."""
    addresses = recipients("outage", OUTAGE_JOBS, domain=domain)
    batches = [
        addresses[start : start + OUTAGE_JOBS_PER_TRANSACTION]
        for start in range(0, OUTAGE_JOBS, OUTAGE_JOBS_PER_TRANSACTION)
    ]
    recorder = RecordingHandler()
    proxy = TcpProxy(*redis_address(redis_url))
    await proxy.start()
    try:
        with smtp_server(recorder) as smtp:
            config = WorkerConfig(
                postgres_url, redis_url_via(redis_url, proxy.port), smtp.port, smtp_timeout_s=2.0
            )
            async with pipeline_workers(tmp_path) as workers:
                await start_both(workers, config)
                relay, email_worker = (worker.process for worker in workers.started)
                loop = asyncio.get_running_loop()
                # The outage starts once two transactions committed; one every 0.6 s spreads the 20
                # over 12 s, so most commit during the outage, and the last ones after it.
                started = loop.time()
                two_committed = asyncio.Event()

                async def outage() -> None:
                    await two_committed.wait()
                    await proxy.cut()
                    # Real time: how long Redis stays away is the scenario under test.
                    await asyncio.sleep(OUTAGE_S)
                    await proxy.restore()

                async def produce() -> None:
                    for index, batch in enumerate(batches):
                        # Real time: the load's pace is the scenario (commits spread over the outage).
                        await asyncio.sleep(max(0.0, started + index * 0.6 - loop.time()))
                        await produce_email_jobs(pipeline_database, batch)
                        if index == 1:
                            two_committed.set()

                await asyncio.gather(outage(), produce())
                settling_since = loop.time()
                await eventually(
                    settled_with(pipeline_redis, pipeline_database, recorder, OUTAGE_JOBS),
                    what="every job delivered and the pipeline settled after the outage",
                    timeout_s=SETTLE_WAIT_S,
                    alive=workers.check_alive,
                    details=lambda: delivery_report(recorder, addresses),
                    interval_s=0.5,
                )
                healed_s = loop.time() - settling_since
                assert_each_delivered_once(recorder, addresses)
                # Nothing reached the SMTP server twice, and each outcome was recorded once.
                assert recorder.data_commands == OUTAGE_JOBS
                assert len(await outbox(pipeline_database, "email.sent")) == OUTAGE_JOBS
                assert await processed_count(pipeline_database) == OUTAGE_JOBS
                # The outage was felt by both workers (else this test proves nothing).
                assert "failed to dispatch" in relay.output() or "outbox relay failed" in relay.output()
                assert "could not poll" in email_worker.output()
                logger.info("settled %.1fs after Redis came back", healed_s)
    finally:
        await proxy.close()


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_worker_killed_mid_batch_leaves_no_mail_unsent_or_doubled(
    pipeline_database: Database,
    postgres_url: str,
    redis_url: str,
    pipeline_redis: Redis,
    domain: str,
    tmp_path: Path,
) -> None:
    jobs, held = 20, 6
    addresses = recipients("killed", jobs, domain=domain)
    recorder = SteerableHandler(hold_data_number=held)
    with smtp_server(recorder) as smtp:
        # The first worker never times out while the server holds its mail; its successor's short
        # timeout and retry cap make the visibility timeout 2 * (1 + 0.5) = 3 s.
        config = WorkerConfig(postgres_url, redis_url, smtp.port, smtp_timeout_s=30.0)
        await produce_email_jobs(pipeline_database, addresses, per_transaction=jobs)
        async with pipeline_workers(tmp_path) as workers:
            await workers.start("relay", config)

            async def all_published() -> bool:
                return int(await pipeline_redis.xlen(stream_key("auth"))) == jobs

            # All in the stream first, so the worker reads them as one batch.
            await eventually(
                all_published,
                what=f"{jobs} jobs in the stream",
                timeout_s=MAIL_WAIT_S,
                alive=workers.check_alive,
            )
            doomed = await workers.start("email", config, name="email-doomed")

            async def holding() -> bool:
                return recorder.holding.is_set()

            await eventually(
                holding,
                what=f"mail #{held} held by the SMTP server",
                timeout_s=MAIL_WAIT_S,
                alive=workers.check_alive,
            )
            workers.kill(doomed)
            # The server never accepted the held mail: the sender must send it again.
            recorder.release("451 4.4.2 Connection lost before the message was accepted")

            assert len(recorder.received) == held - 1
            assert await processed_count(pipeline_database) == held - 1
            pending = await pipeline_redis.xpending(stream_key("auth"), EMAIL_CONSUMER)
            assert pending["pending"] == jobs, "the whole batch should be unacknowledged"

            await workers.start("email", dataclasses.replace(config, smtp_timeout_s=1.0, retry_cap_s=0.5))
            await eventually(
                settled_with(pipeline_redis, pipeline_database, recorder, jobs),
                what="the dead worker's batch taken over and delivered",
                timeout_s=SETTLE_WAIT_S,
                alive=workers.check_alive,
                details=lambda: delivery_report(recorder, addresses),
            )
            assert_each_delivered_once(recorder, addresses)
            assert mails_to(recorder, recorder.held_recipients[0])
            assert len(await outbox(pipeline_database, "email.sent")) == jobs
            assert await processed_count(pipeline_database) == jobs


@pytest.mark.redis
@pytest.mark.postgres
async def test_mail_waits_for_an_smtp_server_that_is_down(
    pipeline_database: Database,
    postgres_url: str,
    redis_url: str,
    pipeline_redis: Redis,
    domain: str,
    tmp_path: Path,
) -> None:
    jobs = 20
    addresses = recipients("smtp-down", jobs, domain=domain)
    smtp_port = free_port()  # nothing listens there yet
    recorder = RecordingHandler()
    config = WorkerConfig(postgres_url, redis_url, smtp_port, smtp_timeout_s=2.0)
    async with pipeline_workers(tmp_path) as workers:
        await start_both(workers, config)
        email_worker = workers.started[1]
        await produce_email_jobs(pipeline_database, addresses)

        async def retried() -> bool:
            return await email_worker.metric("parley_consumer_retries_total", consumer=EMAIL_CONSUMER) > 0

        await eventually(
            retried,
            what="the email worker retrying against the absent SMTP server",
            timeout_s=MAIL_WAIT_S,
            alive=workers.check_alive,
        )
        controller = smtp_server_at(recorder, smtp_port)
        try:
            await eventually(
                settled_with(pipeline_redis, pipeline_database, recorder, jobs),
                what="every job delivered once the SMTP server is up",
                timeout_s=SETTLE_WAIT_S,
                alive=workers.check_alive,
                details=lambda: delivery_report(recorder, addresses),
            )
        finally:
            controller.stop()
        assert_each_delivered_once(recorder, addresses)
        assert recorder.data_commands == jobs
        assert await email_worker.metric("parley_consumer_dead_letters_total", consumer=EMAIL_CONSUMER) == 0
        assert len(await outbox(pipeline_database, "email.sent")) == jobs


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_refused_mail_is_dead_lettered_at_once_and_replayed_once_fixed(
    pipeline_database: Database,
    postgres_url: str,
    redis_url: str,
    pipeline_redis: Redis,
    domain: str,
    tmp_path: Path,
) -> None:
    good = recipients("good", 10, domain=domain)
    poison = f"refused@{domain}"
    recorder = SteerableHandler()
    recorder.refuse(poison, "550 5.1.1 <refused>: Recipient address rejected")
    with smtp_server(recorder) as smtp:
        config = WorkerConfig(postgres_url, redis_url, smtp.port)
        async with pipeline_workers(tmp_path) as workers:
            await start_both(workers, config)
            email_worker = workers.started[1]
            event_ids = await produce_email_jobs(pipeline_database, [*good[:5], poison, *good[5:]])
            poison_event_id = event_ids[5]

            await eventually(
                settled_with(pipeline_redis, pipeline_database, recorder, len(good)),
                what="the good jobs delivered and the poison one settled",
                timeout_s=SETTLE_WAIT_S,
                alive=workers.check_alive,
                details=lambda: delivery_report(recorder, good),
            )
            assert_each_delivered_once(recorder, good)
            [dead] = await dead_letters_via_cli(redis_url)
            assert (dead["event_id"], dead["type"], dead["attempts"]) == (
                poison_event_id,
                "email.requested",
                1,
            )
            assert dead["stream"] == stream_key("auth")
            assert "550" in dead["error"], dead
            assert await email_worker.metric("parley_consumer_retries_total", consumer=EMAIL_CONSUMER) == 0
            assert (
                await email_worker.metric("parley_consumer_dead_letters_total", consumer=EMAIL_CONSUMER) == 1
            )
            # The relay worker samples the pipeline's backlog gauges (every 5 s).
            relay_worker = workers.started[0]

            async def relay_sees_the_dead_letter() -> bool:
                return await relay_worker.metric("parley_dead_letters", consumer=EMAIL_CONSUMER) == 1

            await eventually(
                relay_sees_the_dead_letter,
                what="the relay's parley_dead_letters gauge shows the dead letter",
                timeout_s=SETTLE_WAIT_S,
                alive=workers.check_alive,
            )
            assert await relay_worker.metric("parley_outbox_lag_seconds") < SETTLE_WAIT_S
            [failed] = await outbox(pipeline_database, "email.failed")
            assert isinstance(failed.payload, events_pb2.EmailFailed)
            assert (failed.payload.request_event_id, failed.payload.permanent, failed.payload.attempts) == (
                poison_event_id,
                True,
                1,
            )

            recorder.stop_refusing()
            replayed = await run_parley(
                "events",
                "dlq",
                "replay",
                "--all",
                "--consumer",
                EMAIL_CONSUMER,
                env={"PARLEY_REDIS_URL": redis_url},
            )
            assert replayed.returncode == 0, replayed.describe()
            everyone = [*good, poison]
            await eventually(
                settled_with(pipeline_redis, pipeline_database, recorder, len(everyone)),
                what="the replayed job delivered",
                timeout_s=SETTLE_WAIT_S,
                alive=workers.check_alive,
                details=lambda: delivery_report(recorder, everyone),
            )
            assert_each_delivered_once(recorder, everyone)
            assert await dead_letters_via_cli(redis_url) == []
            assert len(await outbox(pipeline_database, "email.sent")) == len(everyone)
            assert len(await outbox(pipeline_database, "email.failed")) == 1
