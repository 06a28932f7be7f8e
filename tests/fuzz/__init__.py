"""The bounded schemathesis run against the real gateway (`python -m tests.fuzz.gateway`)."""
