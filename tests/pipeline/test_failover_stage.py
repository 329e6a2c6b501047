"""Mid-stream failover in the streamed pass: after text has come, a transient error
goes on on the worker the failover names, which continues the answer so far; the
seam has nothing missing or repeated, the failover is published between the two
providers' pieces, and each provider's usage is its own."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator_site.errors import WorkerConnectionError, WorkerProtocolError, WorkerTimeout
from pipeline.bounds import assembled_prompt_bound
from pipeline.config import PipelineSettings, PostprocessConfig
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.failover import Next, continuation, total_usage
from pipeline.stages.rag import RetrievalResult
from pipeline.types import AssembledPrompt, ChatMessage, Completion, Leg, PromptRequest, TokenChunk, Usage
from workers.echo import continued

REQUEST = PromptRequest(request_id="r-f", tenant_id="t", session_id="s", prompt="go", worker="first", model="m1", max_tokens=50)
ANSWER = ["The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "lazy ", "dog."]
PLAIN = PipelineSettings(postprocess=PostprocessConfig(trim=False, redact_emails=False))


class Provider:
    """A provider's model that knows ``ANSWER``: it writes what follows the prompt's
    prefix, and may fail after ``fail_after`` pieces (before its usage) with ``error``."""

    supports_streaming = True
    continues_prefix = True

    def __init__(self, name: str, *, fail_after: int | None = None, error: Exception | None = None, calls: tuple[dict[str, object], ...] = ()) -> None:
        self.name = name
        self.fail_after = fail_after
        self.error = error or WorkerConnectionError(f"{name}: dropped", data={"worker": name})
        self.calls = calls
        self.prompts: list[AssembledPrompt] = []

    def infer(self, prompt: AssembledPrompt) -> Completion:
        raise NotImplementedError  # streamed only

    async def infer_stream(self, prompt: AssembledPrompt) -> AsyncIterator[TokenChunk]:
        self.prompts.append(prompt)
        pieces = continued(ANSWER, prompt.prefix)[: prompt.max_tokens]
        for i, piece in enumerate(pieces):
            if i == self.fail_after:
                raise self.error
            await asyncio.sleep(0)
            yield TokenChunk(index=i, text=piece, tool_calls=self.calls if i == 0 else ())
        yield TokenChunk(index=len(pieces), text="", finish_reason="stop", usage=Usage(11, len(pieces)))


def deps(first: Provider, published: list[TokenChunk], *, to: list[Provider] | None = None, config: PipelineSettings = PLAIN) -> PipelineDeps:
    """The pipeline on ``first``, failing over to each of ``to`` in turn (none: no fallback)."""
    asked: list[tuple[tuple[Leg, ...], AssembledPrompt]] = []
    following = list(to or [])

    def failover(legs: tuple[Leg, ...], prompt: AssembledPrompt) -> Next | None:
        asked.append((legs, prompt))
        if not following:
            return None
        worker = following.pop(0)
        return Next(worker, dataclasses.replace(prompt, model=f"model-of-{worker.name}"))  # type: ignore[arg-type]

    made = PipelineDeps(
        config=config,
        retrieve=lambda **_: RetrievalResult(()),
        load_history=lambda: (),
        worker=first,  # type: ignore[arg-type]
        publish=published.append,
        streaming=True,
        failover=failover,
    )
    object.__setattr__(made, "asked", asked)  # for the tests: what the failover was asked
    return made


def test_a_drop_after_text_goes_on_on_the_fallback_with_nothing_missing_or_repeated() -> None:
    published: list[TokenChunk] = []
    first, second = Provider("first", fail_after=3), Provider("second")
    _, result = run_pipeline(REQUEST, deps(first, published, to=[second]))

    text = [c.text for c in published if c.failover is None]
    assert "".join(text) == result.text == "".join(ANSWER)
    seams = [i for i, c in enumerate(published) if c.failover is not None]
    assert len(seams) == 1 and published[seams[0]].text == ""
    assert published[seams[0]].failover == {"from": "first", "to": "second", "model": "model-of-second", "error": "worker_connection_error"}
    assert "".join(c.text for c in published[: seams[0]]) == "The quick brown "  # the marker sits between the two providers' pieces
    (continued_prompt,) = second.prompts
    assert continued_prompt.prefix == "The quick brown " and continued_prompt.max_tokens == REQUEST.max_tokens - 3
    assert continued_prompt.messages == first.prompts[0].messages


def test_each_provider_has_its_own_usage_and_the_answer_their_sum() -> None:
    published: list[TokenChunk] = []
    first, second = Provider("first", fail_after=2), Provider("second")
    _, result = run_pipeline(REQUEST, deps(first, published, to=[second]))

    cut, answered = result.legs
    assert (cut.worker, cut.model, cut.error, cut.estimated) == ("first", "m1", "worker_connection_error", True)
    # Cut before its usage: the bounds a budget reserves at, never less than it billed.
    assert cut.usage == Usage(assembled_prompt_bound(first.prompts[0]), len(b"The quick "))
    assert (answered.worker, answered.model, answered.error, answered.estimated) == ("second", "model-of-second", "", False)
    assert answered.usage == Usage(11, len(ANSWER) - 2)
    assert result.usage == cut.usage + answered.usage == total_usage(result.legs)
    assert (result.worker, result.model) == ("second", "model-of-second")


def test_an_answer_that_fails_on_its_fallback_too_goes_on_on_the_next() -> None:
    published: list[TokenChunk] = []
    first, second, third = Provider("first", fail_after=2), Provider("second", fail_after=3), Provider("third")
    made = deps(first, published, to=[second, third])
    _, result = run_pipeline(REQUEST, made)

    assert result.text == "".join(ANSWER)
    assert [c.failover["to"] for c in published if c.failover] == ["second", "third"]
    assert [leg.worker for leg in result.legs] == ["first", "second", "third"] and result.worker == "third"
    legs_asked = [tuple(leg.worker for leg in legs) for legs, _ in made.asked]  # type: ignore[attr-defined]
    assert legs_asked == [("first",), ("first", "second")]  # each time, every provider that failed so far
    assert third.prompts[0].prefix == "".join(ANSWER[:5]) and third.prompts[0].max_tokens == REQUEST.max_tokens - 5


def test_without_a_fallback_the_providers_error_is_the_answer() -> None:
    published: list[TokenChunk] = []
    made = deps(Provider("first", fail_after=3), published, to=[])
    with pytest.raises(WorkerConnectionError):
        run_pipeline(REQUEST, made)
    assert len(made.asked) == 1  # type: ignore[attr-defined]
    assert "".join(c.text for c in published) == "The quick brown " and not any(c.failover for c in published)


def test_a_failure_before_any_text_is_not_failed_over() -> None:
    """Before the first token, the retries and the breaker's fallback decide."""
    made = deps(Provider("first", fail_after=0), [], to=[Provider("second")])
    with pytest.raises(WorkerConnectionError):
        run_pipeline(REQUEST, made)
    assert made.asked == []  # type: ignore[attr-defined]


