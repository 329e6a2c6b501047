"""A batch job runs every item on the config version it was submitted on, though the
worker's own config has moved on; and a worker that an active job uses cannot be
removed live."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import override_settings

from batches.models import BatchJob
from batches.services import Prompt, batch_create, batch_run_chunk, batch_workers_in_use
from orchestrator_site.errors import ConfigNeedsRestart
from pipeline.config import get_config, set_config
from pipeline.config.versions import settings_of, version_activate, version_create, workers_in_use
from pipeline.models import ConfigSource
from tests.conftest import Fakes, TenantFixture


@pytest.fixture
def scope() -> Iterator[str]:
    name = f"b{uuid.uuid4().hex[:10]}"
    with override_settings(PIPELINE_CONFIG_SCOPE=name):
        yield name
    set_config(None)


def suite_config(system_prompt: str) -> str:
    return Path(os.environ["PIPELINE_CONFIG"]).read_text(encoding="utf-8") + f'\n[assemble]\nsystem_prompt = "{system_prompt}"\n'


@pytest.mark.django_db
def test_a_job_runs_on_the_version_it_was_submitted_on(scope: str, owner: TenantFixture, fakes: Fakes) -> None:
    submitted = version_create(text=suite_config("submitted"), source=ConfigSource.CLI)
    set_config(settings_of(submitted), version=submitted.id)
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("first item", "a"), Prompt("second item", "b")], "worker": "openai"}, config=get_config())
    assert job.config_version == submitted.id
    later = version_create(text=suite_config("later"), source=ConfigSource.CLI)
    set_config(settings_of(later), version=later.id)
    fakes.openai.requests.clear()
    batch_run_chunk(job_id=str(job.id), first=0, last=1)
    job.refresh_from_db()
    assert job.status == BatchJob.Status.COMPLETED
    assert [r["body"]["messages"][0]["content"] for r in fakes.openai.requests] == ["submitted", "submitted"]


@pytest.mark.django_db
def test_a_job_from_before_versions_runs_on_the_process_config(scope: str, owner: TenantFixture, fakes: Fakes) -> None:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("old job", "a")], "worker": "openai"}, config=get_config())
    assert job.config_version == 0
    current = version_create(text=suite_config("current"), source=ConfigSource.CLI)
    set_config(settings_of(current), version=current.id)
    fakes.openai.requests.clear()
    batch_run_chunk(job_id=str(job.id), first=0, last=0)
    assert [r["body"]["messages"][0]["content"] for r in fakes.openai.requests] == ["current"]


@pytest.mark.django_db
def test_the_workers_of_active_jobs_are_in_use(scope: str, owner: TenantFixture) -> None:
    job = batch_create(tenant=owner.tenant, data={"prompts": [Prompt("x", "a")], "worker": "openai"}, config=get_config())
    assert batch_workers_in_use() == {"openai"} and "openai" in workers_in_use()
    base = Path(os.environ["PIPELINE_CONFIG"]).read_text(encoding="utf-8")
    version_activate(version_id=version_create(text=base, source=ConfigSource.CLI).id, by="t")
    without_openai = base.replace("[workers.openai]", "[workers.openai_gone]", 1)
    assert without_openai != base
    with pytest.raises(ConfigNeedsRestart, match=r"workers\.openai: removed while requests or batch jobs use it"):
        version_activate(version_id=version_create(text=without_openai, source=ConfigSource.CLI).id, by="t")
    BatchJob.objects.filter(id=job.id).update(status=BatchJob.Status.CANCELLED)
    assert batch_workers_in_use() == set()
