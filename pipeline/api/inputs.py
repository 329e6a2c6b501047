"""The real-time endpoints' input, validated with pydantic (its models also describe
the bodies in the OpenAPI schema): ``POST /api/v1/infer``, a WebSocket ``prompt``
message, and ``POST /v1/chat/completions``.

Field errors become the API's errors (``input_errors``): a missing or blank prompt
is ``prompt_missing``, one over ``limits.max_prompt_chars`` is ``prompt_too_large``,
anything else ``invalid_request`` naming each field and what is wrong with it.
Unknown fields are ignored. Text may hold no NUL character and no lone surrogate,
which neither Postgres nor Redis could store.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestrator_site.errors import InvalidRequest, OrchestratorError, PromptMissing, PromptTooLarge, UnsupportedParameter
from pipeline.config import get_config
from pipeline.types import ChatMessage, GenerationOptions, ToolCall

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")
Input = TypeVar("Input", bound=BaseModel)


def _storable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must not contain lone surrogates") from exc
    return value


def _prompt(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PydanticCustomError("prompt_blank", "prompt must not be empty")
    if isinstance(value, str):
        limit = get_config().limits.max_prompt_chars
        if len(value) > limit:
            raise PydanticCustomError("prompt_too_large", "prompt is longer than {limit} characters", {"limit": limit})
    return value


def _max_tokens(value: Any) -> Any:
    """The configured limit, not a schema bound: a larger value is refused naming it."""
    limit = get_config().limits.max_tokens_limit
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise PydanticCustomError("max_tokens_too_large", "may be at most {limit} (limits.max_tokens_limit)", {"limit": limit})
    return value


# The bound on the integer alone: on the union, pydantic applied it to null too and
# raised a TypeError (a 500) for "max_tokens": null.
MaxTokens = Annotated[Annotated[StrictInt, Field(ge=1)] | None, BeforeValidator(_max_tokens), Field(None)]


def _stops(value: list[str]) -> list[str]:
    limit = get_config().limits.max_stop_sequences
    if len(value) > limit:
        raise ValueError(f"at most {limit} stop sequences")
    return value


def _metadata(value: dict[str, Any]) -> dict[str, Any]:
    if len(repr(value)) > 4096:
        raise ValueError("metadata is larger than 4 KiB")
    return value


Text = Annotated[str, BeforeValidator(lambda v: _storable(v) if isinstance(v, str) else v)]


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SamplingInput(_Input):
    """OpenAI's sampling fields; each worker honours them or refuses them by name."""

    top_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=300, description="token id -> bias, -100..100"
    )
    user: Annotated[Text, Field(max_length=256)] | None = Field(None, description="the end user, for the provider's abuse monitoring")

    def options(self) -> dict[str, Any]:
        """The fields of ``workers.types.GenerationOptions`` that are set."""
        return self.model_dump(include=set(_OPTION_FIELDS), exclude_none=True, by_alias=True)


