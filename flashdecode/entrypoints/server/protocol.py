"""The OpenAI API's request and response bodies as pydantic models (the subset this server serves).

Requests ignore fields they do not know, as vLLM's do; fields whose meaning this server does not
implement yet (legacy functions, logit_bias, suffix, best_of) are accepted by the schema and
refused with a 400 by the handlers, never silently dropped. Numbers and booleans are strict: ``"0.5"``
is not a temperature and ``true`` is not a token id.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictStr, model_serializer

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict floats still take JSON integers


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests --------------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: StrictBool = False


class SamplingRequest(_Request):
    """The fields completions and chat share: OpenAI's, then vLLM's extras."""

    model: StrictStr | None = None
    n: Int = 1
    temperature: Float | None = None
    top_p: Float | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: Int | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    user: StrictStr | None = None
    # vLLM's sampling extras
    top_k: Int | None = None
    min_p: Float | None = None
    repetition_penalty: Float | None = None
    min_tokens: Int = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: Int = 0
    # structured output: OpenAI's {"type": "json_object"} / {"type": "json_schema", "json_schema": {...}},
    # or one of vLLM's guided_* extras
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    # not implemented yet: refused unless absent or neutral
    logit_bias: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
                {"prompt": ["Once upon a time", "Hello"], "max_tokens": 4, "n": 2, "seed": 1, "logprobs": 2},
            ]
        }
    )
    prompt: StrictStr | list[StrictStr] | list[Int] | list[list[Int]]
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: Int | None = None


class TextPart(_Request):
    type: StrictStr
    text: StrictStr | None = None


class FunctionCall(_Request):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"  # OpenAI sends JSON text; some clients send the object


class ToolCallIn(_Request):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's new system
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None  # on role "tool": the call this message answers


class FunctionDefinition(_Request):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent means no parameters
    strict: StrictBool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: StrictStr


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8},
                {
                    "messages": [
                        {"role": "system", "content": "You answer briefly."},
                        {"role": "user", "content": "Hello!"},
                    ],
                    "max_tokens": 8,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        }
    )
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = None
    add_generation_prompt: StrictBool = True  # vLLM's extra
    tools: list[Tool] | None = None
    tool_choice: StrictStr | NamedToolChoice | None = None  # "none", "auto", "required" or a function
    parallel_tool_calls: StrictBool = True
    functions: list[Any] | None = None
    function_call: Any = None


class TokenizeRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"prompt": "Hello, world!"}, {"messages": [{"role": "user", "content": "Hi"}]}]
        }
    )
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # rendered with messages, as the chat endpoint renders them
    add_special_tokens: StrictBool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [{"tokens": [1, 2, 3]}]})
    model: StrictStr | None = None
    tokens: list[Int]


# --- responses -------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(_Response):
    cached_tokens: int


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's extra: the stop string or token id that ended it


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[TokenLogprob] | None = None


def _without_none(data: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in data.items() if not (k in keys and v is None)}


class ToolCallFunction(_Response):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None  # null (not absent) when the reply is tool calls
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return _without_none(handler(self), ("tool_calls",))


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(_Response):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return _without_none(handler(self), ("name", "arguments"))


class DeltaToolCall(_Response):
    """One piece of a streamed tool call: the first carries ``id``, ``type`` and the name, the rest
    argument text; ``index`` says which call of the choice it continues."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return _without_none(handler(self), ("id", "type", "function"))


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):  # a delta names only what it carries: {} at the end
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flashdecode"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    """Every error the server returns, in OpenAI's shape."""

    error: ErrorDetail