def test_a_permanent_error_is_not_failed_over() -> None:
    made = deps(Provider("first", fail_after=2, error=WorkerProtocolError("garbled")), [], to=[Provider("second")])
    with pytest.raises(WorkerProtocolError):
        run_pipeline(REQUEST, made)
    assert made.asked == []  # type: ignore[attr-defined]


def test_an_answer_with_a_tool_call_begun_is_not_failed_over() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    made = deps(Provider("first", fail_after=2, calls=(call,)), [], to=[Provider("second")])
    with pytest.raises(WorkerConnectionError):
        run_pipeline(REQUEST, made)
    assert made.asked == []  # type: ignore[attr-defined]


def test_a_provider_timing_out_mid_stream_fails_over_like_a_drop() -> None:
    published: list[TokenChunk] = []
    first = Provider("first", fail_after=4, error=WorkerTimeout("first: read timed out", data={"worker": "first"}))
    _, result = run_pipeline(REQUEST, deps(first, published, to=[Provider("second")]))
    assert result.text == "".join(ANSWER) and result.legs[0].error == "worker_timeout"


def test_a_stop_sequence_across_the_seam_is_found() -> None:
    """The fallback's pieces pass the same filter: a stop sequence that starts in the
    first provider's text and ends in the fallback's ends the answer."""
    published: list[TokenChunk] = []
    config = PipelineSettings(postprocess=PostprocessConfig(stop=("fox jumps",), trim=False, redact_emails=False))
    _, result = run_pipeline(REQUEST, deps(Provider("first", fail_after=4), published, to=[Provider("second")], config=config))
    assert result.text == "The quick brown " and "".join(c.text for c in published) == result.text


def test_one_provider_answering_has_no_legs() -> None:
    _, result = run_pipeline(REQUEST, deps(Provider("first"), [], to=[Provider("second")]))
    assert result.legs == () and result.worker == "first" and result.usage == Usage(11, len(ANSWER))
    assert "legs" not in result.to_dict()


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=1, max_value=len(ANSWER) - 1), size=st.integers(min_value=1, max_value=len(ANSWER)))
def test_any_cut_reads_as_the_one_answer(cut: int, size: int) -> None:
    published: list[TokenChunk] = []
    request = dataclasses.replace(REQUEST, max_tokens=size)
    _, result = run_pipeline(request, deps(Provider("first", fail_after=cut), published, to=[Provider("second")]))
    assert "".join(c.text for c in published) == result.text == "".join(ANSWER[:size])
    assert sum(1 for c in published if c.failover) == (1 if cut < size else 0)


def test_the_continuation_keeps_the_prompt_and_counts_what_was_written() -> None:
    prompt = AssembledPrompt(messages=(ChatMessage("user", "hi"),), model="m", max_tokens=10, temperature=0.3, stop=("X",))
    after = continuation(prompt, "Hello the", written_tokens=4)
    assert (after.prefix, after.max_tokens, after.messages, after.temperature, after.stop) == ("Hello the", 6, prompt.messages, 0.3, ("X",))
    assert after.turns == (*prompt.messages, ChatMessage("assistant", "Hello the"))
    assert continuation(prompt, "x", written_tokens=25).max_tokens == 1  # never nothing to write
    assert AssembledPrompt.from_dict(after.to_dict()) == after