_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationOptions))  # what a request's options may hold
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class JsonSchemaInput(_Input):
    name: str = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatInput(_Input):
    """``text`` (the default), ``json_object`` (JSON mode) or ``json_schema`` (structured output)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaInput | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> Self:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response format needs json_schema: {name, schema}")
        return self


class FunctionInput(_Input):
    name: str = Field(pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolInput(_Input):
    type: Literal["function"]
    function: FunctionInput


class NamedFunction(_Input):
    name: str = Field(pattern=FUNCTION_NAME)


class ToolChoiceInput(_Input):
    type: Literal["function"]
    function: NamedFunction


def _json_object_text(value: str) -> str:
    try:
        parsed = json.loads(value or "{}")
    except ValueError:
        raise ValueError("arguments must be a JSON object, as text") from None
    if not isinstance(parsed, dict):
        raise ValueError("arguments must be a JSON object, as text")
    return value


class FunctionCallInput(_Input):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: Annotated[Text, AfterValidator(_json_object_text)]


class ToolCallInput(_Input):
    id: Text = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallInput


# Fields of OpenAI's API whose answers the platform's own endpoints have no place for:
# refused by name there, never dropped without a word.
CHAT_COMPLETIONS_ONLY = ("tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs")


class InferInput(SamplingInput):
    """A prompt and what shapes its answer."""

    @model_validator(mode="before")
    @classmethod
    def _no_tools_here(cls, data: Any) -> Any:
        given = sorted(name for name in CHAT_COMPLETIONS_ONLY if isinstance(data, dict) and data.get(name) is not None)
        if given:
            raise PydanticCustomError("unsupported_parameter", "{fields}: only on POST /v1/chat/completions", {"fields": ", ".join(given)})
        return data

    prompt: Annotated[Text, BeforeValidator(_prompt)]
    session_id: str | None = Field(None, description="1-128 of A-Z a-z 0-9 _ . : @ -; the session's earlier turns are replayed")
    worker: Annotated[Text, Field(max_length=100)] | None = None
    model: Annotated[Text, Field(max_length=200)] | None = None
    max_tokens: MaxTokens = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stop: list[Annotated[Text, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=16)
    metadata: dict[str, Any] = Field(default_factory=dict)
    wait: bool = True
    stream: bool = False
    dedup: bool = Field(True, description="false: a fresh answer, never shared with an identical request")
    seed: StrictInt | None = Field(None, description="the provider samples the same way for the same seed (openai, vllm, llamacpp)")
    latency_budget_ms: float | None = Field(
        None, gt=0, le=600_000, description="with a route group: the fastest candidate whose recent time to first token (P95) fits"
    )

    @field_validator("session_id", mode="before")
    @classmethod
    def _session(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if not SESSION_ID.match(value):
                raise ValueError("use 1-128 of A-Z a-z 0-9 _ . : @ -")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, value: list[str]) -> list[str]:
        return _stops(value)

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _metadata(value)

    response_format: ResponseFormatInput | None = None

    def fields(self) -> dict[str, Any]:
        """What ``services.start.infer_build_request`` reads."""
        return {**self.model_dump(exclude={"wait", "stream", *_OPTION_FIELDS}), "options": self.options()}


def _content(value: Any) -> Any:
    """A string, or a list of text parts (``{"type": "text", "text": …}``)."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise ValueError("content must be a string or a list of text parts")
    return value


class ChatMessageInput(_Input):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Text, BeforeValidator(_content)] | None = None
    tool_calls: list[ToolCallInput] = Field(default_factory=list, max_length=128)
    tool_call_id: Annotated[Text, Field(min_length=1, max_length=256)] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Self:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (an assistant message may have tool_calls instead)")
        return self

    def message(self) -> ChatMessage:
        return ChatMessage(
            role="system" if self.role == "developer" else self.role,
            content=self.content or "",
            tool_calls=tuple(ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in self.tool_calls),
            tool_call_id=self.tool_call_id or "",
        )


class StreamOptionsInput(_Input):
    include_usage: bool = False


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ValueError("stop must be a string or a list of at most 4 strings")
    return stops


