"""CPU micro-benchmarks of the pipeline's pure stages and of the engine with
in-memory dependencies (no Postgres, Redis or network).

    python scripts/bench_stages.py [--tree DIR] [--rounds N] [--json]

``--tree`` imports the packages from another checkout (the regression gate
runs this file from HEAD against the merge base's packages); a case that
tree cannot build is left out and named (``unavailable`` in the JSON).
Prints, per case, the per-call time in microseconds of each round (a round is
the mean of ``number`` calls).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Case = tuple[Callable[[], object], int]  # a call, and how many calls make a round


def _shared() -> dict[str, object]:
    """What several cases use, from the tree under test."""
    from pipeline.stages.context import RetrievedDocument, StageContext
    from pipeline.types import ChatMessage, Completion, PromptRequest, Usage

    request = PromptRequest(
        request_id="bench", tenant_id="t", session_id="s", prompt="How do refunds work for damaged items?", worker="echo", model="echo-1", max_tokens=64
    )
    reply = ("Thanks for asking. Mail support@example.com or use key sk-abcdefghijklmnopqrstuvwx. " + "Refunds take five days. " * 60)[:2048]
    return {
        "request": request,
        "docs": tuple(RetrievedDocument(str(i), f"Policy {i}", "Refunds are issued within 30 days of purchase. " * 12, 1.0 / (i + 1)) for i in range(5)),
        "many_docs": tuple(RetrievedDocument(str(i), f"Doc {i}", "x" * 150, 1.0) for i in range(50)),
        "history": tuple(ChatMessage("user" if i % 2 == 0 else "assistant", f"turn {i} " * 20) for i in range(20)),
        "reply": reply,
        "completion_ctx": StageContext(request, completion=Completion(text=reply, model="m", worker="w", usage=Usage(10, 400))),
    }


def _limit_context(s: dict[str, Any]) -> Case:
    from pipeline.stages.rag import limit_context

    return lambda: limit_context(s["many_docs"], 6000), 2000


def _assemble(s: dict[str, Any]) -> Case:
    from pipeline.config import AssembleConfig
    from pipeline.stages.assemble import assemble
    from pipeline.stages.context import StageContext

    return lambda: assemble(StageContext(s["request"], documents=s["docs"], history=s["history"]), config=AssembleConfig()), 2000


def _post(s: dict[str, Any]) -> Case:
    from pipeline.config import PostprocessConfig
    from pipeline.stages.postprocess import postprocess

    return lambda: postprocess(s["completion_ctx"], config=PostprocessConfig()), 500


def _post_stream(s: dict[str, Any]) -> Case:
    from pipeline.config import PostprocessConfig
    from pipeline.stages.postprocess import build_filter

    pieces = [s["reply"][i : i + 7] for i in range(0, len(s["reply"]), 7)]

    def stream_filter() -> str:
        f = build_filter(PostprocessConfig(stop=("###",)), ())
        return "".join(f.feed(p) for p in pieces) + f.finish()

    return stream_filter, 30


def _engine(s: dict[str, Any]) -> Case:
    return engine_call(s), 300


def engine_call(s: dict[str, Any]) -> Callable[[], object]:
    from pipeline.config import PipelineSettings
    from pipeline.engine import PipelineDeps, run_pipeline
    from pipeline.stages.rag import RetrievalResult
    from workers.base import WorkerSettings
    from workers.echo import EchoWorker

    deps = PipelineDeps(
        config=PipelineSettings(),
        retrieve=lambda **_: RetrievalResult(s["docs"]),
        load_history=lambda: s["history"],
        worker=EchoWorker(WorkerSettings(name="echo", kind="echo", token_count=64)),
        publish=lambda chunk: None,
    )
    return lambda: run_pipeline(s["request"], deps)


def _route(s: dict[str, Any]) -> Case:
    """A route group's decision alone: three candidates, a latency budget to weigh
    against each one's P95, one of them unavailable."""
    from pipeline.config import PipelineSettings, RouteCandidate, RouteGroup, WorkerConfig
    from pipeline.routing import RouteInputs, choose_in_group, looks_like_code

    workers = {n: WorkerConfig(kind="echo", price_input_per_mtok=p, price_output_per_mtok=p) for n, p in (("cheap", 1.0), ("mid", 5.0), ("strong", 20.0))}
    config = PipelineSettings(workers=workers, default_worker="cheap", routes={"auto": RouteGroup(candidates=tuple(RouteCandidate(worker=n) for n in workers))})
    prompt = s["request"].prompt
    p95 = {"cheap": 500.0, "mid": 200.0, "strong": 250.0}

    def decide() -> object:
        inputs = RouteInputs(
            prompt_chars=len(prompt),
            has_code=looks_like_code(prompt),
            latency_budget_ms=300.0,
            budget_share=0.5,
            ttft_p95_ms=p95,
            unavailable=frozenset({"mid"}),
        )
        return choose_in_group(config, "auto", inputs)

    return decide, 5000


