"""A bounded schemathesis run against the real gateway: `.venv/bin/python -m tests.fuzz.gateway`.

It starts `parley up` (embedded, a temporary data dir, free ports), registers and verifies a user,
signs in, creates an API key, and fetches the OpenAPI document the gateway serves
(`/openapi.json`). Then it runs schemathesis twice with tests/fuzz/schemathesis.toml, once with
`Authorization: Bearer <access token>` and once with `X-API-Key: <key>`. The operations that would
end the pass's own credential are excluded there; the operations whose RPC is not built yet
(tests/fuzz/not_built.py) may answer 501, and nothing else may answer a 5xx.

It prints one line per pass and writes `gateway-fuzz.json` (cases, failures per check, 5xx count,
elapsed) and schemathesis's reports to $PARLEY_TEST_OUTPUT_DIR (default var/test-output/). The exit
code is non-zero on any failure, on an error of the run itself, and when the passes outrun the
wall-clock cap (--max-seconds).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fuzz.not_built import not_built_operations
from tests.support.outbox import emailed_token
from tests.support.parley_process import REPO_ROOT, EmbeddedPorts, ParleyProcess
from tests.support.polling import eventually_sync

CONFIG_FILE = Path(__file__).with_name("schemathesis.toml")
# Defects the run found in code other work owns, each to be deleted when fixed (see the file).
HOOKS_MODULE = "tests.fuzz.hooks"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "var" / "test-output"
# The whole fuzz step stays within 4 minutes on the 2-core CI machine: about 40 s to start Parley
# and sign in, the rest for the two passes. A pass that outruns what is left is stopped and fails.
DEFAULT_MAX_SECONDS = 200.0
PASSWORD = "violet-harbour-lantern-42"
# What a 501 is allowed on: the statuses not_a_server_error accepts by default, plus 501.
NOT_BUILT_STATUSES = ["2xx", "3xx", "4xx", "501"]
MAX_EXAMPLES_PER_CHECK = 5
EXAMPLE_BODY_CHARS = 400


@dataclass(frozen=True)
class Credential:
    """One way the fuzz user presents itself, as the header schemathesis sends on every request."""

    name: str
    header: str
    value: str


@dataclass
class PassSummary:
    """What one schemathesis pass found."""

    credential: str
    exit_code: int
    elapsed_s: float
    operations_tested: int
    cases: int
    responses: int
    server_errors: int
    # 5xx statuses other than a not-built operation's 501: each one is a failure.
    unexpected_server_errors: int
    statuses: dict[str, int]
    failures_per_check: dict[str, int]
    # Up to MAX_EXAMPLES_PER_CHECK failing exchanges per check, to route each defect from the summary.
    failure_examples: dict[str, list[dict[str, Any]]]
    errors: list[str]
    timed_out: bool = False
    reports: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (
            self.exit_code == 0
            and not self.timed_out
            and not self.unexpected_server_errors
            and not any(self.failures_per_check.values())
            and not self.errors
        )

    def line(self) -> str:
        failures = sum(self.failures_per_check.values())
        verdict = "passed" if self.passed else "FAILED"
        detail = (
            f"{self.cases} cases on {self.operations_tested} operations, {self.responses} responses, "
            f"{self.server_errors} 5xx ({self.unexpected_server_errors} unexpected), "
            f"{failures} check failures, {len(self.errors)} errors, {self.elapsed_s:.0f}s"
        )
        extra = ""
        if failures:
            extra = (
                " ["
                + ", ".join(f"{name}: {n}" for name, n in sorted(self.failures_per_check.items()) if n)
                + "]"
            )
        if self.timed_out:
            extra += " [stopped at the wall-clock cap]"
        return f"gateway fuzz ({self.credential}): {verdict}: {detail}{extra}"


# --- Parley and the fuzz user -------------------------------------------------------------------------


@contextmanager
def running_parley(data_dir: Path) -> Iterator[str]:
    """`parley up` on free ports with a fresh data dir; yields the gateway's base URL."""
    ports = EmbeddedPorts()
    # The shared .venv's editable install points at one checkout; the child runs this one's code,
    # the code the run is meant to check, from whichever worktree the run starts in.
    python_path = [str(REPO_ROOT), str(REPO_ROOT / "gen"), os.environ.get("PYTHONPATH", "")]
    process = ParleyProcess(
        ["up"],
        env={
            **ports.env(),
            "PARLEY_DATA_DIR": str(data_dir),
            "PYTHONPATH": os.pathsep.join(part for part in python_path if part),
        },
        log_path=data_dir.parent / "parley.log",
    )
    process.start()
    try:
        base_url = f"http://127.0.0.1:{ports.http}"
        process.wait_until_http_ok(f"{base_url}/healthz", timeout_s=90.0)
        eventually_sync(
            lambda: "Parley is up" in process.output(),
            what="`parley up` announcing itself",
            alive=process.check_alive,
        )
        yield base_url
    finally:
        try:
            process.terminate()
        finally:
            process.kill()


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        request = response.request
        raise RuntimeError(
            f"{request.method} {request.url.path} answered {response.status_code}: {response.text}"
        )
    body: dict[str, Any] = response.json()
    return body


