"""Orchestration: a file conversion (plan, validate, write, verify, publish), the in-memory API, and reverse
conversion."""