class ChatCompletionInput(SamplingInput):
    """OpenAI's chat completion request, as far as this gateway honours it."""

    model: Text = Field(max_length=300)
    messages: list[ChatMessageInput] = Field(min_length=1)
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    stop: Annotated[list[Text], BeforeValidator(_stop_list)] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptionsInput | None = None
    n: int | None = Field(None, ge=1, le=1)
    dedup: bool = Field(True, description="an extension (the SDK's extra_body): false asks for a fresh answer")
    seed: StrictInt | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolInput] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceInput | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatInput | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _among_tools(cls, value: str | ToolChoiceInput | None, info: ValidationInfo) -> str | ToolChoiceInput | None:
        tools = info.data.get("tools") or []
        if value is not None and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(value, ToolChoiceInput) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {value.function.name!r}, which is not among the tools")
        return value

    def conversation(self) -> tuple[list[ChatMessage], ChatMessage, list[ChatMessage]]:
        """The messages before the last user message, that message (the prompt: what the
        RAG stage searches with), and the tool calls and results after it. Only those may
        follow it: the model answers a user, or continues after its tools ran."""
        messages = [m.message() for m in self.messages]
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        after = messages[last_user + 1 :]
        if last_user < 0 or any(not m.is_tool_turn for m in after) or (after and after[-1].role != "tool"):
            raise InvalidRequest("the last message must be the user's, or a tool's result after the assistant's tool calls", data={"field": "messages"})
        return messages[:last_user], messages[last_user], after

    def request_fields(self, *, worker: str, model: str, max_prompt_chars: int) -> dict[str, Any]:
        """The fields of a ``PromptRequest`` (``services.start.infer_build_request``'s
        ``data``) for ``worker`` and ``model``; ``PromptTooLarge`` when the messages are
        longer than ``max_prompt_chars`` together."""
        history, prompt, tool_turns = self.conversation()
        if sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in (*history, prompt, *tool_turns)) > max_prompt_chars:
            raise PromptTooLarge(f"the messages are longer than {max_prompt_chars} characters", data={"field": "messages"})
        return {
            "prompt": prompt.content,
            "worker": worker,
            "model": model,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "stop": self.stop,
            "history": history,
            "tool_turns": tool_turns,
            "dedup": self.dedup,
            "seed": self.seed,
            "options": self.options(),
        }


def validated(model: type[Input], data: Any) -> Input:
    """``data`` as ``model``, or the API error that says what is wrong with it."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", data={"fields": {"non_field_errors": ["expected a JSON object"]}})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise input_errors(exc) from None


# pydantic's error types, worded as the API words them everywhere else (DRF's words).
_MESSAGES = {
    "missing": "This field is required.",
    "string_type": "Not a valid string.",
    "int_type": "A valid integer is required.",
    "int_parsing": "A valid integer is required.",
    "int_from_float": "A valid integer is required.",
    "float_type": "A valid number is required.",
    "float_parsing": "A valid number is required.",
    "bool_type": "Must be a valid boolean.",
    "bool_parsing": "Must be a valid boolean.",
    "dict_type": "Expected a dictionary of items.",
    "list_type": "Expected a list of items.",
    "model_type": "Expected a JSON object.",
    "greater_than_equal": "Ensure this value is greater than or equal to {ge}.",
    "less_than_equal": "Ensure this value is less than or equal to {le}.",
    "string_too_long": "Ensure this field has no more than {max_length} characters.",
    "string_too_short": "Ensure this field has at least {min_length} characters.",
    "too_long": "Ensure this field has no more than {max_length} elements.",
    "too_short": "Ensure this field has at least {min_length} elements.",
    "literal_error": "Must be one of {expected}.",
}


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in ("too_long", "too_short") and isinstance(error.get("input"), str):
        kind = f"string_{kind}"  # a constrained text whose checks run as a function's
    template = _MESSAGES.get(kind)
    if template is None:
        return str(error["msg"])
    return template.format(**{key: str(value) for key, value in (error.get("ctx") or {}).items()})


def input_errors(exc: ValidationError) -> OrchestratorError:
    """The most specific error for a model's field errors."""
    fields: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        if error["type"] == "unsupported_parameter":
            names = str(error["ctx"]["fields"]).split(", ")
            return UnsupportedParameter(str(error["msg"]), data={"field": names[0], "fields": names})
        if loc and loc[0] == "prompt":
            if error["type"] == "prompt_too_large":
                return PromptTooLarge(str(error["msg"]))
            if error["type"] in ("prompt_blank", "missing"):
                return PromptMissing()
        name = str(loc[0]) if loc else "non_field_errors"
        where = ".".join(str(part) for part in loc[1:])
        fields.setdefault(name, []).append(f"{where}: {_message(error)}" if where else _message(error))
    return InvalidRequest("some fields are invalid: " + ", ".join(sorted(fields)), data={"fields": fields})
