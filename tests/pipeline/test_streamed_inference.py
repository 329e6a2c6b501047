"""The streamed inference: chunks are post-processed and published while the model
writes, a stop sequence ends the upstream call, errors after tokens end the
request, and streaming and non-streaming workers give the same answer."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator_site.errors import WorkerConnectionError
from pipeline.config import PipelineSettings, PostprocessConfig
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.stages.rag import RetrievalResult
from pipeline.stages.streamed import thread_loop
from pipeline.types import STAGES, AssembledPrompt, Completion, PromptRequest, TokenChunk, Usage

REQUEST = PromptRequest(request_id="r-s", tenant_id="t", session_id="s", prompt="go", worker="w", model="m", max_tokens=50)


class Scripted:
    """Streams the given pieces; records what happened in order, and whether its stream
    was closed (the upstream call ended)."""

    name = "w"
    supports_streaming = True

    def __init__(self, pieces: list[str], *, fail_after: int | None = None, log: list[str] | None = None, gap_s: float = 0.0) -> None:
        self.pieces = pieces
        self.gap_s = gap_s  # a pause before each piece (0: the whole reply arrives in one burst)
        self.fail_after = fail_after
        self.log = log if log is not None else []
        self.closed = False

    def infer(self, prompt: AssembledPrompt) -> Completion:
        return Completion(text="".join(self.pieces), model="m", worker=self.name, finish_reason="length", usage=Usage(3, len(self.pieces)))

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        try:
            for i, piece in enumerate(self.pieces):
                if self.gap_s:
                    await asyncio.sleep(self.gap_s)
                if self.fail_after is not None and i == self.fail_after:
                    raise WorkerConnectionError("dropped")
                self.log.append(f"yield {piece}")
                yield TokenChunk(index=i, text=piece)
            yield TokenChunk(index=len(self.pieces), text="", finish_reason="length", usage=Usage(3, len(self.pieces)))
        finally:
            self.closed = True


class Whole(Scripted):
    supports_streaming = False


def deps(worker: object, published: list[str], *, config: PipelineSettings | None = None, log: list[str] | None = None) -> PipelineDeps:
    def publish(chunk: TokenChunk) -> None:
        published.append(chunk.text)
        if log is not None:
            log.append(f"publish {chunk.text}")

    return PipelineDeps(
        config=config or PipelineSettings(),
        retrieve=lambda **_: RetrievalResult(()),
        load_history=lambda: (),
        worker=worker,  # type: ignore[arg-type]
        publish=publish,
        streaming=True,
    )


def test_each_piece_is_published_before_the_next_is_read() -> None:
    log: list[str] = []
    published: list[str] = []
    worker = Scripted(["Hello ", "there ", "world"], log=log, gap_s=0.01)
    ctx, result = run_pipeline(
        REQUEST, deps(worker, published, config=PipelineSettings(postprocess=PostprocessConfig(redact_emails=False, trim=False)), log=log)
    )
    assert log[:4] == ["yield Hello ", "publish Hello ", "yield there ", "publish there "]  # streamed, not buffered
    assert "".join(published) == result.text == "Hello there world" and ctx.streamed
    assert result.finish_reason == "length" and result.usage.completion_tokens == 3 and worker.closed
    assert list(result.timings_us) == list(STAGES) and all(v >= 0 for v in result.timings_us.values())


def test_pieces_that_arrive_together_are_published_together() -> None:
    """A burst (a fast provider, or pieces that came while a publish was under way)
    costs two publishes, not one per piece: the first piece at once, alone (the first
    token waits for nothing), then the rest together. The text is the same."""
    published: list[str] = []
    worker = Scripted([f"p{i} " for i in range(20)])  # no pause: all there at once
    _, result = run_pipeline(REQUEST, deps(worker, published, config=PipelineSettings(postprocess=PostprocessConfig(trim=False))))
    assert "".join(published) == result.text == "".join(f"p{i} " for i in range(20))
    assert published == ["p0 ", "".join(f"p{i} " for i in range(1, 20))]


def test_the_first_piece_is_published_before_the_rest_of_a_burst_is_read() -> None:
    log: list[str] = []
    worker = Scripted(["a ", "b ", "c "], log=log)  # one burst
    run_pipeline(REQUEST, deps(worker, [], config=PipelineSettings(postprocess=PostprocessConfig(trim=False)), log=log))
    assert log[:3] == ["yield a ", "publish a ", "yield b "]


class Arriving(Scripted):
    """Piece i arrives ``gap_s * i`` after the call starts, as bytes do in a socket
    buffer: what has arrived is read at once, without waiting."""

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        start = time.monotonic()
        for i, piece in enumerate(self.pieces):
            due = start + i * self.gap_s - time.monotonic()
            if due > 0:
                await asyncio.sleep(due)
            yield TokenChunk(index=i, text=piece)


def test_a_publish_under_way_lets_the_next_pieces_gather() -> None:
    published: list[str] = []
    worker = Arriving([f"p{i} " for i in range(12)], gap_s=0.005)

    def slow_publish(chunk: TokenChunk) -> None:
        published.append(chunk.text)
        time.sleep(0.02)  # a slow round trip: about four pieces arrive meanwhile

    deps_ = dataclasses.replace(deps(worker, []), publish=slow_publish, config=PipelineSettings(postprocess=PostprocessConfig(trim=False)))
    _, result = run_pipeline(REQUEST, deps_)
    assert "".join(published) == result.text and published[0] == "p0 "  # the first piece alone: no wait for the first token
    assert 2 <= len(published) < 12


def test_a_stop_sequence_ends_the_upstream_call() -> None:
    published: list[str] = []
    worker = Scripted(["one ", "two ", "END", " three ", "four"])
    config = PipelineSettings(postprocess=PostprocessConfig(stop=("END",), trim=False))
    _, result = run_pipeline(REQUEST, deps(worker, published, config=config))
    assert result.text == "one two " and result.finish_reason == "stop" and worker.closed
    assert "three" not in "".join(published)


def test_an_error_after_some_tokens_ends_the_request_with_it() -> None:
    published: list[str] = []
    worker = Scripted(["a ", "b ", "c "], fail_after=2)
    config = PipelineSettings(postprocess=PostprocessConfig(trim=False, redact_emails=False, redact_api_keys=False))
    with pytest.raises(WorkerConnectionError):
        run_pipeline(REQUEST, deps(worker, published, config=config))
    assert "".join(published) == "a b " and worker.closed  # what was sent stays sent; no retry could undo it


def test_a_worker_that_does_not_stream_answers_in_one_piece() -> None:
    published: list[str] = []
    ctx, result = run_pipeline(REQUEST, deps(Whole(["all ", "at ", "once"]), published))
    assert published == ["all at once"] and result.text == "all at once" and not ctx.streamed


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["Hi ", "bob", "@ex.com", " sk-", "abcdefghijklmnopqrst", "STOP", " ", "\n", "ok."]), max_size=12),
    st.booleans(),
)
def test_streaming_and_non_streaming_workers_are_interchangeable(pieces: list[str], trim: bool) -> None:
    config = PipelineSettings(postprocess=PostprocessConfig(stop=("STOP",), trim=trim))
    streamed: list[str] = []
    whole: list[str] = []
    _, a = run_pipeline(REQUEST, deps(Scripted(pieces), streamed, config=config))
    _, b = run_pipeline(REQUEST, deps(Whole(pieces), whole, config=config))
    assert a.text == b.text == "".join(streamed) == "".join(whole)
    assert (a.finish_reason == "stop") == (b.finish_reason == "stop")


def test_post_and_publish_time_is_reported_as_theirs() -> None:
    import time

    def slow_publish(chunk: TokenChunk) -> None:
        time.sleep(0.01)

    base = deps(Scripted(["x"] * 5), [])
    d = PipelineDeps(config=base.config, retrieve=base.retrieve, load_history=base.load_history, worker=base.worker, publish=slow_publish, streaming=True)
    observed: list[tuple[str, str, int]] = []
    _, result = run_pipeline(REQUEST, d, observed)
    assert result.timings_us["stream"] >= 10_000  # at least one publish of 10 ms, counted as the stream stage's
    assert result.timings_us["inference"] < result.timings_us["stream"] + 50_000
    assert [name for name, _, _ in observed] == list(STAGES)


def test_each_thread_keeps_its_own_loop() -> None:
    here = thread_loop()
    assert thread_loop() is here
    seen: list[asyncio.AbstractEventLoop] = []
    t = threading.Thread(target=lambda: seen.append(thread_loop()))
    t.start()
    t.join()
    assert seen[0] is not here
    here.close()
    assert thread_loop() is not here  # a closed loop is replaced


def test_the_whole_reply_path_cuts_at_a_stop_and_redacts() -> None:
    from pipeline.stages.postprocess import build_filter, filter_whole

    config = PostprocessConfig(stop=("###",), trim=True)
    result = filter_whole("  mail bob@ex.com now ### not this", build_filter(config, ()))
    assert result.text == "mail [REDACTED] now" and result.stopped
    stopped = build_filter(config, ())
    stopped.feed("a ### b")
    assert stopped.feed_last(" more") == "" and stopped.stopped  # nothing after a stop, whatever comes


def test_time_moves_between_stages_only_for_a_streamed_inference() -> None:
    from pipeline.engine import _time_moved_to
    from pipeline.stages.context import StageContext, StreamedTimings

    plain = StageContext(REQUEST)
    assert [_time_moved_to(plain, stage) for stage in STAGES] == [0, 0, 0, 0, 0]
    streamed = StageContext(REQUEST, streamed=True, streamed_timings=StreamedTimings(post_ns=7, stream_ns=5))
    assert [_time_moved_to(streamed, stage) for stage in STAGES] == [0, 0, -12, 7, 5]
