"""Request and response schemas of the inference API (native and OpenAI-compatible)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from entity.common import Seed, Temperature

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str


class ChatRequest(BaseModel):
    """Body of POST /api/inference/chat (and each item of a batch)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Base model name, a succeeded train task's id, or a model folder; default: the base model."
    )
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="Most new tokens (default and limit set in config).")
    temperature: Temperature = 0.7
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    stop: list[str] | None = Field(None, max_length=8, description="Strings that end the answer (not included).")
    seed: Seed | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_a_question(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        """The conversation must give the model something to answer."""
        if value[-1].role == "assistant":
            raise ValueError("the last message must be from the user or system, not the assistant")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        """Accept a single stop string as well as a list; drop empty strings."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [v for v in value if v != ""] or None
        return value


class Usage(BaseModel):
    """Token counts of one generation."""

    prompt_tokens: int
    completion_tokens: int


class ChatResponse(BaseModel):
    """Answer of POST /api/inference/chat."""

    model: str
    content: str
    finish_reason: FinishReason
    usage: Usage
    latency_ms: float


class BatchRequest(BaseModel):
    """Body of POST /api/inference/batch: items are validated one by one, so one bad item fails alone."""

    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]] = Field(..., min_length=1, description="Chat request bodies.")


class ItemError(BaseModel):
    """Why one batch item failed, with the status code it would have had alone."""

    type: str
    message: str
    status_code: int


class BatchItem(BaseModel):
    """One batch result, in request order."""

    index: int
    result: ChatResponse | None = None
    error: ItemError | None = None


class BatchResponse(BaseModel):
    """Answer of POST /api/inference/batch."""

    results: list[BatchItem]
    generate_calls: int = Field(..., description="How many batched generate() calls served the batch.")
    latency_ms: float


# -- OpenAI-compatible protocol (/v1) -----------------------------------------------------------------


class OpenAIContentPart(BaseModel):
    """A content part; only text parts are supported."""

    type: Literal["text"]
    text: str


class OpenAIMessage(BaseModel):
    """An OpenAI chat message (string content or text parts)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[OpenAIContentPart]
    name: str | None = None

    def to_chat(self) -> ChatMessage:
        """Our message: developer turns act as system turns, text parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


JSON_INSTRUCTION = "Answer with one valid JSON object and nothing else: no prose, no code fences."


class StreamOptions(BaseModel):
    """OpenAI stream options."""

    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, or a JSON object (instructed, then parse-checked)."""

    type: Literal["text", "json_object"] = Field(
        ..., description="`json_schema` is not supported (422); `json_object` answers are checked to parse."
    )


# Options OpenAI accepts that this server does not implement: naming one gets a 422, never a silent no-op.
UNSUPPORTED_OPTIONS = (
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "logit_bias", "audio",
    "modalities", "prediction", "web_search_options", "reasoning_effort", "service_tier", "store", "metadata",
    "verbosity", "prompt_cache_key", "safety_identifier",
)  # fmt: skip


class OpenAIChatRequest(BaseModel):
    """Body of POST /v1/chat/completions: every option is honoured or refused with a 422 that names it."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[OpenAIMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: StrictInt = Field(1, ge=1, le=16, description="Choices per request; each is its own engine request.")
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    presence_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_silent_options(cls, data: Any) -> Any:
        """Refuse options that would otherwise be ignored, naming each one."""
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        for key, value in data.items():
            if value is None:
                continue
            if key in UNSUPPORTED_OPTIONS or key not in known:
                raise ValueError(f"the option '{key}' is not supported by this server")
        for key in ("presence_penalty", "frequency_penalty"):
            if data.get(key):
                raise ValueError(f"the option '{key}' is not supported by this server (only 0 is accepted)")
        fmt = data.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            raise ValueError("the option 'response_format' of type 'json_schema' is not supported; use json_object")
        if data.get("top_logprobs") and not data.get("logprobs"):
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return data

    @property
    def wants_json(self) -> bool:
        """Whether the answer must be a JSON object."""
        return self.response_format is not None and self.response_format.type == "json_object"

    def to_chat(self, base_model: str) -> ChatRequest:
        """Translate to our chat request (OpenAI's defaults: temperature 1, top_p 1)."""
        messages = [m.to_chat() for m in self.messages]
        if self.wants_json:
            messages.insert(0, ChatMessage(role="system", content=JSON_INSTRUCTION))
        return ChatRequest(
            model=None if self.model == base_model else self.model,
            messages=messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=self.stop,
            seed=self.seed,
        )


class OpenAIUsage(BaseModel):
    """Token counts of a completion, OpenAI style."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAIAssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str


class OpenAIChoice(BaseModel):
    """One choice of a completion (`n` of them)."""

    index: int = 0
    message: OpenAIAssistantMessage
    logprobs: dict[str, Any] | None = Field(None, description="With `logprobs`: OpenAI's {content: [...]} object.")
    finish_reason: FinishReason


class OpenAIChatCompletion(BaseModel):
    """Answer of POST /v1/chat/completions without `stream` (with it: `chat.completion.chunk` SSE events)."""

    id: str = Field(..., examples=["chatcmpl-0123456789abcdef0123456789abcdef"])
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(..., description="Unix time (s).")
    model: str
    choices: list[OpenAIChoice]
    usage: OpenAIUsage
