"""Rate-limit files for tests: the shipped rules, scaled so functional tests never hit them, or
tightened so rate-limit tests hit them after a few requests."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from services.common.ratelimit import DEFAULT_RATE_LIMITS_FILE


def scaled_rate_limits(
    factor: int, *, overrides: Mapping[str, Mapping[str, Any]] | None = None, directory: Path | None = None
) -> Path:
    """envoy/ratelimits.yaml with every rate and burst multiplied by `factor`, then `overrides`
    (limit name -> fields, e.g. {"login_ip": {"burst": 3}}) applied; same routes and descriptors."""
    document = yaml.safe_load(DEFAULT_RATE_LIMITS_FILE.read_text(encoding="utf-8"))
    for limit in document["limits"]:
        limit["rate"]["requests"] *= factor
        limit["burst"] *= factor
        limit.update((overrides or {}).get(limit["name"], {}))
    target_dir = directory or Path(tempfile.mkdtemp(prefix="parley-ratelimits-"))
    path = target_dir / f"ratelimits-x{factor}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@functools.cache
def generous_rate_limits() -> Path:
    """The shipped rules with 10,000 times the budget: functional e2e tests never meet a limit."""
    return scaled_rate_limits(10_000)
