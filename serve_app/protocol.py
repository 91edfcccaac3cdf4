"""Request and response bodies of the OpenAI API (the subset we serve), and the
translations between them and the engine's ``SamplingParams`` / ``PoolingParams`` /
log-probs."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.tool_parsers import validate_tool_choice, validate_tools
from spmd import Logprob, PoolingParams, SamplingParams, StructuredOutputsParams

_MIN_LOGPROB = -9999.0  # JSON has no -inf


class _Request(BaseModel):
    # strict: "5" is not an int, true is not a number. Unknown fields are ignored (as vLLM does).
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields both endpoints share; vLLM's extras (top_k, min_p, ...) included."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (one of them per request).
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # OpenAI / vLLM fields this server does not implement: accepted in the schema only to
    # be refused with a 400 naming them (never silently ignored) unless given as a no-op.
    best_of: Any = None
    logit_bias: Any = None
    functions: Any = None
    function_call: Any = None

    def _refuse_unsupported(self) -> None:
        noop = {"best_of": (None, 1), "logit_bias": (None, {}), "functions": (None, []),
                "function_call": (None, "none")}
        for name, ok_values in noop.items():
            value = getattr(self, name)
            if not any(value == ok and type(value) is type(ok) for ok in ok_values):
                hint = "; use tools and tool_choice" if name.startswith("function") else ""
                raise ValueError(f"{name}: not supported by this server{hint}; leave it out")

    def structured(self) -> StructuredOutputsParams | None:
        """The request's output constraint, from whichever field gave one (``ValueError``
        naming the field for a bad value, or for two fields given at once)."""
        found = []
        rf = self.response_format
        if rf is not None:
            if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object",
                                                                  "json_schema"):
                raise ValueError("response_format: must be an object whose type is text, "
                                 "json_object or json_schema")
            if rf["type"] == "json_object":
                found.append(StructuredOutputsParams(json_object=True, source="response_format"))
            elif rf["type"] == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or "schema" not in spec:
                    raise ValueError("response_format.json_schema: must be an object with a "
                                     "schema (and a name)")
                found.append(StructuredOutputsParams(
                    json=spec["schema"], source="response_format.json_schema.schema"))
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, dict):
                raise ValueError("structured_outputs: must be an object (json, regex, choice, "
                                 "grammar or json_object)")
            found.append(StructuredOutputsParams.coerce(self.structured_outputs))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                          ("guided_choice", "choice"), ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                found.append(StructuredOutputsParams(**{key: value}, source=name))
        if len(found) > 1:
            raise ValueError(f"{found[1].source}: give one output constraint, not several "
                             f"(also given: {found[0].source})")
        return found[0] if found else None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ``SamplingParams``' ``ValueError`` (naming the field) for out-of-range values."""
        self._refuse_unsupported()
        given = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                     min_p=self.min_p, presence_penalty=self.presence_penalty,
                     frequency_penalty=self.frequency_penalty,
                     repetition_penalty=self.repetition_penalty)
        return SamplingParams(
            n=self.n, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop, stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=self.structured(),
            **{k: v for k, v in given.items() if v is not None})


class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: Any = None

    tools: Any = None  # chat only: refused here by name
    tool_choice: Any = None

    def _refuse_unsupported(self) -> None:
        if self.suffix is not None:
            raise ValueError("suffix: not supported by this server; leave it out")
        for name in ("tools", "tool_choice"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: tool calling is a chat feature; use "
                                 "/v1/chat/completions")
        super()._refuse_unsupported()

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        def token_ids(x):
            return isinstance(x, list) and x and all(type(t) is int for t in x)

        ok = (isinstance(v, str) or token_ids(v)
              or (isinstance(v, list) and v and all(isinstance(p, str) or token_ids(p) for p in v)))
        if not ok:
            raise ValueError("must be a string, a list of strings, a non-empty list of token ids "
                             "or a list of token-id lists")
        return v

    def prompts(self) -> list[str | dict]:
        """One engine prompt per entry: text, or ``{"prompt_token_ids": [...]}``."""
        p = self.prompt
        if isinstance(p, str) or type(p[0]) is int:
            p = [p]
        return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in p]

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_calls, tool_call_id, ...) reach the chat template.
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _check_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: must be a string or a list of text parts for role "
                             f"{self.role!r} (only an assistant message may have null content)")
        return self

    def for_template(self) -> dict:
        msg = self.model_dump(exclude_none=True)
        if self.role == "developer":  # OpenAI's newer name for system; templates know system
            msg["role"] = "system"
        if self.content is None:
            msg["content"] = ""
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise ValueError("messages: only text content parts are supported")
            msg["content"] = "\n".join(part.text or "" for part in self.content)
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True

    def tool_setup(self) -> tuple[list[dict], str]:
        """(the validated tools, the mode: none | auto | required | a function's name);
        ``ValueError`` naming the field."""
        tools = validate_tools(self.tools) if self.tools is not None else []
        return tools, validate_tool_choice(self.tool_choice, tools)

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError(f"max_tokens: {self.max_tokens} disagrees with max_completion_tokens="
                             f"{self.max_completion_tokens}; give one of them")
        max_tokens = (self.max_tokens if self.max_completion_tokens is None
                      else self.max_completion_tokens)
        return self._sampling_params(max_tokens, logprobs)


