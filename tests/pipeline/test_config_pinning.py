"""A request finishes on the config version it started on: a worker that has moved on
runs it with the version the gateway stamped into it. Run in this process, as a
real-time worker runs it, against the fake OpenAI."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import override_settings

from pipeline.config import config_version, get_config, set_config
from pipeline.config.versions import settings_of, version_activate, version_create
from pipeline.models import ConfigSource
from pipeline.services import start
from pipeline.tokenbus import get_bus
from tests.conftest import Fakes, TenantFixture, run_in_process

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def scope() -> Iterator[str]:
    name = f"p{uuid.uuid4().hex[:10]}"
    with override_settings(PIPELINE_CONFIG_SCOPE=name):
        yield name
    set_config(None)


def suite_config(system_prompt: str, **tables: str) -> str:
    extra = "".join(f"\n[{table}]\n{body}\n" for table, body in tables.items())
    return Path(os.environ["PIPELINE_CONFIG"]).read_text(encoding="utf-8") + f'\n[assemble]\nsystem_prompt = "{system_prompt}"\n' + extra


def system_prompts_sent(fakes: Fakes, prompt: str) -> list[str]:
    return [
        b["messages"][0]["content"]
        for b in [r["body"] for r in list(fakes.openai.requests)]
        if any(prompt in str(m.get("content")) for m in b.get("messages", []))
    ]


def test_an_in_flight_request_runs_on_the_version_it_started_on(scope: str, owner: TenantFixture, fakes: Fakes) -> None:
    old = version_activate(version_id=version_create(text=suite_config("old prompt"), source=ConfigSource.CLI).id, by="t")
    set_config(settings_of(old), version=old.id)
    request = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "pinned one", "worker": "openai"}, config=get_config())
    assert request.config_version == old.id
    new = version_activate(version_id=version_create(text=suite_config("new prompt"), source=ConfigSource.CLI).id, by="t")
    set_config(settings_of(new), version=new.id)  # the worker has moved on before the run
    run_in_process(request)
    assert get_bus().read_all(request.request_id)[-1].type == "done"
    assert system_prompts_sent(fakes, "pinned one") == ["old prompt"]
    fresh = start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "fresh one", "worker": "openai"}, config=get_config())
    run_in_process(fresh)
    assert fresh.config_version == new.id and system_prompts_sent(fakes, "fresh one") == ["new prompt"]


def test_a_request_from_the_file_era_runs_on_the_process_config(scope: str, owner: TenantFixture, fakes: Fakes) -> None:
    current = version_create(text=suite_config("current prompt"), source=ConfigSource.CLI)
    set_config(settings_of(current), version=current.id)
    request = dataclasses.replace(
        start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "unstamped", "worker": "openai"}, config=get_config()), config_version=0
    )
    run_in_process(request)
    assert config_version() == current.id and system_prompts_sent(fakes, "unstamped") == ["current prompt"]


def test_a_pinned_version_keeps_its_own_limits_too(scope: str, owner: TenantFixture, fakes: Fakes) -> None:
    """The post-process settings of the version it started on: a stop sequence the newer
    version dropped still cuts the answer."""
    fakes.openai.tokens = ["keep", " this", " STOP", " not this"]
    old = version_create(text=suite_config("p", postprocess='stop = ["STOP"]'), source=ConfigSource.CLI)
    new = version_create(text=suite_config("p"), source=ConfigSource.CLI)
    set_config(settings_of(new), version=new.id)
    request = dataclasses.replace(
        start.infer_build_request(tenant_id=str(owner.tenant.id), data={"prompt": "cut me", "worker": "openai"}, config=get_config()), config_version=old.id
    )
    run_in_process(request)
    done = get_bus().read_all(request.request_id)[-1]
    assert done.type == "done" and done.data["text"] == "keep this"