def fuzz_credentials(base_url: str, data_dir: Path) -> list[Credential]:
    """Register and verify a user, sign in and create an API key: a JWT and a key for the passes."""
    email = f"fuzz-{uuid.uuid4().hex[:12]}@example.com"
    with httpx.Client(base_url=base_url, timeout=30.0) as http:
        user = _ok(
            http.post(
                "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Fuzz"}
            )
        )["user"]
        # The verification mail's token, as the link carries it, read from the outbox job that mails it.
        token = emailed_token(data_dir / "parley.db", user_id=user["id"], template="verify_email")
        _ok(http.post("/v1/auth/verify-email", json={"token": token}))
        access_token = _ok(http.post("/v1/auth/login", json={"email": email, "password": PASSWORD}))[
            "tokens"
        ]["access_token"]
        key = _ok(
            http.post(
                "/v1/users/me/api-keys",
                json={"name": "gateway fuzz"},
                headers={"authorization": f"Bearer {access_token}"},
            )
        )["secret"]
    return [
        Credential("jwt", "Authorization", f"Bearer {access_token}"),
        Credential("api-key", "X-API-Key", key),
    ]


def fetch_openapi(base_url: str, target: Path) -> Path:
    with httpx.Client(base_url=base_url, timeout=30.0) as http:
        document = _ok(http.get("/openapi.json"))
    target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return target


# --- schemathesis ---------------------------------------------------------------------------------------


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def effective_config(not_built: Sequence[str], *, extra: Path | None = None) -> str:
    """tests/fuzz/schemathesis.toml, plus the not-built operations' 501 allowance and `extra` (a local
    config for an investigation, never the committed run)."""
    text = CONFIG_FILE.read_text(encoding="utf-8").rstrip() + "\n"
    if not_built:
        text += (
            "\n# Added by tests/fuzz/gateway.py from tests/fuzz/not_built.py: RPCs not built answer 501.\n"
            "[[operations]]\n"
            f"include-operation-id = {_toml_list(sorted(not_built))}\n"
            f"checks.not_a_server_error.expected-statuses = {_toml_list(NOT_BUILT_STATUSES)}\n"
        )
    if extra is not None:
        text += f"\n# Local additions from {extra}\n" + extra.read_text(encoding="utf-8")
    tomllib.loads(text)  # fail here, with the line, rather than inside schemathesis
    return text


