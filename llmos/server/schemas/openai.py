"""OpenAI's request and response bodies (chat, completions, embeddings, models), with
llmos' extras in the request body: priority, top_k, min_p, repetition_penalty, ignore_eos.
Ranges are enforced here, so a bad value is a 400 naming the field before any work."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16
NonEmpty = Annotated[str, Field(min_length=1)]
Stop = NonEmpty | Annotated[list[NonEmpty], Field(max_length=16)] | None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and completions requests share: sampling, limits, scheduling extras."""
    model: NonEmpty
    n: int = Field(1, ge=1, le=MAX_N, description=f"choices to generate (at most {MAX_N})")
    max_tokens: int | None = Field(None, ge=1)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    # llmos extras
    priority: int | None = Field(None, ge=-1000, le=1000,
                                 description="scheduling priority, lower runs first; no lower than the key allows")
    top_k: int = Field(0, ge=-1, description="0 or -1: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


# -- chat ---------------------------------------------------------------------------------

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: NonEmpty
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


Content = str | list[TextPart]


class _Message(BaseModel):
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        content = getattr(self, "content", None)
        if isinstance(content, list):
            return "".join(p.text for p in content)
        return content or ""


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantTurn(_Message):
    """An earlier assistant turn in the conversation: text, tool calls, or both."""
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _says_something(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("content: required for an assistant message without tool_calls")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDef(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef

    @property
    def function_name(self) -> str:
        return self.function.name


class LlmosTool(BaseModel):
    """llmos's extension: a tool from the server's function library, by name; with
    `llmos_execute` the server also runs it."""
    type: Literal["llmos"]
    name: str = Field(min_length=1, max_length=128)

    @property
    def function_name(self) -> str:
        return self.name.replace(".", "_")


class NamedFunction(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Annotated[Tool | LlmosTool, Field(discriminator="type")]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    llmos_execute: bool = Field(False, description="llmos: run the model -> tool -> model loop on the server "
                                                   "(the tools must be {type: llmos} tools) and return the final "
                                                   "answer with `llmos_trace`")
    llmos_max_turns: int = Field(4, ge=1, le=16, description="llmos: most tool calls the server runs")

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice: requires tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in \
                {t.function_name for t in self.tools or []}:
            raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r}")
        if self.tools and len({t.function_name for t in self.tools}) != len(self.tools):
            raise ValueError("tools: function names must be unique")
        if self.tools and self.tool_choice not in (None, "none") and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("response_format: cannot be combined with tool calls")
        if self.llmos_execute:
            if not self.tools or not all(isinstance(t, LlmosTool) for t in self.tools):
                raise ValueError("llmos_execute: every entry of tools must be {\"type\": \"llmos\", \"name\": ...}")
            if self.stream or self.n != 1:
                raise ValueError("llmos_execute: runs tools on the server and returns one final answer; "
                                 "stream must be false and n 1")
        return self


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, outputs) -> "Usage":
        """Usage of a request whose choices produced `outputs` (None for one never finished)."""
        completion_tokens = sum(len(o.token_ids) for o in outputs if o is not None)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# -- completions --------------------------------------------------------------------------

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=64)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -- embeddings and models ------------------------------------------------------------------

class EmbeddingRequest(BaseModel):
    model: NonEmpty
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmos"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
