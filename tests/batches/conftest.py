"""The batch tests' fixtures."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The chunks a test's code queued (job, first, last, queue, countdown), kept
    here instead of sent: the test runs them itself."""
    from batches.tasks import run_batch_chunk

    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(run_batch_chunk, "apply_async", lambda args, **options: seen.append((*args, options["queue"], options["countdown"])))
    return seen


@pytest.fixture
def deliveries_queued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The jobs whose delivery was queued, kept here: the test delivers them itself."""
    from batches.tasks import deliver_batch

    seen: list[str] = []
    monkeypatch.setattr(deliver_batch, "apply_async", lambda args, **options: seen.append(args[0]))
    return seen
