"""Every shell example in README.md, typed as a reader would, by a real shell against a real `parley up`.

The examples run in README order, unchanged but for three things a reader does too: the documented
addresses (`127.0.0.1:8080`, `localhost:8080`, ...) become this test's free ports, `<placeholders>`
become values earlier examples printed (`<access_token>` from the login example), and `.venv/bin`
is on the PATH, as the README tells a reader to arrange. Each example must exit 0, and each curl
must answer 2xx unless it is listed in EXPECTED_ERRORS. A wrapper around curl reports the HTTP
status on stderr (`--write-out`), so the README's commands stay what a reader types.

Commands that start or test Parley itself are not run; they are listed in NOT_RUN with the reason,
and a key there that no README command starts with fails the test, so the list cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from tests.support.parley_process import REPO_ROOT, EmbeddedPorts, parley_up_serving
from tests.support.polling import eventually_sync

README: Final = REPO_ROOT / "README.md"
SHELLS: Final = {"sh": "sh", "bash": "bash"}  # the fence's language -> the shell that runs the block

# The start of each README command that is not run here, and why.
NOT_RUN: Final[Mapping[str, str]] = {
    "scripts/up": "starts Parley (and bootstraps .venv); this test runs `parley up` itself",
    "scripts/test": "runs the whole suite, this test included",
    "export PARLEY_DATABASE_URL=": "microservices mode: points the recipe at a PostgreSQL database "
    "`parley`, which a test must not touch (tests/e2e/test_microservices.py runs that mode)",
    "parley migrate": "microservices mode: migrates that database",
    "parley pki init": "microservices mode: writes ./var/pki for the processes below",
    "parley serve ": "microservices mode: starts the four services",
    "parley gateway ": "microservices mode: starts Envoy and the edge",
    "export PARLEY_REDIS_URL=": "microservices mode: the workers' Redis and SMTP server",
    "parley worker ": "microservices mode: starts the relay and the email worker",
}

# Examples documented to answer an error: a piece of the command -> the HTTP status it must answer.
EXPECTED_ERRORS: Final[Mapping[str, int]] = {
    "/v1/billing/plans?page_size=-1": 400,  # "a typed JSON error"
}

# The addresses the README documents, by the EmbeddedPorts field that replaces their port here.
DOCUMENTED_PORTS: Final[Mapping[int, str]] = {
    8080: "http",
    50051: "grpc",
    50052: "edge",
    9464: "metrics",
    9465: "edge_metrics",
    9901: "admin",
}
_ADDRESS: Final = re.compile(r"(?<![\w.])(127\.0\.0\.1|localhost):(\d+)\b")
_PLACEHOLDER: Final = re.compile(r"<([a-z][a-z0-9_]*)>")
_FENCE: Final = re.compile(r"^```(\w*)\s*$")
_SHELL_SAFE: Final = re.compile(r"[\w.~+/=-]+")

# Defined ahead of every example: the README's `curl` runs with one more option that writes the
# HTTP status to stderr, where it cannot mix with the body a later example may read.
STATUS_MARK: Final = "readme-example-http-status="
CURL_WITH_STATUS: Final = (
    f"curl() {{ command curl --write-out '%{{stderr}}{STATUS_MARK}%{{http_code}}\\n' \"$@\"; }}\n"
)


@dataclass(frozen=True)
class Example:
    """One command of a README shell block: continuation lines joined, its line number kept."""

    command: str
    line: int
    shell: str

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.command}"


def shell_examples(markdown: str) -> list[Example]:
    """The commands of the ```sh and ```bash blocks; blank and comment-only lines are left out."""
    examples: list[Example] = []
    shell: str | None = None
    in_block = False
    pending: list[str] = []
    start = 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        fence = _FENCE.match(line)
        if fence:
            in_block = not in_block
            shell = SHELLS.get(fence.group(1)) if in_block else None
            continue
        if shell is None:
            continue
        if not pending:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].rstrip())
            continue
        pending.append(line.strip() if pending else line.rstrip())
        examples.append(Example(" ".join(part for part in pending if part), start, shell))
        pending = []
    return examples


_BODY_OPTIONS: Final = ("-d", "--data", "--data-raw", "--data-binary", "--data-ascii")
_HEADER_OPTIONS: Final = ("-H", "--header")


def sends_body_without_json_content_type(command: str) -> bool:
    """Whether a curl command sends a body but no `content-type: application/json`: curl then says
    `application/x-www-form-urlencoded`, which the gateway refuses (415)."""
    words = shlex.split(command, comments=True)
    if not words or words[0] != "curl":
        return False
    sends_body = False
    json_content_type = False
    for position, word in enumerate(words):
        if word == "--json":  # curl sets the JSON content type itself
            return False
        if word in _BODY_OPTIONS or (word.startswith("-d") and len(word) > 2):
            sends_body = True
        header = None
        if word in _HEADER_OPTIONS and position + 1 < len(words):
            header = words[position + 1]
        elif word.startswith("-H") and len(word) > 2:
            header = word[2:]
        if header is not None:
            name, _, value = header.partition(":")
            if name.strip().lower() == "content-type" and "application/json" in value.lower():
                json_content_type = True
    return sends_body and not json_content_type


def not_run_reason(example: Example) -> str | None:
    return next((why for start, why in NOT_RUN.items() if example.command.startswith(start)), None)


def readme_examples() -> list[Example]:
    return shell_examples(README.read_text(encoding="utf-8"))


# --- the examples on paper ------------------------------------------------------------------------


SAMPLE_README = """
Some prose with `curl -d x` inline, which is not a block.

