"""The config's schema and reference stay true to the models, the example sets every
key, every valid config survives a round trip through TOML, and every valid config
builds the pipeline it describes."""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from pipeline.config import PipelineSettings, check_text, load_config, parse_config, set_config
from pipeline.config.explain import explain
from pipeline.config.reference import DRAFT, json_schema, json_schema_text, markdown
from pipeline.engine import PipelineDeps, run_pipeline
from pipeline.resilience.retry import RetryingWorker
from pipeline.routing import WorkerPool, route_request
from pipeline.stages.rag import RetrievalResult
from pipeline.types import PromptRequest, TokenChunk

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "pipeline.example.toml"


def test_the_json_schema_is_valid_draft_2020_12() -> None:
    schema = json_schema()
    assert schema["$schema"] == DRAFT
    Draft202012Validator.check_schema(schema)


def test_the_committed_json_schema_is_the_models() -> None:
    assert (ROOT / "docs" / "pipeline.schema.json").read_text(encoding="utf-8") == json_schema_text(), "run: orchestrator schema > docs/pipeline.schema.json"


def test_the_committed_reference_page_is_the_models() -> None:
    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == markdown(), "run: orchestrator schema --markdown > docs/configuration.md"


def _fields(model: type[BaseModel], at: str) -> Iterator[str]:
    """Every key of the schema, dotted; a dict or array of tables as NAME / [] once."""
    for name, field in model.model_fields.items():
        path = f"{at}.{name}" if at else name
        yield path
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, path)
        elif args and isinstance(args[-1], type) and issubclass(args[-1], BaseModel):
            yield from _fields(args[-1], f"{path}.*")


def _keys(value: object, at: str) -> Iterator[str]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{at}.{key}" if at else str(key)
            yield path
            yield from _keys(item, path)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item, f"{at}.*")


def _generalise(path: str) -> str:
    parts = path.split(".")
    if len(parts) >= 2 and parts[0] in ("workers", "routes"):
        parts[1] = "*"
    if len(parts) >= 3 and parts[0] == "logging" and parts[1] == "loggers":
        parts = parts[:2]
    return ".".join(parts)


def test_the_example_sets_every_key_and_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert set(config.workers) >= {"echo", "openai", "anthropic", "local", "vllm"}
    in_example = {_generalise(k) for k in _keys(tomllib.loads(EXAMPLE.read_text(encoding="utf-8")), "")}
    missing = sorted(set(_fields(PipelineSettings, "")) - in_example)
    assert missing == [], f"pipeline.example.toml does not set: {missing}"


def test_the_example_validates_against_the_json_schema_too() -> None:
    errors = list(Draft202012Validator(json_schema()).iter_errors(tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))))
    assert errors == []


