"""A job's results as they happen: ``GET /api/v1/batch/{id}/results?follow=true`` and
the WebSocket's ``batch_follow`` message.

The follower sends every finished item once, then ends when the job has ended.
Items finish out of index order (chunks run side by side, an item waits for its
provider), so an index cursor alone would skip the late ones: the follower keeps
the highest index it sent and the indexes below it still unfinished (``Cursor.holes``),
and asks Postgres, each ``POLL_S``, for the finished items above the one and among
the others. Whether the job has ended is read before the items, so the last round
sees every item recorded before the end. A follower that reconnects resumes with
``after`` (the items above an index), as a download does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async

from batches import services
from batches.models import BatchJob

POLL_S = 0.5  # how often Postgres is asked for what finished, while nothing has
HOLES_PER_QUERY = 1000


@dataclass
class Cursor:
    """What a follower has sent: every item up to ``high`` but the ``holes``."""

    high: int = -1
    holes: set[int] = field(default_factory=set)

    def next_page(self, job: BatchJob, limit: int = services.RESULTS_PAGE) -> list[dict[str, Any]]:
        """Finished items not yet sent, at most ``limit`` (the late ones first)."""
        rows: list[dict[str, Any]] = []
        waiting = sorted(self.holes)
        for start in range(0, len(waiting), HOLES_PER_QUERY):
            if len(rows) >= limit:
                break
            rows += services.batch_results(job=job, after=-1, limit=limit - len(rows), among=waiting[start : start + HOLES_PER_QUERY])
        self.holes.difference_update(row["index"] for row in rows)
        if len(rows) < limit:
            beyond = services.batch_results(job=job, after=self.high, limit=limit - len(rows))
            for row in beyond:
                self.holes.update(range(self.high + 1, row["index"]))  # passed over: not finished yet
                self.high = row["index"]
            rows += beyond
        return rows


def _ended(job_id: uuid.UUID) -> bool:
    return not BatchJob.objects.filter(pk=job_id, status__in=BatchJob.ACTIVE).exists()


async def follow(job: BatchJob, after: int = -1, *, poll_s: float | None = None) -> AsyncIterator[list[dict[str, Any]]]:
    """Pages of result lines as the job's items finish; done once the job has ended
    and every item that finished was sent."""
    cursor = Cursor(high=after)
    page_of = sync_to_async(cursor.next_page)
    ended_now = sync_to_async(_ended)
    while True:
        ended = await ended_now(job.pk)  # before the items: nothing recorded before the end is missed
        while page := await page_of(job):
            yield page
        if ended:
            return
        await asyncio.sleep(POLL_S if poll_s is None else poll_s)


async def follow_ndjson(job: BatchJob, after: int = -1) -> AsyncIterator[bytes]:
    async for page in follow(job, after):
        yield services.ndjson(page)
