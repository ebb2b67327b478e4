"""Request bodies of the HTTP API (pydantic) and the error type both APIs raise.

Bodies are parsed by hand (``parse_body``) instead of through FastAPI's automatic validation so
that every malformed input -- bytes that are not UTF-8, text that is not JSON, unknown fields,
wrong types -- becomes a 400 with a message, never a 422 or a 500.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error that becomes an HTTP response: ``status`` (4xx/5xx) with ``message``."""

    def __init__(self, status: int, message: str, err_type: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}, "object": "error"}


M = TypeVar("M", bound=BaseModel)


def decode_json(raw: bytes) -> Any:
    """UTF-8 JSON bytes -> a Python value; ApiError(400) for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8: {e}") from None
    if not text.strip():
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None


def parse_body(raw: bytes, model: type[M]) -> M:
    """Decode and validate a JSON object body against ``model``; ApiError(400) on any problem."""
    value = decode_json(raw)
    if not isinstance(value, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(value).__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        parts = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err["loc"]) or "body"
            parts.append(f"{loc}: {err['msg']}")
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise ApiError(400, "invalid request: " + "; ".join(parts),
                       param=str(first[0]) if first else None) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- SGLang native ----------------------------------------------------------------------------

# Fields upstream's GenerateReqInput has that this server cannot honour: accepted only when null.
NATIVE_NULL_ONLY_FIELDS = ("image_data", "video_data", "audio_data", "lora_path", "session_id",
                           "custom_logit_processor", "modalities", "bootstrap_host",
                           "bootstrap_port", "bootstrap_room", "data_parallel_rank",
                           "input_embeds", "token_ids_logprob", "return_hidden_states",
                           "background", "return_bytes", "return_entropy")
# Fields sglang-router adds to every proxied /generate body; they do not change the output.
NATIVE_IGNORED_FIELDS = ("model", "log_metrics", "no_logs")


class GenerateReqInput(_Strict):
    """Body of native ``POST /generate`` (the fields ``sglang``'s RuntimeEndpoint sends)."""

    model_config = ConfigDict(extra="allow", strict=True)  # extra keys are checked by hand

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool | None = None
    stream: bool | None = None
    rid: str | list[str] | None = None

    def check_extra(self) -> None:
        for key, value in (self.model_extra or {}).items():
            if key in NATIVE_IGNORED_FIELDS:
                continue
            if key not in NATIVE_NULL_ONLY_FIELDS:
                raise ApiError(400, f"unknown field {key!r} in /generate request", param=key)
            if value not in (None, [], False):
                raise ApiError(400, f"field {key!r} is not supported by this server", param=key)


class AbortReq(_Strict):
    rid: str = ""
    abort_all: bool = False


class ConcateAndAppendReq(_Strict):
    src_rids: list[str]
    dst_rid: str


# ---- OpenAI -----------------------------------------------------------------------------------

class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "response"
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _SamplingFields(_Strict):
    """Fields shared by completions and chat (OpenAI names + SGLang's extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # SGLang extensions
    top_k: int = -1
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None
    response_format: ResponseFormat | None = None
    rid: str | None = None
    # sent by sglang-router with these defaults (no reasoning parser, no hidden states here)
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    return_hidden_states: Literal[False] = False

    model_config = ConfigDict(extra="forbid", strict=False)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool = False
