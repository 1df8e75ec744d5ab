"""Request and response schemas of the inference API (native and OpenAI-compatible)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    max_tokens: int | None = Field(None, ge=1, description="Most new tokens (default and limit set in config).")
    temperature: Temperature = 0.7
    top_p: float = Field(1.0, gt=0, le=1)
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


class StreamOptions(BaseModel):
    """OpenAI stream options."""

    include_usage: bool = False


class OpenAIChatRequest(BaseModel):
    """Body of POST /v1/chat/completions (the subset a local model can honour)."""

    model: str
    messages: list[OpenAIMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def to_chat(self, base_model: str) -> ChatRequest:
        """Translate to our chat request (OpenAI's defaults: temperature 1, top_p 1)."""
        return ChatRequest(
            model=None if self.model == base_model else self.model,
            messages=[m.to_chat() for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=self.stop,
            seed=self.seed,
        )


class OpenAIModel(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    """Answer of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]


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
    """The one choice of a completion."""

    index: int = 0
    message: OpenAIAssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class OpenAIChatCompletion(BaseModel):
    """Answer of POST /v1/chat/completions without `stream` (with it: `chat.completion.chunk` SSE events)."""

    id: str = Field(..., examples=["chatcmpl-0123456789abcdef0123456789abcdef"])
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(..., description="Unix time (s).")
    model: str
    choices: list[OpenAIChoice]
    usage: OpenAIUsage
