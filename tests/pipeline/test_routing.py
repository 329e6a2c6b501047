from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from orchestrator_site.errors import UnknownModel, UnknownWorker
from pipeline.config import PipelineSettings, WorkerConfig
from pipeline.routing import Route, WorkerPool, cost_usd, route_request
from pipeline.types import Usage

CONFIG = PipelineSettings(
    default_worker="a",
    workers={
        "a": WorkerConfig(kind="echo", models=("m1", "m2")),
        "b": WorkerConfig(kind="echo", models=("x", "y"), default_model="y"),
        "any": WorkerConfig(kind="echo"),
    },
)


@pytest.mark.parametrize(
    ("worker", "model", "route"),
    [
        (None, None, Route("a", "m1")),
        (None, "m2", Route("a", "m2")),
        ("b", None, Route("b", "y")),
        ("b", "x", Route("b", "x")),
        ("any", "whatever", Route("any", "whatever")),
        ("any", None, Route("any", "echo")),
    ],
)
def test_routes(worker: str | None, model: str | None, route: Route) -> None:
    assert route_request(CONFIG, worker=worker, model=model) == route


def test_unknown_worker_lists_the_available_ones() -> None:
    with pytest.raises(UnknownWorker) as info:
        route_request(CONFIG, worker="c", model=None)
    assert info.value.data == {"worker": "c", "available": ["a", "any", "b"]}


def test_model_of_another_worker_is_unknown() -> None:
    with pytest.raises(UnknownModel):
        route_request(CONFIG, worker="a", model="x")


def test_pool_is_safe_under_concurrent_first_use() -> None:
    pool = WorkerPool()
    seen: list[object] = []
    barrier = threading.Barrier(8)

    def get() -> None:
        barrier.wait()
        seen.append(pool.get(CONFIG, "b"))

    threads = [threading.Thread(target=get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(w) for w in seen}) == 1  # one worker (and one connection pool) per name


def test_an_answer_costs_its_tokens_at_the_workers_prices() -> None:
    config = PipelineSettings(
        default_worker="free",
        workers={"paid": WorkerConfig(kind="echo", models=("m",), price_input_per_mtok=0.15, price_output_per_mtok=0.60), "free": WorkerConfig(kind="echo")},
    )
    assert cost_usd(config, "paid", Usage(prompt_tokens=1_000_000, completion_tokens=500_000)) == 0.45
    assert cost_usd(config, "paid", Usage(prompt_tokens=12, completion_tokens=4)) == pytest.approx((12 * 0.15 + 4 * 0.60) / 1e6)
    assert cost_usd(config, "free", Usage(prompt_tokens=12, completion_tokens=4)) == 0.0
    assert cost_usd(config, "retired", Usage(prompt_tokens=12, completion_tokens=4)) == 0.0  # no longer configured


def test_prices_cannot_be_negative() -> None:
    with pytest.raises(ValidationError):
        WorkerConfig(kind="echo", price_output_per_mtok=-1)
