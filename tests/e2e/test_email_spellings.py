"""Look-alike and respelled email addresses through the real stack (issue 11, finding 6): `parley up`
(Envoy, the servicers, SQLite, the email worker writing `.eml` files), a plain HTTP client through
the gateway, and `parley admin create-admin`. Every spelling of an address signs in to its one
account; a look-alike in another script is refused instead of registering beside it (ADR 0015).

Failed sign-ins all come from the gateway's address, which the throttle allows 20 free failures:
this module makes only a handful.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.look_alikes import fullwidth, mathematical_bold
from tests.support.outbox import email_requests
from tests.support.parley_process import PARLEY, parley_up_serving
from tests.support.polling import eventually_sync

pytestmark = pytest.mark.envoy

PASSWORD = "violet-harbour-lantern-42"
ADMIN_PASSWORD = "saffron-quarry-beacon-63"


@dataclass(frozen=True)
class Parley:
    http: httpx.Client
    data_dir: Path

    @property
    def database(self) -> Path:
        return self.data_dir / "parley.db"


@pytest.fixture(scope="module")
def parley(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parley]:
    root = tmp_path_factory.mktemp("email-spellings")
    data_dir = root / "var"
    with (
        parley_up_serving(data_dir, log_path=root / "parley.log") as (_, ports),
        httpx.Client(base_url=f"http://127.0.0.1:{ports.http}", timeout=15.0) as client,
    ):
        yield Parley(client, data_dir)


def local_part(label: str) -> str:
    return f"{label}{uuid.uuid4().hex[:10]}"


def register(parley: Parley, email: str, *, name: str = "Alice") -> httpx.Response:
    return parley.http.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": name}
    )


def registered(parley: Parley, email: str, *, name: str = "Alice") -> dict[str, Any]:
    response = register(parley, email, name=name)
    assert response.status_code == 200, response.text
    user: dict[str, Any] = response.json()["user"]
    return user


def login(parley: Parley, email: str, password: str = PASSWORD) -> httpx.Response:
    return parley.http.post("/v1/auth/login", json={"email": email, "password": password})


def signed_in_user_id(parley: Parley, email: str, password: str = PASSWORD) -> str:
    response = login(parley, email, password)
    assert response.status_code == 200, f"{email!r}: {response.text}"
    user_id: str = response.json()["user"]["id"]
    return user_id


def error_of(response: httpx.Response) -> tuple[int, str, list[tuple[str, str]]]:
    """HTTP status, ErrorInfo reason and the (field, reason) of each BadRequest violation."""
    body = response.json()
    assert "details" in body, f"no error but {response.status_code}: {response.text}"
    details = body["details"]
    info = next(detail for detail in details if detail["@type"].endswith("google.rpc.ErrorInfo"))
    violations = [
        (violation["field"], violation["reason"])
        for detail in details
        if detail["@type"].endswith("google.rpc.BadRequest")
        for violation in detail["field_violations"]
    ]
    return response.status_code, info["reason"], violations


def comparable(response: httpx.Response) -> tuple[int, dict[str, Any]]:
    """A reply without what differs per request (its id), for comparing two replies."""
    body = response.json()
    body["details"] = [detail for detail in body["details"] if not detail["@type"].endswith("RequestInfo")]
    return response.status_code, body


def test_a_look_alike_in_another_script_is_refused_beside_the_real_address(parley: Parley) -> None:
    name = local_part("alice")
    alice = registered(parley, f"{name}@example.com")
    for look_alike in (
        name.replace("i", "\u0131", 1) + "@example.com",  # dotless i
        f"\u0430{name[1:]}@example.com",  # Cyrillic a
        f"{name[:2]}\u0456{name[3:]}@example.com",  # Cyrillic i
    ):
        assert error_of(register(parley, look_alike, name="Mallory")) == (
            400,
            "INVALID_ARGUMENT",
            [("email", "EMAIL_LOCAL_PART_NOT_ASCII")],
        ), look_alike
        # Signing in with it is an unknown address, not a hint about the real one.
        assert comparable(login(parley, look_alike)) == comparable(login(parley, f"no-{name}@example.com"))
    assert signed_in_user_id(parley, f"{name}@example.com") == alice["id"]


def test_every_spelling_of_a_registered_address_signs_in_to_it(parley: Parley) -> None:
    name = local_part("ada")
    ada = registered(parley, f"{name}@example.com", name="Ada")
    spellings = [
        f"{name.upper()}@EXAMPLE.com",
        f"{fullwidth(name)}@example.com",
        fullwidth(f"{name.upper()}@EXAMPLE.COM"),
        f"{mathematical_bold(name)}@example.com",
        f" {name}@Example.COM\t",
    ]
    for spelling in spellings:
        assert error_of(register(parley, spelling, name="Mallory")) == (
            409,
            "EMAIL_ALREADY_REGISTERED",
            [("email", "EMAIL_ALREADY_REGISTERED")],
        ), spelling
        assert signed_in_user_id(parley, spelling) == ada["id"], spelling


def test_an_idn_domain_is_stored_and_mailed_as_its_a_label(parley: Parley) -> None:
    name = local_part("zoe")
    user = registered(parley, f"{name}@B\u00dcCHER.example", name="Zo\u00eb")
    assert user["email"] == f"{name}@xn--bcher-kva.example"
    for spelling in (
        f"{name}@b\u00fccher.example",
        f"{name}@xn--bcher-kva.example",
        f"{name}@bu\u0308cher.EXAMPLE",  # u and a combining diaeresis
        f"{fullwidth(name)}@{fullwidth('B')}\u00fccher.example",
    ):
        assert signed_in_user_id(parley, spelling) == user["id"], spelling

    # The email worker writes the verification mail to the A-label address: plain SMTP can carry it.
    mail_dir = parley.data_dir / "mail"

    def verification_mail() -> Any:
        for path in mail_dir.glob("*.eml"):
            message = BytesParser(policy=default_policy).parsebytes(path.read_bytes())
            if message["To"] == user["email"]:
                return message
        return None

    message = eventually_sync(
        verification_mail, what=f"the verification mail to {user['email']}", timeout_s=30
    )
    assert message["Subject"]


def test_a_look_alike_domain_is_another_account_shown_by_its_a_label(parley: Parley) -> None:
    name = local_part("bob")
    bob = registered(parley, f"{name}@example.com", name="Bob")
    other = registered(parley, f"{name}@ex\u0430mple.com", name="Mallory")  # Cyrillic a in the domain
    assert other["email"] == f"{name}@xn--exmple-4nf.com"
    assert signed_in_user_id(parley, f"{name}@example.com") == bob["id"]
    assert signed_in_user_id(parley, f"{name}@ex\u0430mple.com") == other["id"] != bob["id"]


def test_forgot_password_under_another_spelling_mails_the_account(parley: Parley) -> None:
    name = local_part("carol")
    carol = registered(parley, f"{name}@example.com", name="Carol")
    response = parley.http.post("/v1/auth/forgot-password", json={"email": f"{fullwidth(name)}@EXAMPLE.com"})
    assert response.status_code == 200, response.text
    resets = eventually_sync(
        lambda: email_requests(parley.database, user_id=carol["id"], template="password_reset"),
        what="the password-reset job for the account",
    )
    assert [reset.recipient for reset in resets] == [f"{name}@example.com"]


def test_the_admin_cli_and_the_admin_search_take_any_spelling(parley: Parley) -> None:
    name = local_part("root")
    command = subprocess.run(
        [
            str(PARLEY),
            "admin",
            "create-admin",
            "--email",
            fullwidth(name.upper()) + "@Example.COM",
            "--display-name",
            "Ops",
        ],
        env={**os.environ, "PARLEY_DATA_DIR": str(parley.data_dir), "PARLEY_ADMIN_PASSWORD": ADMIN_PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert command.returncode == 0, command.stdout + command.stderr
    assert f"created admin {name}@example.com" in command.stdout
    token = login(parley, f"{name}@example.com", ADMIN_PASSWORD).json()["tokens"]["access_token"]

    refused = subprocess.run(
        [
            str(PARLEY),
            "admin",
            "create-admin",
            "--email",
            f"r\u043e{name}@example.com",
            "--display-name",
            "M",
        ],
        env={**os.environ, "PARLEY_DATA_DIR": str(parley.data_dir), "PARLEY_ADMIN_PASSWORD": ADMIN_PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "email" in refused.stderr and "(EMAIL_LOCAL_PART_NOT_ASCII)" in refused.stderr

    zoe = registered(parley, f"{local_part('zoe')}@b\u00fccher.example", name="Zoe")
    for query in (
        fullwidth(zoe["email"].split("@")[0].upper()),
        zoe["email"].split("@")[0] + "@B\u00dcCHER",
    ):
        page = parley.http.get(
            "/v1/admin/users", params={"query": query}, headers={"authorization": f"Bearer {token}"}
        )
        assert page.status_code == 200, page.text
        assert [user["id"] for user in page.json()["users"]] == [zoe["id"]], query