```sh
curl -s localhost:8080/v1/auth/login \\
  -d '{"email":"ada@example.com"}'            # no content type: curl says form-urlencoded
curl -s localhost:8080/v1/auth/login -H 'Content-Type: application/json' -d '{}'
# a comment line

curl -s localhost:8080/v1/billing/plans     # no body
```

```json
{"not": "a command"}
```

```bash
curl -s localhost:8080/v1/auth/login --json '{}'
curl -s localhost:8080/v1/auth/login -H "content-type: text/plain" --data-raw '{}'
```
"""


def test_examples_are_read_from_sh_and_bash_blocks_with_continuations_joined() -> None:
    examples = shell_examples(SAMPLE_README)
    assert [(example.line, example.shell) for example in examples] == [
        (5, "sh"),
        (7, "sh"),
        (10, "sh"),
        (18, "bash"),
        (19, "bash"),
    ]
    assert examples[0].command == (
        'curl -s localhost:8080/v1/auth/login -d \'{"email":"ada@example.com"}\''
        "            # no content type: curl says form-urlencoded"
    )


def test_the_checker_finds_a_body_sent_without_the_json_content_type() -> None:
    flagged = [
        example.line
        for example in shell_examples(SAMPLE_README)
        if sends_body_without_json_content_type(example.command)
    ]
    assert flagged == [5, 19]


def test_every_readme_curl_that_sends_a_body_says_it_is_json() -> None:
    missing = [
        str(example) for example in readme_examples() if sends_body_without_json_content_type(example.command)
    ]
    assert missing == []


def test_the_not_run_and_expected_error_lists_name_only_readme_commands() -> None:
    commands = [example.command for example in readme_examples()]
    assert [start for start in NOT_RUN if not any(command.startswith(start) for command in commands)] == []
    assert [piece for piece in EXPECTED_ERRORS if not any(piece in command for command in commands)] == []


# --- the examples against `parley up` ------------------------------------------------------------


@dataclass(frozen=True)
class RunningParley:
    ports: EmbeddedPorts
    data_dir: Path


@pytest.fixture(scope="module")
def parley_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningParley]:
    data_dir = tmp_path_factory.mktemp("readme-parley-data")
    with parley_up_serving(data_dir, log_path=data_dir / "parley.log") as (process, ports):
        eventually_sync(lambda: "Parley is up" in process.output(), what="`parley up` announcing itself")
        yield RunningParley(ports, data_dir)


def with_test_addresses(command: str, ports: EmbeddedPorts) -> str:
    def replace(address: re.Match[str]) -> str:
        host, port = address.group(1), int(address.group(2))
        if port not in DOCUMENTED_PORTS:
            raise AssertionError(f"{command!r} uses {host}:{port}, which DOCUMENTED_PORTS does not map")
        return f"{host}:{getattr(ports, DOCUMENTED_PORTS[port])}"

    return _ADDRESS.sub(replace, command)


def with_learned_values(command: str, learned: Mapping[str, str]) -> str:
    def replace(placeholder: re.Match[str]) -> str:
        name = placeholder.group(1)
        if name not in learned:
            raise AssertionError(f"no earlier example printed a {name!r} for {command!r}")
        value = learned[name]
        # Pasted into the command as a reader would: fine for tokens and ids, which need no quoting.
        if not _SHELL_SAFE.fullmatch(value):
            raise AssertionError(f"{name}={value!r} would need shell quoting in {command!r}")
        return value

    return _PLACEHOLDER.sub(replace, command)


def learn_from(output: str, learned: dict[str, str]) -> None:
    """Every string field of a JSON answer, by name, for the placeholders of later examples."""
    try:
        answer = json.loads(output)
    except ValueError:
        return

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, str):
                    learned[key] = item
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(answer)


@dataclass(frozen=True)
class Outcome:
    example: Example
    ran: str
    exit_code: int
    statuses: list[int]
    stdout: str
    stderr: str

    def report(self, problem: str) -> str:
        return (
            f"{self.example}\n  ran: {self.ran}\n  {problem}\n  exit {self.exit_code}, "
            f"HTTP {self.statuses}\n  stdout: {self.stdout[-800:]!r}\n  stderr: {self.stderr[-800:]!r}"
        )


def run_example(example: Example, command: str, env: Mapping[str, str], cwd: Path) -> Outcome:
    finished = subprocess.run(
        [example.shell, "-c", CURL_WITH_STATUS + command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    statuses = [
        int(line.removeprefix(STATUS_MARK))
        for line in finished.stderr.splitlines()
        if line.startswith(STATUS_MARK)
    ]
    stderr = "\n".join(line for line in finished.stderr.splitlines() if not line.startswith(STATUS_MARK))
    return Outcome(example, command, finished.returncode, statuses, finished.stdout, stderr)


def problem_with(outcome: Outcome) -> str | None:
    if outcome.exit_code != 0:
        return "exited non-zero"
    if shlex.split(outcome.ran, comments=True)[0] != "curl":
        return None
    if len(outcome.statuses) != 1:
        return "expected one HTTP answer"
    expected = next((status for piece, status in EXPECTED_ERRORS.items() if piece in outcome.ran), None)
    status = outcome.statuses[0]
    if expected is None:
        return None if 200 <= status < 300 else "expected a 2xx answer"
    if status != expected:
        return f"expected the documented error {expected}"
    try:
        body = json.loads(outcome.stdout)
    except ValueError:
        body = {}
    is_status = isinstance(body, dict) and {"code", "message", "details"} <= set(body)
    return None if is_status else "expected a google.rpc.Status body"


@pytest.mark.envoy
def test_every_readme_shell_example_works_against_parley_up(parley_up: RunningParley, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # The variable the README documents for the data dir, which `parley grpcurl` reads its
        # operator certificate from.
        "PARLEY_DATA_DIR": str(parley_up.data_dir),
    }
    learned: dict[str, str] = {}
    failures: list[str] = []
    ran = 0
    for example in readme_examples():
        if not_run_reason(example) is not None:
            continue
        try:
            command = with_learned_values(with_test_addresses(example.command, parley_up.ports), learned)
        except AssertionError as unusable:
            failures.append(f"{example}\n  {unusable}")
            continue
        outcome = run_example(example, command, env, tmp_path)
        ran += 1
        problem = problem_with(outcome)
        if problem is not None:
            failures.append(outcome.report(problem))
        learn_from(outcome.stdout, learned)
    assert ran > 0
    assert failures == [], "\n\n".join(failures)