def run_pass(
    credential: Credential,
    *,
    base_url: str,
    schema: Path,
    config: Path,
    output_dir: Path,
    labels: dict[str, str],
    not_built: frozenset[str],
    timeout_s: float,
    max_examples: int | None = None,
) -> PassSummary:
    """One schemathesis run with `credential`; its reports go to `output_dir/<credential>/`."""
    report_dir = output_dir / credential.name
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir(parents=True)
    json_report = report_dir / "report.json"
    ndjson_report = report_dir / "events.ndjson"
    command = [
        str(SCHEMATHESIS),
        "--no-color",
        "--config-file",
        str(config),
        "run",
        str(schema),
        "--url",
        base_url,
        "--header",
        f"{credential.header}: {credential.value}",
        "--report",
        "json,ndjson,junit",
        "--report-dir",
        str(report_dir),
        "--report-json-path",
        str(json_report),
        "--report-ndjson-path",
        str(ndjson_report),
    ]
    if max_examples is not None:
        command += ["--max-examples", str(max_examples)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS_MODULE}
    started = time.monotonic()
    timed_out = False
    with (report_dir / "output.txt").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            exit_code = process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            process.kill()
            exit_code = process.wait()
    elapsed = time.monotonic() - started
    summary = summarize(
        credential.name,
        exit_code=exit_code,
        elapsed_s=elapsed,
        json_report=json_report,
        ndjson_report=ndjson_report,
        labels=labels,
        not_built=not_built,
    )
    summary.timed_out = timed_out
    summary.reports = {
        "json": str(json_report),
        "ndjson": str(ndjson_report),
        "output": str(report_dir / "output.txt"),
    }
    return summary


def operation_labels(schema: dict[str, Any]) -> dict[str, str]:
    """schemathesis's label of each operation ("GET /v1/models") -> its operationId."""
    return {
        f"{method.upper()} {path}": operation["operationId"]
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "operationId" in operation
    }


def _decoded(content: Any) -> str:
    if isinstance(content, dict) and "$base64" in content:
        return base64.b64decode(content["$base64"]).decode("utf-8", errors="replace")
    return content if isinstance(content, str) else ""


def summarize(
    credential: str,
    *,
    exit_code: int,
    elapsed_s: float,
    json_report: Path,
    ndjson_report: Path,
    labels: dict[str, str],
    not_built: frozenset[str],
) -> PassSummary:
    """Read a pass's reports: the run's verdict from the JSON one; each response, and each check's
    outcome on it, from the NDJSON event log (`ScenarioFinished.recorder`)."""
    report: dict[str, Any] = {}
    if json_report.exists():
        report = json.loads(json_report.read_text(encoding="utf-8"))
    statuses: Counter[int] = Counter()
    unexpected_5xx: list[dict[str, Any]] = []
    failures: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    checks_run: set[str] = set()
    lines = ndjson_report.read_text(encoding="utf-8").splitlines() if ndjson_report.exists() else []
    for line in lines:
        scenario = json.loads(line).get("ScenarioFinished")
        if not scenario:
            continue
        recorder = scenario["recorder"]
        operation_id = labels.get(recorder["label"], "")
        interactions = recorder.get("interactions", {})
        for interaction in interactions.values():
            response = interaction.get("response")
            if not response:
                continue
            status = int(response["status_code"])
            statuses[status] += 1
            if status >= 500 and not (status == 501 and operation_id in not_built):
                unexpected_5xx.append(_example(recorder["label"], interaction, "not_a_server_error"))
        for case_id, outcomes in recorder.get("checks", {}).items():
            for outcome in outcomes:
                checks_run.add(outcome["name"])
                if outcome["status"] != "failure":
                    continue
                failures[outcome["name"]] += 1
                found = examples.setdefault(outcome["name"], [])
                if case_id in interactions and len(found) < MAX_EXAMPLES_PER_CHECK:
                    found.append(_example(recorder["label"], interactions[case_id], outcome["name"]))
    operations = report.get("operations") or {}
    test_cases = report.get("test_cases") or {}
    return PassSummary(
        credential=credential,
        exit_code=exit_code,
        elapsed_s=round(elapsed_s, 1),
        operations_tested=int(operations.get("tested", 0)),
        cases=int(test_cases.get("generated", 0)),
        responses=sum(statuses.values()),
        server_errors=sum(count for status, count in statuses.items() if status >= 500),
        unexpected_server_errors=len(unexpected_5xx),
        statuses={str(status): statuses[status] for status in sorted(statuses)},
        failures_per_check={name: failures[name] for name in sorted(checks_run | failures.keys())},
        failure_examples={
            **examples,
            **({"unexpected_5xx": unexpected_5xx[:MAX_EXAMPLES_PER_CHECK]} if unexpected_5xx else {}),
        },
        errors=[f"{error['title']} ({error['count']})" for error in report.get("errors", [])],
    )


