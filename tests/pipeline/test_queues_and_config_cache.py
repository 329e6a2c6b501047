from __future__ import annotations

import threading
from pathlib import Path

from django.test import override_settings

from pipeline.config import loading as config_module
from pipeline.queues import TASK_ROUTES, Queue


def test_queue_values_are_plain_strings() -> None:
    assert Queue.REALTIME == "realtime" and f"{Queue.BATCH_LOW}" == "batch.low"
    assert all(route["queue"] == route["routing_key"] for route in TASK_ROUTES.values())


def test_the_config_is_loaded_once_under_concurrent_first_use(tmp_path: Path, monkeypatch: object) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text("[rag]\ntop_k = 4\n")
    loads: list[str] = []
    original = config_module.load_config

    def counting(p: str | Path) -> config_module.PipelineSettings:
        loads.append(str(p))
        return original(p)

    monkeypatch.setattr(config_module, "load_config", counting)  # type: ignore[attr-defined]
    config_module.set_config(None)
    seen: list[config_module.PipelineSettings] = []
    barrier = threading.Barrier(8)
    try:
        with override_settings(PIPELINE_CONFIG_PATH=str(path)):

            def get() -> None:
                barrier.wait()
                seen.append(config_module.get_config())

            threads = [threading.Thread(target=get) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        config_module.set_config(None)
    assert loads == [str(path)] and len({id(c) for c in seen}) == 1 and seen[0].rag.top_k == 4