def _repaired(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-valid document made to hold what the schema cannot say: references
    between fields, templates and regular expressions."""
    workers = data.setdefault("workers", {"echo": {"kind": "echo"}}) or {"echo": {"kind": "echo"}}
    data["workers"] = workers
    data["default_worker"] = sorted(workers)[0]
    for worker in workers.values():
        worker["fallback"] = ""
        worker.pop("default_model", None)
        if worker["kind"] != "echo" and not worker.get("base_url"):
            worker["base_url"] = "http://127.0.0.1:9"
    limits = data.get("limits", {})
    if limits.get("default_max_tokens", 256) > limits.get("max_tokens_limit", 4096):
        limits["default_max_tokens"] = limits.get("max_tokens_limit", 4096)
    assemble = data.get("assemble", {})
    assemble.pop("context_template", None)
    assemble.pop("document_template", None)
    for pattern in data.get("postprocess", {}).get("patterns", []):
        pattern["pattern"] = "x+"
    return data


def from_schema(node: Mapping[str, Any], defs: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """Documents valid against the part of JSON Schema that the config's schema uses:
    objects (fixed properties, each optional unless required, or tables of one
    kind), enums, bounded numbers, patterned strings and arrays."""
    if "$ref" in node:
        return from_schema(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(node.get("minimum", -(2**31)), node.get("maximum", 2**31))
    if kind == "number":
        low = node.get("minimum", node.get("exclusiveMinimum", -1e9))
        return st.floats(low, node.get("maximum", 1e9), exclude_min="exclusiveMinimum" in node, allow_nan=False, allow_infinity=False)
    if kind == "string":
        text = st.from_regex(node["pattern"], fullmatch=True) if "pattern" in node else st.text()
        return text.filter(lambda v: node.get("minLength", 0) <= len(v) <= node.get("maxLength", 10**6))
    if kind == "array":
        return st.lists(from_schema(node["items"], defs), max_size=3)
    if "properties" in node:
        required = set(node.get("required", ()))
        props = {key: from_schema(sub, defs) for key, sub in node["properties"].items()}
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required}, optional={k: v for k, v in props.items() if k not in required})
    return st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z][a-z0-9_]{0,8})?", fullmatch=True), from_schema(node["additionalProperties"], defs), max_size=3
    )


SCHEMA = json_schema()
configs = from_schema(SCHEMA, SCHEMA["$defs"]).map(_repaired)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@PROPERTY
@given(configs)
def test_every_valid_config_survives_serialize_then_parse(data: dict[str, Any]) -> None:
    checked = check_text(tomli_w.dumps(data))
    assume(checked.settings is not None)  # what the repair cannot make valid (a bad logger name)
    config = checked.settings
    assert config is not None
    text = tomli_w.dumps(config.model_dump(mode="json"))
    again = parse_config(text, source="generated")
    assert again == config
    assert tomli_w.dumps(again.model_dump(mode="json")) == text  # byte for byte


@PROPERTY
@given(configs)
def test_every_valid_config_can_be_explained(data: dict[str, Any]) -> None:
    config = check_text(tomli_w.dumps(data)).settings
    assume(config is not None)
    assert config is not None
    text = explain(config).text()
    assert f'Pipeline "{config.pipeline.name}"' in text and all(f"  {name}: " in text for name in config.workers)


def test_a_config_written_out_reads_back_the_same() -> None:
    config = load_config(EXAMPLE)
    text = tomli_w.dumps(config.model_dump(mode="json"))
    assert parse_config(text, source="written") == config


# One table: each config, and what the pipeline it builds must do.
PIPELINES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "defaults",
        "",
        {"route": ("echo", "echo-1"), "workers": {"echo": ("echo", "", False)}, "system": "You are a helpful assistant.", "answer_has": "", "redacted": True},
    ),
    (
        "a hosted default with retries",
        'default_worker = "gpt"\n[workers.gpt]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["m1", "m2"]\ndefault_model = "m2"\n[workers.gpt.retry]\nattempts = 4\n[workers.echo]\nkind = "echo"\n',
        {
            "route": ("gpt", "m2"),
            "workers": {"gpt": ("openai", "http://127.0.0.1:9/v1", True), "echo": ("echo", "", False)},
            "system": "You are a helpful assistant.",
            "answer_has": "",
            "redacted": True,
        },
    ),
    (
        "no retries",
        'default_worker = "v"\n[workers.v]\nkind = "vllm"\nbase_url = "http://127.0.0.1:9/v1"\n[workers.v.retry]\nattempts = 1\n',
        {
            "route": ("v", "vllm"),
            "workers": {"v": ("vllm", "http://127.0.0.1:9/v1", False)},
            "system": "You are a helpful assistant.",
            "answer_has": "",
            "redacted": True,
        },
    ),
    (
        "stage settings",
        '[workers.echo]\nkind = "echo"\nmodels = ["e"]\ntoken_count = 64\n[assemble]\nsystem_prompt = "Be terse."\n[postprocess]\nredact_emails = false\nreplacement = "###"\n',
        {"route": ("echo", "e"), "workers": {"echo": ("echo", "", False)}, "system": "Be terse.", "answer_has": "a@b.example", "redacted": False},
    ),
]


@pytest.mark.parametrize("case", [c[0] for c in PIPELINES], ids=[c[0] for c in PIPELINES])
def test_every_valid_config_builds_its_pipeline(case: str) -> None:
    _, text, want = next(c for c in PIPELINES if c[0] == case)
    config = parse_config(text, source=case) if text else PipelineSettings()
    route = route_request(config, worker=None, model=None)
    assert (route.worker, route.model) == want["route"]
    pool = WorkerPool()
    for name, (kind, base_url, retried) in want["workers"].items():
        worker = pool.get(config, name)
        assert isinstance(worker, RetryingWorker) is retried
        inner = worker.inner if isinstance(worker, RetryingWorker) else worker
        assert (inner.settings.kind, inner.settings.base_url, inner.settings.models) == (kind, base_url, config.workers[name].models)
        assert inner.settings.timeout_s == config.workers[name].timeout_s
        if retried:
            assert worker.policy.attempts == config.workers[name].retry.attempts
    echo_name = next((n for n, w in config.workers.items() if w.kind == "echo"), None)
    if echo_name is None:
        return
    published: list[TokenChunk] = []
    request = PromptRequest(
        request_id="r",
        tenant_id="t",
        session_id="s",
        prompt="write to a@b.example please",
        worker=echo_name,
        model=config.workers[echo_name].model_default,
        max_tokens=config.limits.default_max_tokens,
    )
    deps = PipelineDeps(
        config=config, retrieve=lambda **_: RetrievalResult(()), load_history=tuple, worker=pool.get(config, echo_name), publish=published.append
    )
    ctx, result = run_pipeline(request, deps)
    assert ctx.prompt is not None and ctx.prompt.messages[0].content == want["system"]
    assert ("a@b.example" in result.text) is not want["redacted"]
    if want["answer_has"]:
        assert want["answer_has"] in result.text


def test_a_config_sets_this_process_log_levels() -> None:
    root_before = logging.getLogger().level
    try:
        set_config(parse_config('[logging]\nlevel = "WARNING"\nloggers = { "pipeline.services" = "DEBUG", "celery" = "ERROR" }\n', source="t"))
        assert logging.getLogger().level == logging.WARNING
        assert logging.getLogger("pipeline.services").level == logging.DEBUG and logging.getLogger("celery").level == logging.ERROR
        set_config(parse_config('[logging]\nloggers = { "celery" = "INFO" }\n', source="t"))
        assert logging.getLogger("pipeline.services").level == logging.NOTSET  # no longer named: its parent's again
        assert logging.getLogger("celery").level == logging.INFO
    finally:
        set_config(PipelineSettings())
        set_config(None)
        logging.getLogger().setLevel(root_before)
    assert logging.getLogger("celery").level == logging.NOTSET


def test_the_schema_document_is_json() -> None:
    assert json.loads(json_schema_text())["title"] == "pipeline.toml"


def test_explain_names_the_workers_and_warns() -> None:
    text = explain(load_config(EXAMPLE)).text()
    assert 'Pipeline "default", version 1' in text
    assert "openai: openai at https://api.openai.com/v1; models gpt-4o-mini (default), gpt-4o; $0.15 in / $0.6 out per million tokens" in text
    assert "falls back to local while open" in text
    assert "anthropic has no price: its answers cost $0 in usage and cost reports" in text
    assert "no worker has a fallback" not in text
    bare = explain(parse_config('default_worker = "g"\n[workers.g]\nkind = "openai"\nbase_url = "http://x"\n', source="t")).text()
    assert "no worker has a fallback" in bare and "g sends no API key (api_key_env is empty)" in bare


def test_hypothesis_sees_the_schema_strategy() -> None:
    assert isinstance(configs, st.SearchStrategy)


def test_the_gateway_publishes_from_as_many_threads_as_the_config_says() -> None:
    from pipeline.services import start

    try:
        set_config(parse_config("[queues]\npublish_threads = 2\n", source="t"))
        start._publisher = None
        pool = start.publisher()
        assert pool is start.publisher() and pool._max_workers == 2
    finally:
        start._publisher = None
        set_config(None)
