"""Helpers shared by the test suites (databases, gateway processes)."""
