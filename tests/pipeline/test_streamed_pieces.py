"""What the streamed pass publishes and keeps, piece by piece: text, tool-call deltas
and logprobs each reach the publisher and the completion whole; the time spent
post-processing and publishing adds up over the pieces; a stop sequence's finish
reason; and a request nobody reads any more is stopped while its provider is
silent, on the first provider or on the one it failed over to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from orchestrator_site.errors import RequestCancelled, WorkerConnectionError, WorkerTimeout
from pipeline.config import PipelineSettings, PostprocessConfig
from pipeline.failover import Next
from pipeline.stages.context import StageContext
from pipeline.stages.streamed import WATCH_S, inference_streamed
from pipeline.types import AssembledPrompt, ChatMessage, Completion, Leg, PromptRequest, TokenChunk, Usage

REQUEST = PromptRequest(request_id="r-p", tenant_id="t", session_id="s", prompt="go", worker="w", model="m", max_tokens=50)
PROMPT = AssembledPrompt(messages=(ChatMessage("user", "go"),), model="m", max_tokens=50)
PLAIN = PostprocessConfig(trim=False, redact_emails=False)
CALL_START = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": ""}}
CALL_ARGS = {"index": 0, "function": {"arguments": '{"q": 1}'}}


class Pieces:
    """Streams the given chunks, each after ``gap_s``; fails after them when told to."""

    supports_streaming = True
    continues_prefix = True

    def __init__(self, name: str, chunks: list[TokenChunk], *, gap_s: float = 0.0, fail: bool = False) -> None:
        self.name, self.chunks, self.gap_s, self.fail = name, chunks, gap_s, fail

    def infer(self, prompt: AssembledPrompt) -> Completion:
        raise NotImplementedError

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        for chunk in self.chunks:
            await asyncio.sleep(self.gap_s)
            yield chunk
        if self.fail:
            raise WorkerConnectionError(f"{self.name}: dropped", data={"worker": self.name})


def run(worker: Pieces, published: list[TokenChunk], **kwargs: object) -> StageContext:
    ctx = StageContext(request=REQUEST, prompt=PROMPT)
    return inference_streamed(ctx, worker=worker, config=kwargs.pop("config", PLAIN), publish=published.append, **kwargs)  # type: ignore[arg-type]


def test_tool_call_deltas_and_logprobs_reach_the_publisher_and_the_completion() -> None:
    lp_a, lp_b = {"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.2}
    chunks = [
        TokenChunk(index=0, text="a", logprobs=(lp_a,)),
        TokenChunk(index=1, text="", tool_calls=(CALL_START,)),
        TokenChunk(index=2, text="b", tool_calls=(CALL_ARGS,), logprobs=(lp_b,)),
        TokenChunk(index=3, text="", finish_reason="tool_calls", usage=Usage(3, 2)),
    ]
    published: list[TokenChunk] = []
    ctx = run(Pieces("w", chunks, gap_s=0.01), published)
    assert [c.text for c in published] == ["a", "", "b"]
    assert [c.tool_calls for c in published] == [(), (CALL_START,), (CALL_ARGS,)]
    assert [c.logprobs for c in published] == [(lp_a,), (), (lp_b,)]
    completion = ctx.completion
    assert completion is not None and completion.logprobs == (lp_a, lp_b) and completion.finish_reason == "tool_calls"
    (call,) = completion.tool_calls
    assert (call.id, call.name, call.arguments) == ("call_1", "lookup", '{"q": 1}')
    assert ctx.output == completion.text == "ab"


def test_a_burst_keeps_every_pieces_text_calls_and_logprobs() -> None:
    """Pieces that arrive together are published together: nothing of any is lost."""
    lp = [{"token": str(i), "logprob": -1.0} for i in range(4)]
    calls = [CALL_START, {"index": 0, "function": {"arguments": '{"q"'}}, {"index": 0, "function": {"arguments": ": 1}"}}, ()]
    chunks = [TokenChunk(index=i, text=str(i), logprobs=(lp[i],), tool_calls=(calls[i],) if calls[i] else ()) for i in range(4)]
    published: list[TokenChunk] = []
    ctx = run(Pieces("w", [*chunks, TokenChunk(index=4, text="", finish_reason="tool_calls")]), published)
    assert "".join(c.text for c in published) == "0123" and [x for c in published for x in c.logprobs] == lp
    assert [x for c in published for x in c.tool_calls] == calls[:3]
    assert ctx.completion is not None and ctx.completion.logprobs == tuple(lp)
    (call,) = ctx.completion.tool_calls
    assert call.arguments == '{"q": 1}'


def test_the_time_spent_post_processing_and_publishing_adds_up_over_the_pieces() -> None:
    chunks = [TokenChunk(index=i, text=f"p{i} ") for i in range(4)] + [TokenChunk(index=4, text="", finish_reason="stop")]

    def slow_publish(chunk: TokenChunk) -> None:
        time.sleep(0.01)

    started = time.perf_counter_ns()
    ctx = inference_streamed(StageContext(request=REQUEST, prompt=PROMPT), worker=Pieces("w", chunks, gap_s=0.02), config=PLAIN, publish=slow_publish)  # type: ignore[arg-type]
    elapsed = time.perf_counter_ns() - started
    timings = ctx.streamed_timings
    assert timings is not None and 4 * 10_000_000 <= timings.stream_ns < elapsed  # four publishes of 10 ms each, summed
    assert 0 < timings.post_ns < timings.stream_ns


def test_the_post_processing_time_is_the_sum_over_the_pieces() -> None:
    """Twenty pieces cost about twenty times one (each is scanned for addresses): far
    more than five times, however noisy the machine."""
    piece = "write to someone@example.com about it " * 100  # 3.9 KB
    config = PostprocessConfig(trim=False, redact_emails=True)

    def post_ns(count: int) -> int:
        chunks = [TokenChunk(index=i, text=piece) for i in range(count)] + [TokenChunk(index=count, text="", finish_reason="stop")]
        timings = run(Pieces("w", chunks, gap_s=0.001), [], config=config).streamed_timings
        assert timings is not None
        return timings.post_ns

    one = min(post_ns(1) for _ in range(3))
    assert post_ns(20) > 5 * one


def test_a_stop_sequence_ends_the_answer_with_stop() -> None:
    chunks = [TokenChunk(index=0, text="one END two"), TokenChunk(index=1, text="", finish_reason="length")]
    ctx = run(Pieces("w", chunks), [], config=PostprocessConfig(stop=("END",), trim=False, redact_emails=False))
    assert ctx.finish_reason == "stop" and ctx.output == "one "


@pytest.mark.parametrize("on_the_fallback", [False, True])
def test_a_request_nobody_reads_is_stopped_while_its_provider_is_silent(on_the_fallback: bool) -> None:
    """While the provider is silent the pass asks who still reads, every WATCH_S; after a
    failover too, on the provider that goes on."""
    silent = Pieces("silent", [TokenChunk(index=0, text="late")], gap_s=30)
    first = Pieces("first", [TokenChunk(index=0, text="early ")], fail=True) if on_the_fallback else silent
    asked: list[float] = []

    def still_wanted() -> bool:
        asked.append(time.monotonic())
        return len(asked) < 2

    def failover(legs: tuple[Leg, ...], prompt: AssembledPrompt) -> Next | None:
        return Next(silent, prompt)  # type: ignore[arg-type]

    started = time.monotonic()
    with pytest.raises(RequestCancelled):
        run(first, [], still_wanted=still_wanted, failover=failover)
    assert len(asked) == 2 and time.monotonic() - started < 10 * WATCH_S


def test_a_request_still_read_is_not_stopped_by_a_silent_provider() -> None:
    asked: list[float] = []

    def still_wanted() -> bool:
        asked.append(time.monotonic())
        return True

    chunks = [TokenChunk(index=0, text="slow"), TokenChunk(index=1, text="", finish_reason="stop")]
    ctx = run(Pieces("w", chunks, gap_s=3 * WATCH_S), [], still_wanted=still_wanted)
    assert ctx.output == "slow" and len(asked) >= 2


def test_pipeline_settings_default_post_process_is_used_unchanged() -> None:
    """The defaults trim and redact: the pass applies the filter it is given, no other."""
    chunks = [TokenChunk(index=0, text="  mail a@b.example  "), TokenChunk(index=1, text="", finish_reason="stop")]
    ctx = run(Pieces("w", chunks), [], config=PipelineSettings().postprocess)
    assert "a@b.example" not in ctx.output and ctx.output == ctx.output.strip()


def test_what_the_filter_held_back_goes_out_at_the_end() -> None:
    """A reply ending in what could start a stop sequence ("EN" of "END") is held back
    until the stream ends, then published."""
    chunks = [TokenChunk(index=0, text="so EN"), TokenChunk(index=1, text="", finish_reason="stop")]
    published: list[TokenChunk] = []
    ctx = run(Pieces("w", chunks), published, config=PostprocessConfig(stop=("END",), trim=False, redact_emails=False))
    assert ctx.output == "so EN" and "".join(c.text for c in published) == "so EN" and published[-1].text.endswith("EN")


def test_at_the_deadline_the_pass_ends_with_worker_timeout() -> None:
    chunks = [TokenChunk(index=0, text="first "), TokenChunk(index=1, text="never")]
    with pytest.raises(WorkerTimeout) as ended:
        run(Pieces("slow", chunks, gap_s=0.2), [], timeout_s=0.3)
    assert ended.value.message == "the request's deadline passed during inference"
    assert ended.value.data == {"worker": "slow", "after_tokens": 1}