def _example(label: str, interaction: dict[str, Any], check: str) -> dict[str, Any]:
    """One failing exchange, short enough to read in the summary."""
    request = interaction.get("request", {})
    response = interaction.get("response") or {}
    return {
        "check": check,
        "operation": label,
        "request": f"{request.get('method', '')} {request.get('uri', '')}",
        "request_body": _decoded(request.get("body"))[:EXAMPLE_BODY_CHARS],
        "status": response.get("status_code"),
        "response_body": _decoded(response.get("content"))[:EXAMPLE_BODY_CHARS],
    }


# --- the run -------------------------------------------------------------------------------------------


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def output_dir_from_env() -> Path:
    configured = os.environ.get("PARLEY_TEST_OUTPUT_DIR")
    return Path(configured) if configured else DEFAULT_OUTPUT_DIR


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz.gateway", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="default: $PARLEY_TEST_OUTPUT_DIR or var/test-output"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"wall-clock cap for both passes together (default {DEFAULT_MAX_SECONDS:.0f})",
    )
    parser.add_argument(
        "--credential",
        choices=["jwt", "api-key"],
        action="append",
        help="run only this pass (repeatable; default both)",
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="cases per operation instead of the config's, for a deeper local run",
    )
    parser.add_argument(
        "--extra-config",
        type=Path,
        default=None,
        help="TOML appended to the config, for a local investigation (e.g. excluding a known failure)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = (args.output_dir or output_dir_from_env()) / "gateway-fuzz"
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    not_built = not_built_operations()
    config = output_dir / "schemathesis.toml"
    config.write_text(
        effective_config(sorted(not_built), extra=args.extra_config),
        encoding="utf-8",
    )
    summaries: list[PassSummary] = []
    with tempfile.TemporaryDirectory(prefix="parley-fuzz-") as scratch:
        data_dir = Path(scratch) / "data"
        data_dir.mkdir(mode=0o700)
        try:
            with running_parley(data_dir) as base_url:
                credentials = fuzz_credentials(base_url, data_dir)
                schema = fetch_openapi(base_url, output_dir / "openapi.json")
                labels = operation_labels(json.loads(schema.read_text(encoding="utf-8")))
                deadline = time.monotonic() + args.max_seconds
                for credential in credentials:
                    if args.credential and credential.name not in args.credential:
                        continue
                    summary = run_pass(
                        credential,
                        base_url=base_url,
                        schema=schema,
                        config=config,
                        output_dir=output_dir,
                        labels=labels,
                        not_built=not_built,
                        timeout_s=deadline - time.monotonic(),
                        max_examples=args.max_examples,
                    )
                    summaries.append(summary)
                    _say(summary.line())
        finally:
            # Keep Parley's log next to the reports: a 5xx's cause is in it.
            log = Path(scratch) / "parley.log"
            if log.exists():
                shutil.copyfile(log, output_dir / "parley.log")
    passed = bool(summaries) and all(summary.passed for summary in summaries)
    document = {
        "passed": passed,
        "elapsed_s": round(time.monotonic() - started, 1),
        "not_built_operations": sorted(not_built),
        "passes": [{**asdict(summary), "passed": summary.passed} for summary in summaries],
    }
    summary_path = output_dir / "gateway-fuzz.json"
    summary_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    _say(f"gateway fuzz: {'passed' if passed else 'FAILED'}; summary in {summary_path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
