"""``/api/v1/stream`` with batch jobs: the WebSocket API's consumer, plus
``{"type": "batch_follow", "job_id": "…", "after": -1}``.

The answer is a ``batch.result`` event for each item as it finishes (``line``: the
results endpoint's line), then one ``batch.done`` with the job's status and counts,
tagged with the message's ``id`` as every event is. Several jobs and prompts can be
followed at once on one connection, within its limit of streams.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async

from batches import follow, services
from batches.api.serializers import counts
from batches.models import BatchJob
from orchestrator_site.errors import InvalidRequest
from pipeline.consumers import StreamConsumer


class BatchStreamConsumer(StreamConsumer):
    HANDLERS = {**StreamConsumer.HANDLERS, "batch_follow": "on_batch_follow"}

    async def on_batch_follow(self, message: dict[str, Any]) -> None:
        principal = self.principal_or_refuse()
        self.room_for_one_more()
        after = message.get("after", -1)
        if not isinstance(after, int) or isinstance(after, bool) or after < -1:
            raise InvalidRequest("after must be an integer of -1 or more", data={"field": "after"})
        job = await sync_to_async(services.batch_get)(tenant_id=principal.tenant_id, job_id=message.get("job_id"))
        self.forward(f"batch:{job.id}:{uuid.uuid4().hex[:8]}", _events(job, after), self.message_id)


async def _events(job: BatchJob, after: int) -> AsyncIterator[dict[str, Any]]:
    job_id = str(job.id)
    async for page in follow.follow(job, after):
        for line in page:
            yield {"type": "batch.result", "job_id": job_id, "line": line}
    ended = await sync_to_async(_ended_state)(job.pk)
    yield {"type": "batch.done", "job_id": job_id, **ended}


def _ended_state(job_id: uuid.UUID) -> dict[str, Any]:
    job = BatchJob.objects.get(pk=job_id)
    return {"status": job.status, "counts": counts(job, job.items_settled)}
