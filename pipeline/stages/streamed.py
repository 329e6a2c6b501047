"""Inference, post-processing and publishing as one pass over the worker's stream.

The worker's chunks go through the post-process filter as they arrive and what
the filter releases is published at once: the first token reaches the token bus
while the model is still writing, never after the whole reply. Pieces that
arrive while a publish is under way go out together in the next one (one Redis
round trip for all of them): a fast provider's burst costs a few publishes,
not one per token. The first piece goes out alone, as soon as it is read: the
rest of a burst is read after it (the first token waits for nothing). A stop sequence
ends the upstream call (its stream is closed). Retries happen only before the first
chunk (``resilience.retry``). A transient worker error after text has come goes on
on a fallback when there is one (``pipeline.failover``): a ``failover`` piece is
published, then the fallback's continuation, through the same post-process filter
(so the seam is filtered as if one provider wrote it all). Otherwise, or after a
tool call has begun, it ends the request with that error.

A request nobody wants any more (every reader of its stream left) is stopped:
``publish`` raises ``RequestCancelled`` when it finds that out, and while the
upstream is silent ``still_wanted`` is asked every ``WATCH_S``. Either way the
upstream call is closed within a second of the last reader leaving. At
``timeout_s`` (the request's deadline) the pass is cancelled, the upstream call
closed, and the request fails with ``WorkerTimeout``.

The output equals the whole-text post-process of the same reply (the filter's
property), so the ``post`` and ``stream`` stages have nothing left to do; their
per-chunk time is carried here and reported as theirs. Tool-call deltas and
logprobs are not text: they pass the filter by, published with the text that
arrived with them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator_site.errors import RequestCancelled, TransientWorkerError, WorkerTimeout
from pipeline.bounds import usage_bound
from pipeline.config import PostprocessConfig
from pipeline.failover import Failover, continuation, total_usage
from pipeline.stages.context import StageContext, StreamedTimings, require_prompt
from pipeline.stages.postprocess import build_filter
from pipeline.stages.stream import Publisher
from pipeline.types import Completion, TokenChunk, Usage
from workers.base import StreamingModelWorker
from workers.types import AssembledPrompt, Leg, ToolCallBuilder

_loops = threading.local()
WATCH_S = 0.25  # how long the upstream may be silent before the producer asks who still reads


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's own event loop, kept for the thread's life: the workers' async
    HTTP clients (one per loop) keep their connections from one request to the next."""
    loop = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()
    return loop


@dataclass
class StreamedPass:
    """What one streamed pass collects."""

    finish: str = "stop"
    usage: Usage | None = None
    post_ns: int = 0
    stream_ns: int = 0
    raw: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    pieces: int = 0  # published, text or not
    tool_calls: ToolCallBuilder = field(default_factory=ToolCallBuilder)
    logprobs: list[Mapping[str, Any]] | None = None
    last_heard: float = field(default_factory=time.monotonic)
    abandoned: bool = False
    closing: bool = False  # the upstream stream is being closed: nothing may interrupt that
    legs: list[Leg] = field(default_factory=list)  # the providers that failed over, in order
    leg_start: int = 0  # where in ``raw`` the current provider's pieces begin
    written: int = 0  # text chunks read, from every provider: the tokens written, about


