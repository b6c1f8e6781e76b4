"""How an engine's verifying steps ran, for the speculative-decoding tests."""

from __future__ import annotations


def verify_path(runner) -> str:
    """How a verifying step runs on this ModelRunner: "rows" (one-token decode rows) where it takes
    them, else "chunks" (runner.py, NOTE [ drafts verified as decode rows ])."""
    return "rows" if runner.verify_rows else "chunks"