CASES: dict[str, Callable[[dict[str, Any]], Case]] = {
    "rag.limit_context (50 docs)": _limit_context,
    "assemble": _assemble,
    "post (2 KiB reply)": _post,
    "post on a stream (7-char chunks)": _post_stream,
    "engine (5 stages, in memory)": _engine,
    "route group decision": _route,
}
# A tree the cases cannot be built from (a module moved, a signature changed): what fails
# to build there is left out, and said (``unavailable``), rather than failing the run.
UNBUILDABLE = (ImportError, AttributeError, TypeError, KeyError)


def build_cases(*, tracing: bool = False, unavailable: list[str] | None = None) -> dict[str, Case]:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    shared = _shared()
    cases: dict[str, Case] = {}
    for name, build in CASES.items():
        try:
            cases[name] = build(shared)
        except UNBUILDABLE as exc:
            if unavailable is None:
                raise
            unavailable.append(f"{name}: {type(exc).__name__}: {exc}")
    traced = engine_traced(engine_call(shared)) if tracing and "engine (5 stages, in memory)" in cases else None
    if traced:
        cases["engine, tracing on (SDK, no export)"] = (traced, 300)
    return cases


def engine_traced(engine: Callable[[], object]) -> Callable[[], object] | None:
    """The engine with the OpenTelemetry SDK recording its spans (exported nowhere):
    beside the plain engine case, what tracing costs when on, and that off it is
    only a shared no-op context. None for a tree without tracing."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        from orchestrator_site import telemetry
    except ImportError:
        return None
    tracer = TracerProvider().get_tracer("bench")
    state = telemetry._state

    def run() -> object:
        state.enabled, state.tracer, state.trace = True, tracer, trace
        try:
            return engine()
        finally:
            state.enabled = False

    return run


def run(rounds: int, unavailable: list[str] | None = None) -> dict[str, list[float]]:
    cases = build_cases(unavailable=unavailable)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for fn, number in cases.values():
        for _ in range(max(1, number // 10)):  # warm up
            fn()
    for _ in range(rounds):
        for name, (fn, number) in cases.items():
            gc.collect()
            gc.disable()
            started = time.perf_counter_ns()
            for _ in range(number):
                fn()
            elapsed = time.perf_counter_ns() - started
            gc.enable()
            results[name].append(elapsed / number / 1000.0)
    return results


def percentiles(calls: int) -> dict[str, tuple[float, float]]:
    """P50 and P99 of single calls, in microseconds."""
    out = {}
    for name, (fn, number) in build_cases(tracing=True).items():
        for _ in range(max(1, number // 10)):
            fn()
        samples = []
        for _ in range(min(calls, number * 4)):
            started = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - started) / 1000.0)
        samples.sort()
        out[name] = (samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--percentiles", type=int, metavar="CALLS", help="time single calls and print a P50/P99 table")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.tree.resolve()))
    if args.percentiles:
        sys.stdout.write("| stage (in memory) | P50 us | P99 us |\n| --- | --- | --- |\n")
        for name, (p50, p99) in percentiles(args.percentiles).items():
            sys.stdout.write(f"| {name} | {p50:.1f} | {p99:.1f} |\n")
        return 0
    unavailable: list[str] = []
    results = run(args.rounds, unavailable)
    if args.json:
        sys.stdout.write(json.dumps({"cases": results, "unavailable": unavailable}) + "\n")
    else:
        for name, samples in results.items():
            sys.stdout.write(f"{name:<36} median {statistics.median(samples):9.2f} us  min {min(samples):9.2f} us\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