def inference_streamed(
    ctx: StageContext,
    *,
    worker: StreamingModelWorker,
    config: PostprocessConfig,
    publish: Publisher,
    still_wanted: Callable[[], bool] | None = None,
    timeout_s: float | None = None,
    failover: Failover | None = None,
) -> StageContext:
    prompt = require_prompt(ctx)
    text_filter = build_filter(config, ctx.request.stop)
    state = StreamedPass()

    def emit(
        text: str, calls: tuple[Mapping[str, Any], ...] = (), logprobs: tuple[Mapping[str, Any], ...] = (), marker: Mapping[str, Any] | None = None
    ) -> None:
        if text or calls or logprobs or marker:
            started = time.perf_counter_ns()
            publish(TokenChunk(index=state.pieces, text=text, tool_calls=calls, logprobs=logprobs, failover=marker))
            state.stream_ns += time.perf_counter_ns() - started
            state.released.append(text)
            state.pieces += 1

    def post(text: str | None) -> str:
        started = time.perf_counter_ns()
        out = text_filter.finish() if text is None else text_filter.feed(text)
        state.post_ns += time.perf_counter_ns() - started
        return out

    async def pump_leg(leg: StreamingModelWorker, leg_prompt: AssembledPrompt) -> TransientWorkerError | None:
        """One provider's stream to its end: None, or the transient error it ended with."""
        stream = leg.infer_stream(leg_prompt)
        arrived: list[TokenChunk] = []
        news = asyncio.Event()

        async def read() -> None:
            try:
                async for chunk in stream:
                    state.last_heard = time.monotonic()
                    arrived.append(chunk)
                    news.set()
                    if not state.released:
                        # Until a first piece is out, each is handed over as it comes: the
                        # rest of a burst waits in the socket, not the first token.
                        await asyncio.sleep(0)
            finally:
                news.set()

        reader = asyncio.ensure_future(read())
        state.closing = False
        try:
            while True:
                await news.wait()
                news.clear()
                if state.released:
                    # Coalesce: whatever else has already arrived goes out with this piece,
                    # in one publish (one Redis round trip), while the next keep arriving.
                    await asyncio.sleep(0)
                batch, arrived[:] = arrived[:], []
                text = ""
                calls: list[Mapping[str, Any]] = []
                logprobs: list[Mapping[str, Any]] = []
                for chunk in batch:
                    state.raw.append(chunk.text)
                    state.written += 1  # a piece is a token, about (a text piece: nothing else fails over)
                    state.finish = chunk.finish_reason or state.finish
                    state.usage = chunk.usage or state.usage
                    calls += chunk.tool_calls
                    logprobs += chunk.logprobs
                    text += post(chunk.text)
                    if text_filter.stopped:
                        state.finish = "stop"
                        break  # a stop sequence: the rest of the reply is not wanted
                state.tool_calls.add(calls)
                if logprobs:
                    state.logprobs = (state.logprobs or []) + logprobs
                emit(text, tuple(calls), tuple(logprobs))
                if text_filter.stopped or (reader.done() and not arrived):
                    break
        finally:
            state.closing = True
            finished_alone = reader.done()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await stream.aclose()  # type: ignore[attr-defined]  # ends the upstream call
        if finished_alone and not text_filter.stopped:
            try:
                reader.result()  # a worker error (or cancellation) after the pieces before it were published
            except TransientWorkerError as exc:
                return exc
        return None

    def leg_of(leg: StreamingModelWorker, leg_prompt: AssembledPrompt, error: str = "") -> Leg:
        text, state.leg_start = "".join(state.raw[state.leg_start :]), len(state.raw)
        usage, state.usage = state.usage, None
        if not error:
            return Leg(leg.name, leg_prompt.model, usage or Usage())
        # A provider says its usage with its final event, after which nothing fails: a
        # leg that failed never has it, and is counted at its bounds.
        return Leg(leg.name, leg_prompt.model, usage_bound(leg_prompt, text), estimated=True, error=error)

    async def pump() -> None:
        leg, leg_prompt = worker, prompt
        while True:
            error = await pump_leg(leg, leg_prompt)
            if error is None:
                if state.legs:
                    state.legs.append(leg_of(leg, leg_prompt))
                return
            # On after text (the client may have it), before any tool call (a call's
            # arguments cannot be continued), when somewhere can: else the error is the answer.
            answer, after = "".join(state.raw), (*state.legs, leg_of(leg, leg_prompt, error.code))
            following = None
            if failover is not None and answer and not state.tool_calls.calls():
                following = failover(after, continuation(prompt, answer, written_tokens=state.written))
            if following is None:
                raise error
            state.legs[:] = after
            marker = {"from": leg.name, "to": following.worker.name, "model": following.prompt.model, "error": error.code}
            emit("", marker=marker)
            leg, leg_prompt = following.worker, following.prompt

    async def watch(task: asyncio.Future[None], ask: Callable[[], bool]) -> None:
        while not task.done():
            await asyncio.sleep(WATCH_S)
            # Never while the stream is being closed (a publish found nobody, or the reply
            # ended): a cancellation landing in the HTTP client's close can leave the connection open and
            # counted as busy in its pool, and the provider writes the whole reply to it.
            if state.closing:
                continue  # between two providers too: the next one is watched once it streams
            if time.monotonic() - state.last_heard >= WATCH_S and not task.done() and not ask():
                state.abandoned = True
                task.cancel()  # closes the upstream stream (pump's finally)
                return

    async def run() -> None:
        task = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(watch(task, still_wanted)) if still_wanted else None
        try:
            # At the deadline the pump is cancelled: its stream closes the upstream call.
            await asyncio.wait_for(task, timeout_s)
        except TimeoutError:
            raise WorkerTimeout("the request's deadline passed during inference", data={"worker": worker.name, "after_tokens": len(state.released)}) from None
        except asyncio.CancelledError:
            if not state.abandoned:
                raise
            raise RequestCancelled(data={"after_tokens": len(state.released)}) from None
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    thread_loop().run_until_complete(run())
    emit(post(None))
    last = state.legs[-1] if state.legs else None
    completion = Completion(
        text="".join(state.raw),
        model=last.model if last else prompt.model,
        worker=last.worker if last else worker.name,
        usage=total_usage(tuple(state.legs)) if last else state.usage or Usage(),
        finish_reason=state.finish,
        tool_calls=state.tool_calls.calls(),
        logprobs=None if state.logprobs is None else tuple(state.logprobs),
        legs=tuple(state.legs),
    )
    timings = StreamedTimings(post_ns=state.post_ns, stream_ns=state.stream_ns)
    return replace(ctx, completion=completion, output="".join(state.released), finish_reason=state.finish, streamed_timings=timings, streamed=True)
