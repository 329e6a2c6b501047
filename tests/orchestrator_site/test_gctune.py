"""The long-lived processes put their start-up objects out of the collector's reach."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator_site import gctune
from tests.conftest import ROOT


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.fixture
def freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GC_FREEZE", "1")


def test_settle_freezes_what_exists_and_collects_the_young_less_often(restored_gc: None, freezing: None) -> None:
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    gctune.settle()
    assert gc.get_freeze_count() > 1000  # this test process's modules at least
    assert gc.get_threshold()[0] == gctune.YOUNG_THRESHOLD


def test_a_full_collection_after_settling_walks_only_what_came_since(restored_gc: None, freezing: None) -> None:
    gctune.settle()
    garbage = []
    for _ in range(1000):
        cycle: list[object] = []
        cycle.append(cycle)
        garbage.append(cycle)
    del garbage, cycle
    assert gc.collect() >= 1000  # what came since is still collected


@pytest.mark.parametrize("signal_name", ["worker_ready", "worker_process_init"])
def test_celery_workers_settle_once_ready_and_in_each_pool_process(restored_gc: None, freezing: None, signal_name: str) -> None:
    import celery.signals

    import orchestrator_site.celery  # noqa: F401  (connects the receivers)

    gc.unfreeze()
    getattr(celery.signals, signal_name).send(sender=None)
    assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == gctune.YOUNG_THRESHOLD


def test_the_gateway_settles_when_its_application_is_loaded() -> None:
    code = "import gc; import orchestrator_site.asgi; print(gc.get_freeze_count(), gc.get_threshold()[0])"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings", "GC_FREEZE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    frozen, young = int(out[0]), int(out[1])
    assert frozen > 50_000 and young == gctune.YOUNG_THRESHOLD  # Django, DRF, Channels and every view: frozen


def test_gc_freeze_0_leaves_the_collector_alone(restored_gc: None, monkeypatch: pytest.MonkeyPatch) -> None:
    gc.unfreeze()
    threshold = gc.get_threshold()
    monkeypatch.setenv("GC_FREEZE", "0")
    gctune.settle()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold


def test_a_gc_freeze_that_is_not_a_boolean_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator_site.errors import ConfigInvalid

    monkeypatch.setenv("GC_FREEZE", "sometimes")
    with pytest.raises(ConfigInvalid):
        gctune.settle()
