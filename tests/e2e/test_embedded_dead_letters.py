"""Embedded mode's dead letters end to end: `parley up` with a real SMTP server (aiosmtpd) that refuses
one recipient, the dead letter surviving a restart, and `parley events dlq list | replay` on the data
dir (no Redis) sending the mail exactly once after the fix."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.email.worker import EMAIL_CONSUMER
from tests.support.email_pipeline import MAIL_FROM, PUBLIC_BASE_URL, delivery_report, mails_to
from tests.support.mail import SteerableHandler, smtp_server
from tests.support.microservices import run_parley
from tests.support.outbox import read_events
from tests.support.parley_process import EmbeddedPorts, ParleyProcess
from tests.support.polling import eventually

pytestmark = pytest.mark.envoy

PASSWORD = "violet-harbour-lantern-42"
MAIL_WAIT_S = 30.0
START_WAIT_S = 60.0
STOP_WAIT_S = 30.0


@asynccontextmanager
async def parley_up(data_dir: Path, log_path: Path, smtp_port: int) -> AsyncIterator[httpx.AsyncClient]:
    """`parley up` on `data_dir`, sending mail to the test's SMTP server; stopped with SIGTERM (as an
    operator would) at the end, and killed if it does not stop."""
    ports = EmbeddedPorts()
    process = ParleyProcess(
        ["up"],
        env={
            **ports.env(),
            "PARLEY_DATA_DIR": str(data_dir),
            "PARLEY_PUBLIC_BASE_URL": PUBLIC_BASE_URL,
            "PARLEY_SMTP_HOST": "127.0.0.1",
            "PARLEY_SMTP_PORT": str(smtp_port),
            "PARLEY_SMTP_SECURITY": "none",
            "PARLEY_MAIL_FROM": MAIL_FROM,
        },
        log_path=log_path,
    )
    process.start()
    try:
        await process.wait_for_output("Press Ctrl-C to stop.", timeout_s=START_WAIT_S)
        gateway_url = f"http://127.0.0.1:{ports.http}"
        await process.wait_for_http_status(f"{gateway_url}/healthz", 200, timeout_s=START_WAIT_S)
        async with httpx.AsyncClient(base_url=gateway_url, timeout=15.0) as client:
            yield client
        assert await process.stop(timeout_s=STOP_WAIT_S) == 0, process.output()[-4000:]
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{process.output()[-4000:]}") from None
    finally:
        process.kill()


async def dead_letters(data_dir: Path) -> list[dict[str, Any]]:
    """`parley events dlq list --json` on the data dir, in a process of its own, without Redis."""
    listed = await run_parley(
        "events", "dlq", "list", "--consumer", EMAIL_CONSUMER, "--data-dir", str(data_dir), "--json", env={}
    )
    assert listed.returncode == 0, listed.describe()
    return [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]


def verification_requests(data_dir: Path, address: str) -> list[str]:
    """The ids of the `email.requested` events that ask for a verification mail to `address`."""
    return [
        event.id
        for event in read_events(data_dir / "parley.db", "email.requested")
        if event.email_requested.recipient == address and event.email_requested.template == "verify_email"
    ]


def outcomes(data_dir: Path, request_id: str) -> tuple[int, int]:
    """How many `email.sent` and `email.failed` events the worker recorded for the request."""
    database = data_dir / "parley.db"
    sent = read_events(database, "email.sent")
    failed = read_events(database, "email.failed")
    return (
        sum(1 for event in sent if event.email_sent.request_event_id == request_id),
        sum(1 for event in failed if event.email_failed.request_event_id == request_id),
    )


async def test_a_refused_mail_is_dead_lettered_durably_and_replayed_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    address = f"refused-{uuid.uuid4().hex[:10]}@example.com"
    recorder = SteerableHandler()
    recorder.refuse(address, "550 5.1.1 <refused>: Recipient address rejected")
    with smtp_server(recorder) as smtp:
        async with parley_up(data_dir, tmp_path / "first.log", smtp.port) as client:
            response = await client.post(
                "/v1/auth/register",
                json={"email": address, "password": PASSWORD, "display_name": "Refused"},
            )
            assert response.status_code == 200, response.text
            [request_id] = verification_requests(data_dir, address)

            async def dead_lettered() -> bool:
                return outcomes(data_dir, request_id) == (0, 1) and bool(await dead_letters(data_dir))

            await eventually(dead_lettered, what="the verification mail dead-lettered", timeout_s=MAIL_WAIT_S)
            [dead] = await dead_letters(data_dir)
            assert (dead["event_id"], dead["type"], dead["attempts"]) == (request_id, "email.requested", 1)
            assert "550" in dead["error"], dead
            assert mails_to(recorder, address) == []

        # Stopped: the dead letter is in the database, not in the process that wrote it.
        assert await dead_letters(data_dir) == [dead]
        async with parley_up(data_dir, tmp_path / "second.log", smtp.port):
            assert await dead_letters(data_dir) == [dead]
            recorder.stop_refusing()

            replayed = await run_parley(
                "events", "dlq", "replay", "--all", "--data-dir", str(data_dir), env={}
            )
            assert replayed.returncode == 0, replayed.describe()
            assert replayed.stdout == f"replayed 1 dead letter(s) of consumer {EMAIL_CONSUMER}\n"

            async def sent() -> bool:
                return outcomes(data_dir, request_id)[0] == 1

            await eventually(
                sent,
                what="the replayed verification mail sent",
                timeout_s=MAIL_WAIT_S,
                details=lambda: delivery_report(recorder, [address]),
            )
            assert len(mails_to(recorder, address)) == 1, delivery_report(recorder, [address])
            assert await dead_letters(data_dir) == []

    # Once more after the stop: nothing was sent or dead-lettered twice.
    assert len(mails_to(recorder, address)) == 1, delivery_report(recorder, [address])
    assert outcomes(data_dir, request_id) == (1, 1)
    assert await dead_letters(data_dir) == []
