"""The TTFT benchmark's own parts: its fake upstream speaks the OpenAI streaming
protocol well enough for the platform's openai worker (and the SDK) to read it,
after the configured first-token delay; its report computes overheads from
percentiles; its wrk output parser reads what wrk prints."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pipeline.config import WorkerConfig
from tests.conftest import ROOT, free_port
from workers.registry import build_worker
from workers.types import AssembledPrompt, ChatMessage

sys.path.insert(0, str(ROOT / "scripts"))
import bench_ttft


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    serving = asyncio.run_coroutine_threadsafe(bench_ttft.serve_upstream(port, 0.05, 5, 0.03), loop)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=2).chat.completions.create(
                model="fake-1", messages=[{"role": "user", "content": "up?"}], stream=True
            ).close()
            break
        except openai.APIConnectionError:
            time.sleep(0.05)
    yield url
    serving.cancel()
    concurrent.futures.wait([serving], timeout=5)  # the server task has ended before its loop stops
    # Its connections' tasks end too: a task still pending when the loop is collected is
    # logged as destroyed at interpreter exit, and that logging can crash the run.
    concurrent.futures.wait([asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop)], timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


async def _cancel_the_rest() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_the_openai_sdk_reads_the_fake_upstream_after_its_first_token_delay(upstream: str) -> None:
    client = openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0)
    started = time.perf_counter()
    stream = client.chat.completions.create(model="fake-1", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True})
    first, texts, usage = 0.0, [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            texts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(texts) == "tok0 tok1 tok2 tok3 tok4 " and usage is not None and usage.completion_tokens == 5
    assert first - started >= 0.05


def test_the_paced_model_writes_one_token_every_interval(upstream: str) -> None:
    client = openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0)
    arrivals = []
    for chunk in client.chat.completions.create(model=bench_ttft.PACED_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 5 and min(gaps) >= 0.025  # 30 ms apart; fake-1's come at once


def test_the_platforms_openai_worker_streams_from_it(upstream: str) -> None:
    worker = build_worker(WorkerConfig(kind="openai", base_url=f"{upstream}/v1", models=("fake-1",)).settings("bench"))
    prompt = AssembledPrompt(messages=(ChatMessage("user", "hi"),), model="fake-1", max_tokens=50)

    async def collect() -> list[str]:
        return [chunk.text async for chunk in worker.infer_stream(prompt)]

    pieces = asyncio.run(collect())
    assert "".join(pieces) == "tok0 tok1 tok2 tok3 tok4 "


def test_the_client_times_the_first_token_and_counts_every_token(upstream: str) -> None:
    async def run() -> list[bench_ttft.Sample]:
        async with bench_ttft.http_session() as http:
            clients = bench_ttft.Clients("http://unused", upstream, "key", http)
            lone = await clients.direct()
            paced = await dataclasses.replace(clients, model=bench_ttft.PACED_MODEL).direct()
            return [lone, paced]

    lone, paced = asyncio.run(run())
    assert lone.transport == "direct" and lone.tokens == 5 and lone.ttft_ms >= 50
    assert lone.total_ms - lone.ttft_ms < 30  # fake-1 writes its tokens at once
    assert paced.tokens == 5 and paced.total_ms - paced.ttft_ms >= 4 * 25  # read to the end, one every 30 ms


def test_the_upstream_records_when_it_read_each_prompt_and_wrote_its_first_token(upstream: str) -> None:
    async def run() -> tuple[list[bench_ttft.Sample], dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        async with bench_ttft.http_session() as http:
            clients = bench_ttft.Clients("http://unused", upstream, "key", http)
            await clients.hops()  # another test's
            samples = [await clients.direct(), await clients.direct()]
            return samples, await clients.hops(), await clients.hops()

    samples, hops, again = asyncio.run(run())
    assert set(hops) == {s.prompt_id for s in samples} and again == {}  # read once, then forgotten
    for sample in samples:
        arrived, first = hops[sample.prompt_id]
        assert sample.sent_ns < arrived < first < sample.first_ns
        assert (first - arrived) / 1e6 >= 50  # the upstream's own first-token delay lies between the two
        assert sample.ttft_ms == pytest.approx((sample.first_ns - sample.sent_ns) / 1e6)


def test_hops_split_each_requests_time_to_first_token_around_the_upstream() -> None:
    ms = 1_000_000
    samples = [bench_ttft.Sample("sse", 0, 0, 20, f"{i:032x}", sent_ns=i * 100 * ms, first_ns=i * 100 * ms + (30 + i) * ms) for i in range(100)]
    samples.append(bench_ttft.Sample("sse", 0, 0, 20, "f" * 32, sent_ns=0, first_ns=1))  # the upstream never saw it: left out
    hops = {f"{i:032x}": (i * 100 * ms + (2 + i / 10) * ms, i * 100 * ms + 22 * ms) for i in range(100)}
    (row,) = bench_ttft.hop_rows("c1", samples, hops)
    # there: 2 + i/10 ms; back: (30 + i) - 22 = 8 + i ms
    assert row == "| c1 | sse | 100 | 7.00 / 11.80 | 58.00 / 106.00 |"  # nearest rank: the 51st and the 99th


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loops open a WebSocket each, which only the platform serves: a stand-in here."""

    class NoSocket:
        async def close(self) -> None:
            pass

    async def no_socket(clients: bench_ttft.Clients) -> NoSocket:
        return NoSocket()

    monkeypatch.setattr(bench_ttft, "open_socket", no_socket)


