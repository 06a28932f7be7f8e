"""Read the transactional outbox of a running embedded Parley (`<data_dir>/parley.db`) from a test.

End-to-end tests use it to see the side effects a flow must leave behind (`user.registered`,
`session.revoked`, ...) and to pick up the single-use tokens that only exist in plaintext in
`email.requested` jobs, until the email worker delivers them somewhere a test could read.

    events = read_events(data_dir / "parley.db", "user.registered", subject=user_id)
    token = emailed_token(data_dir / "parley.db", user_id=user_id, template="verify_email")
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from parley.events.v1 import events_pb2
from services.common.events import payload_of

# Parley writes while tests read; WAL lets the reader see the last commit without waiting, and the
# timeout covers a checkpoint holding the lock for a moment.
_BUSY_TIMEOUT_S = 10.0


def read_events(
    sqlite_path: str | Path, event_type: str | None = None, subject: str | None = None
) -> list[events_pb2.Event]:
    """The outbox events, decoded, in commit order (oldest first); only those of `event_type`
    (e.g. "session.revoked") and/or about `subject` (e.g. a user id) when given."""
    query = "SELECT event_type, subject, payload FROM outbox_events"
    conditions: list[str] = []
    parameters: list[str] = []
    if event_type is not None:
        conditions.append("event_type = ?")
        parameters.append(event_type)
    if subject is not None:
        conditions.append("subject = ?")
        parameters.append(subject)
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    query += " ORDER BY sequence"
    uri = f"{Path(sqlite_path).resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S)) as connection:
        rows = connection.execute(query, parameters).fetchall()
    events = []
    for stored_type, stored_subject, payload in rows:
        event = events_pb2.Event.FromString(payload)
        # The columns are copies of the envelope for indexing; a mismatch is a bug in the writer.
        if (event.type, event.subject) != (stored_type, stored_subject):
            raise AssertionError(
                f"outbox row ({stored_type!r}, {stored_subject!r}) holds event "
                f"({event.type!r}, {event.subject!r})"
            )
        events.append(event)
    return events


def email_requests(
    sqlite_path: str | Path, *, user_id: str, template: str | None = None
) -> list[events_pb2.EmailRequested]:
    """The `email.requested` jobs queued for a user, oldest first; only `template`'s when given."""
    found = []
    for event in read_events(sqlite_path, "email.requested", subject=user_id):
        request = payload_of(event)
        assert isinstance(request, events_pb2.EmailRequested)
        if template is None or request.template == template:
            found.append(request)
    return found


def emailed_token(sqlite_path: str | Path, *, user_id: str, template: str) -> str:
    """The single-use token of the newest `template` email queued for the user ("verify_email",
    "password_reset"): the `token` parameter of its `email.requested` job."""
    requests = email_requests(sqlite_path, user_id=user_id, template=template)
    if not requests:
        raise AssertionError(f"no {template!r} email was queued for user {user_id}")
    token = requests[-1].params.get("token", "")
    if not token:
        raise AssertionError(f"the newest {template!r} email for user {user_id} carries no token")
    return token
