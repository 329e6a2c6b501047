"""Properties of the pure stages, for any input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import AssembleConfig, PostprocessConfig
from pipeline.stages.assemble import assemble
from pipeline.stages.context import RetrievedDocument, StageContext
from pipeline.stages.postprocess import TextFilter, build_filter, filter_text
from pipeline.stages.rag import limit_context
from pipeline.types import ChatMessage, PromptRequest

docs = st.lists(
    st.builds(RetrievedDocument, id=st.text(max_size=5), title=st.text(max_size=30), body=st.text(max_size=200), rank=st.floats(0, 1)), max_size=8
).map(tuple)


@given(docs, st.integers(0, 600))
def test_limit_context_never_exceeds_the_budget_and_keeps_order(documents: tuple[RetrievedDocument, ...], budget: int) -> None:
    kept = limit_context(documents, budget)
    assert sum(len(d.title) + len(d.body) for d in kept) <= budget
    assert [d.id for d in kept] == [d.id for d in documents[: len(kept)]]
    for original, cut in zip(documents, kept, strict=False):
        assert original.body.startswith(cut.body) and original.title == cut.title
    assert all(d == o for d, o in zip(kept[:-1], documents, strict=False))  # only the last one may be cut


@given(docs)
def test_limit_context_with_room_for_everything_is_the_identity(documents: tuple[RetrievedDocument, ...]) -> None:
    assert limit_context(documents, 10**6) == documents


history = st.lists(st.builds(ChatMessage, st.sampled_from(["user", "assistant"]), st.text(max_size=20)), max_size=30).map(tuple)


@given(st.text(min_size=1, max_size=50), history, st.integers(0, 20), st.text(max_size=30))
def test_assemble_always_ends_with_the_prompt_and_bounds_history(prompt: str, turns: tuple[ChatMessage, ...], keep: int, system: str) -> None:
    request = PromptRequest(request_id="r", tenant_id="t", session_id="s", prompt=prompt, worker="w", model="m", max_tokens=5)
    ctx = assemble(StageContext(request, history=turns), config=AssembleConfig(system_prompt=system, history_turns=keep))
    assert ctx.prompt is not None
    messages = ctx.prompt.messages
    assert messages[-1] == ChatMessage("user", prompt)
    replayed = messages[1:-1] if system else messages[:-1]
    assert len(replayed) == min(len(turns), 2 * keep)
    assert tuple(replayed) == (turns[len(turns) - len(replayed) :] if replayed else ())


words = st.lists(st.sampled_from(["alpha", "beta", "END", "x@y.io", "  ", "\n", "sk-0123456789abcdefXYZ", "gamma"]), max_size=20).map(" ".join)


@given(words)
def test_output_never_contains_a_stop_or_a_redacted_secret(text: str) -> None:
    out = filter_text([text], build_filter(PostprocessConfig(stop=("END",)), ())).text
    assert "END" not in out and "x@y.io" not in out and "sk-0123" not in out


@given(words, st.lists(st.integers(1, 7), max_size=30))
def test_streamed_release_is_a_prefix_of_the_final_output_at_every_step(text: str, sizes: list[int]) -> None:
    config = PostprocessConfig(stop=("END",))
    final = filter_text([text], build_filter(config, ())).text
    f = build_filter(config, ())
    released, pos = "", 0
    for size in sizes:
        released += f.feed(text[pos : pos + size])
        pos += size
        assert final.startswith(released)  # nothing released is ever taken back
    released += f.feed(text[pos:]) + f.finish()
    assert released == final


def test_earliest_stop_wins_and_a_leading_stop_gives_nothing() -> None:
    f = TextFilter(stops=("B", "A"), patterns=(), replacement="", trim=False)
    assert f.feed("xxAyyBzz") + f.finish() == "xx"
    g = TextFilter(stops=("STOP",), patterns=(), replacement="", trim=False)
    assert g.feed("STOP and more") + g.finish() == "" and g.stopped


def test_empty_stop_strings_are_ignored() -> None:
    f = TextFilter(stops=("",), patterns=(), replacement="", trim=False)
    assert f.feed("text") + f.finish() == "text" and not f.stopped