class LoadLoRAAdapterRequest(_Request):
    """``POST /v1/load_lora_adapter`` (vLLM's): a PEFT adapter folder on the server."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(_Request):
    """``POST /v1/unload_lora_adapter``: the adapter by name (or, as vLLM, by its id)."""

    lora_name: str | None = Field(default=None, min_length=1)
    lora_int_id: int | None = None

    @model_validator(mode="after")
    def _one_given(self):
        if self.lora_name is None and self.lora_int_id is None:
            raise ValueError("lora_name: required")
        return self


MAX_EMBEDDING_INPUTS = 2048  # per request, as OpenAI's embeddings endpoint


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``: OpenAI's fields, and vLLM's ``truncate_prompt_tokens``."""

    model: str | None = None
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, v):
        def token_ids(x):
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, list) and v and token_ids(v):
            return v  # one input of token ids
        items = [v] if isinstance(v, str) else v
        if not (isinstance(items, list) and all(isinstance(x, str) or token_ids(x)
                                                for x in items)):
            raise ValueError("must be a string, a list of strings, a list of token ids or a "
                             "list of token-id lists")
        if not items:
            raise ValueError("must not be an empty list")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"{len(items)} inputs exceed the limit of {MAX_EMBEDDING_INPUTS} "
                             "per request")
        for i, x in enumerate(items):
            if not x:
                what = "an empty string" if isinstance(x, str) else "an empty list of token ids"
                raise ValueError(f"must not be {what}" if isinstance(v, str)
                                 else f"entry {i} is {what}")
        return v

    def inputs(self) -> list[str | dict]:
        """One engine prompt per entry: text, or ``{"prompt_token_ids": [...]}``."""
        v = self.input
        if isinstance(v, str) or type(v[0]) is int:
            v = [v]
        return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in v]

    def pooling_params(self) -> PoolingParams:
        return PoolingParams(dimensions=self.dimensions,
                             truncate_prompt_tokens=self.truncate_prompt_tokens)


# ---- responses ---------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def build(cls, token_ids: list[int], entries: list[dict[int, Logprob]], offset: int):
        """``offset``: characters of text before the first of these tokens."""
        out = cls(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for tid, entry in zip(token_ids, entries):
            token = entry[tid].decoded_token or ""
            out.tokens.append(token)
            out.token_logprobs.append(max(entry[tid].logprob, _MIN_LOGPROB))
            out.top_logprobs.append({(lp.decoded_token or ""): max(lp.logprob, _MIN_LOGPROB)
                                     for lp in _by_rank(entry)})
            out.text_offset.append(offset)
            offset += len(token)
        return out


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or one streamed chunk of one (same shape)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]

    @classmethod
    def build(cls, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int):
        def one(lp: Logprob) -> dict:
            token = lp.decoded_token or ""
            return dict(token=token, logprob=max(lp.logprob, _MIN_LOGPROB),
                        bytes=list(token.encode("utf-8")))

        return cls(content=[
            ChatLogprob(**one(entry[tid]),
                        top_logprobs=[TopLogprob(**one(lp)) for lp in _by_rank(entry)[:top_n]])
            for tid, entry in zip(token_ids, entries)])


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = []


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # encoding_format "base64": little-endian float32 bytes

    @classmethod
    def build(cls, index: int, vector: np.ndarray, encoding_format: str) -> EmbeddingData:
        if encoding_format == "base64":
            raw = vector.astype("<f4", copy=False).tobytes()
            embedding = base64.b64encode(raw).decode("ascii")
        else:
            embedding = vector.tolist()
        return cls.model_construct(index=index, embedding=embedding)  # built here: valid


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spmd-serve"
    max_model_len: int
    root: str | None = None  # a LoRA adapter: its path
    parent: str | None = None  # a LoRA adapter: the served model it adapts


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _by_rank(entry: dict[int, Logprob]) -> list[Logprob]:
    """The top-n alternatives in rank order (the sampled token too when it ranks)."""
    return sorted((lp for lp in entry.values() if lp.rank is not None), key=lambda lp: lp.rank)