def test_the_clients_collector_is_off_while_a_phase_is_timed(upstream: str, no_sockets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection in the client would be timed as the platform's: closed and open
    loops run with it off, and turn it on again after."""
    seen: list[bool] = []

    async def run() -> tuple[int, int]:
        async with bench_ttft.http_session() as http:
            clients = bench_ttft.Clients("http://unused", upstream, "key", http)
            direct = clients.direct

            async def timed() -> bench_ttft.Sample:
                seen.append(gc.isenabled())
                return await direct()

            object.__setattr__(clients, "direct", timed)
            closed, _took, closed_errors = await bench_ttft.closed_loop(clients, concurrency=2, per_client=2, transports=("direct",))
            monkeypatch.setattr(bench_ttft, "TRANSPORTS", ("direct",))
            opened, open_errors = await bench_ttft.open_loop(clients, rate=20, seconds=0.2)
            return len(closed) + len(opened), closed_errors + open_errors

    assert gc.isenabled()
    assert asyncio.run(run()) == (8, 0)
    assert seen == [False] * 8 and gc.isenabled()


def test_a_failed_request_is_counted_by_what_it_said(upstream: str, no_sockets: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's report says why its errors happened, not only how many."""

    async def run() -> int:
        async with bench_ttft.http_session() as http:
            clients = bench_ttft.Clients(upstream, upstream, "key", http)  # no /api/v1/infer there: 404
            _samples, _took, errors = await bench_ttft.closed_loop(clients, concurrency=1, per_client=2, transports=("sse",))
            return errors

    monkeypatch.setattr(bench_ttft, "ERRORS", bench_ttft.collections.Counter())
    assert asyncio.run(run()) == 2
    [(said, times)] = bench_ttft.ERRORS.items()
    assert times == 2 and said.startswith("sse: RuntimeError: sse: HTTP 404")


def test_the_client_reports_an_http_error_with_its_body(upstream: str) -> None:
    async def run() -> bench_ttft.Sample:
        async with bench_ttft.http_session() as http:
            clients = bench_ttft.Clients(upstream, upstream, "key", http)  # the upstream has no /api/v1/infer: it answers 404
            return await clients.sse()

    with pytest.raises(RuntimeError, match=r"^sse: HTTP 404: .*not found"):
        asyncio.run(run())


def test_overheads_are_taken_at_the_same_percentile() -> None:
    samples = [bench_ttft.Sample("direct", 20.0 + i / 100, 0, 20) for i in range(100)]
    samples += [bench_ttft.Sample("websocket", 30.0 + i / 10, 0, 20) for i in range(100)]
    rows = bench_ttft.ttft_rows("c1", samples)
    assert rows[0] == "| c1 | direct | 100 | 20.50 | 20.98 | - |"
    assert rows[1] == "| c1 | websocket | 100 | 35.00 | 39.80 | +14.50 / +18.82 |"


WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:1234/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   255.12ms   95.30ms 800.12ms   70.00%
  Latency Distribution
     50%  215.15ms
     75%  300.00ms
     90%  400.00ms
     99%  662.25ms
  1012 requests in 10.01s, 2.11MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:    101.10
Transfer/sec:    215.75KB
"""


def test_wrk_output_is_parsed() -> None:
    rate, failed, p50, p99 = bench_ttft.parse_wrk(WRK_OUTPUT)
    assert (failed, p50, p99) == (7, "215.15ms", "662.25ms")
    assert rate == pytest.approx((1012 - 7) / 10.01)  # completed without error, per second
    clean = WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 1\n", "").replace("  Non-2xx or 3xx responses: 4\n", "")
    assert bench_ttft.parse_wrk(clean)[:2] == (pytest.approx(1012 / 10.01), 0)


def test_streams_without_their_terminal_event_count_as_failed() -> None:
    """The script's done() prints them: a stream that ended in an error event answered 200."""
    text = WRK_OUTPUT + "Incomplete streams: 5\n"
    rate, failed, _p50, _p99 = bench_ttft.parse_wrk(text)
    assert failed == 12 and rate == pytest.approx((1012 - 12) / 10.01)
    assert "event: done" in bench_ttft.WRK_SCRIPT and "data: [DONE]" in bench_ttft.WRK_SCRIPT and "Incomplete streams" in bench_ttft.WRK_SCRIPT


def test_a_short_wrk_run_in_milliseconds_is_read_too() -> None:
    text = WRK_OUTPUT.replace("1012 requests in 10.01s", "50 requests in 500.00ms")
    assert bench_ttft.parse_wrk(text)[0] == pytest.approx((50 - 7) / 0.5)


def test_each_wrk_case_sends_prompts_of_its_own() -> None:
    """A /v1 call with one message and an SSE prompt of the same text are one request
    to the deduplication window: a case reusing the one before's prompts would be
    answered from its cache (it read as 241 req/s against 148)."""
    first, second = bench_ttft.wrk_cases("http://gw", "http://up"), bench_ttft.wrk_cases("http://gw", "http://up")
    prompts = [re.search(r"benchmark prompt (\w+) %d-%d", body).group(1) for _label, _url, body in (*first, *second)]  # type: ignore[union-attr]
    assert len(set(prompts)) == 6
    for _label, _url, body in first:
        json.loads(body.replace("%d", "1"))  # a JSON template


def test_the_real_time_workers_pool_is_chosen_on_the_command_line() -> None:
    from bench_path import realtime_worker_command

    default = realtime_worker_command("rt@%h", threads=16)
    assert default[default.index("-P") + 1] == "threads" and default[default.index("-c") + 1] == "16"  # as make run
    prefork = realtime_worker_command("rt@%h", threads=8, pool="prefork")
    assert prefork[prefork.index("-P") + 1] == "prefork" and prefork[prefork.index("-c") + 1] == "8"
    assert "realtime" in prefork and "--without-mingle" in prefork


def test_options_of_celery_worker_to_measure_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench_path import realtime_worker_command

    monkeypatch.setenv("BENCH_WORKER_ARGS", "--without-heartbeat --prefetch-multiplier 1")
    command = realtime_worker_command("rt@%h", threads=16)
    assert command[-3:] == ["--without-heartbeat", "--prefetch-multiplier", "1"]
    monkeypatch.delenv("BENCH_WORKER_ARGS")
    assert realtime_worker_command("rt@%h", threads=16)[-1] == "--without-mingle"


def test_open_loop_websocket_prompts_never_share_a_connection_at_once() -> None:
    async def run() -> tuple[list[object], list[object], object]:
        made: list[object] = []

        async def open_one() -> object:
            made.append(object())
            return made[-1]

        pool = bench_ttft.SocketPool(open_one)
        await pool.warm(2)
        assert len(made) == 2 and len(pool.idle) == 2
        first, second, third = await pool.acquire(), await pool.acquire(), await pool.acquire()
        pool.release(first)
        pool.release(second, broken=True)  # failed: not reused
        again = await pool.acquire()
        return made, [first, second, third], again

    made, taken, again = asyncio.run(run())
    assert len(made) == 3 and len(set(map(id, taken))) == 3  # two warm ones, then a new one: all three busy at once
    assert again is taken[0] and again is not taken[1]


def test_cpu_per_request_is_counted_by_group_from_the_start() -> None:
    """A process that burns CPU shows it, per request, in its group and in "all"; an
    idle one next to it shows (almost) none; one that does not exist, or was not there
    when the phase started, counts nothing."""
    ready = "import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    burner = subprocess.Popen(
        [sys.executable, "-c", ready + "end = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(30)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    sleeper = subprocess.Popen([sys.executable, "-c", ready + "time.sleep(30)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for proc in (burner, sleeper):  # past the interpreter's start-up, whose CPU time is not the phase's
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        found: list[int] = []
        clock = bench_ttft.CpuClock({"busy": lambda: [burner.pid], "idle": lambda: [sleeper.pid], "gone": lambda: [2**22 + 1], "late": lambda: found})
        clock.start()
        found.append(os.getpid())  # looked up at the start: not counted
        for proc in (burner, sleeper):
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + 20
        while clock.per_request_ms(1)["busy"] < 580 and time.monotonic() < deadline:
            time.sleep(0.05)
        used = clock.per_request_ms(10)
    finally:
        for proc in (burner, sleeper):
            proc.kill()
            proc.communicate()
    assert used["busy"] >= 50  # its 0.6 s, over 10 requests (clock ticks: 10 ms)
    assert used["idle"] < 5 and used["gone"] == 0 and used["late"] == 0
    assert used["all"] == pytest.approx(used["busy"] + used["idle"])
    assert bench_ttft.cpu_cell({"all": 9.87, "gateway": 1.0, "workers": 5.0, "redis": 0.5, "postgres": 0.25}) == "9.9 (1.0, 5.0, 0.5, 0.2)"


def test_cpu_used_outside_the_groups_is_reported_per_second_of_the_phase() -> None:
    """What the machine's other processes used is a benchmark's figure, reported beside
    its results, never asserted by a test (a shared machine decides it)."""
    line = bench_ttft.Outside(cpu_s=0.25, steal_s=0.01, wall_s=2.0).line("concurrency 1")
    assert "used 125 ms of CPU per second" in line and "took 5 ms per second" in line


def test_processes_are_found_by_name_with_their_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        mine = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        assert os.getpid() in bench_ttft.pids_named(mine)
        assert bench_ttft.pids_named("no-such-process-name") == []
        assert bench_ttft.with_children([os.getpid()])[0] == os.getpid()
        assert child.pid in bench_ttft.with_children([os.getpid()])
    finally:
        child.kill()
        child.wait()
    assert bench_ttft.cpu_seconds(child.pid) == 0.0  # reaped: gone


def test_staggered_loops_start_a_stagger_apart(upstream: str, no_sockets: None) -> None:
    """With ``stagger_s`` loop n sends its first request n staggers after loop 0 (ten
    paced streams spread over one stream's length); without it, all at once."""
    firsts: dict[int, float] = {}

    async def run(stagger_s: float) -> list[float]:
        firsts.clear()
        async with bench_ttft.http_session() as http:
            clients = bench_ttft.Clients("http://unused", upstream, "key", http)
            direct = clients.direct

            async def timed() -> bench_ttft.Sample:
                task = asyncio.current_task()
                firsts.setdefault(id(task), time.perf_counter())
                return await direct()

            object.__setattr__(clients, "direct", timed)
            samples, _took, errors = await bench_ttft.closed_loop(clients, concurrency=4, per_client=2, transports=("direct",), stagger_s=stagger_s)
            assert len(samples) == 8 and errors == 0
        return sorted(firsts.values())

    spread = asyncio.run(run(0.1))
    gaps = [b - a for a, b in itertools.pairwise(spread)]
    assert len(spread) == 4 and all(0.09 <= gap <= 0.2 for gap in gaps), gaps
    together = asyncio.run(run(0.0))
    assert together[-1] - together[0] < min(gaps)  # started together: closer than any two staggered starts
