"""pipeline.toml: defaults when absent, validated when present, secrets from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import override_settings

from pipeline.config import PipelineSettings, get_config, load_config, set_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_absent_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(tmp_path / "missing.toml")
    assert config == PipelineSettings()
    assert config.default_worker == "echo" and config.workers["echo"].kind == "echo"
    assert config.rag.enabled and config.rag.top_k == 3


def test_every_section_is_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
default_worker = "gpt"
[workers.gpt]
kind = "openai"
base_url = "https://api.example.com/v1"
api_key_env = "EXAMPLE_KEY"
models = ["a", "b"]
default_model = "b"
[rag]
top_k = 5
enabled = false
[assemble]
system_prompt = "Be terse."
history_turns = 2
[postprocess]
stop = ["###"]
redact_emails = false
patterns = [{name = "ssn", pattern = '\\d{3}-\\d{2}-\\d{4}', max_length = 11}]
[limits]
max_prompt_chars = 100
[tokenbus]
ttl_s = 60
""",
        )
    )
    assert config.default_worker == "gpt" and "echo" not in config.workers
    assert config.workers["gpt"].model_default == "b"
    assert (config.rag.top_k, config.rag.enabled) == (5, False)
    assert config.assemble.system_prompt == "Be terse." and config.assemble.history_turns == 2
    assert config.postprocess.stop == ("###",) and config.postprocess.patterns[0].name == "ssn"
    assert config.limits.max_prompt_chars == 100 and config.tokenbus.ttl_s == 60


def test_api_key_comes_from_the_named_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAMPLE_KEY", "sk-secret")
    config = load_config(write(tmp_path, '[workers.echo]\nkind = "echo"\n[workers.g]\nkind = "openai"\nbase_url = "http://x"\napi_key_env = "EXAMPLE_KEY"\n'))
    assert config.workers["g"].settings("g").api_key == "sk-secret"
    assert config.workers["echo"].settings("echo").api_key == ""


def test_worker_settings_conversion() -> None:
    settings = PipelineSettings().workers["echo"].settings("echo")
    assert settings.name == "echo" and settings.kind == "echo" and settings.models == ("echo-1",)
    assert settings.token_delay_s == 0.0


def test_config_is_frozen() -> None:
    config = PipelineSettings()
    with pytest.raises(ValueError):
        config.rag.top_k = 9  # type: ignore[misc]


def test_get_config_loads_once_from_the_settings_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[rag]\ntop_k = 7\n")
    try:
        set_config(None)
        with override_settings(PIPELINE_CONFIG_PATH=str(path)):
            first = get_config()
            assert first.rag.top_k == 7
            path.write_text("[rag]\ntop_k = 8\n")
            assert get_config() is first  # cached until set_config (the hot-reload seam)
            set_config(None)
            assert get_config().rag.top_k == 8
    finally:
        set_config(None)


def test_example_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "pipeline.example.toml"
    config = load_config(example)
    assert set(config.workers) >= {"echo", "openai", "anthropic", "local", "vllm"}
