"""Where a request enters: tokenization and validation, once, before anything is
queued. It runs in the frontend (the Serve replica, or the offline ``LLM``), so a
bad request is a ``ValueError`` there and the engine core never sees it."""

from __future__ import annotations

import time

from serialization import EngineCoreRequest, SamplingOptions
from spmd.config import EngineConfig, resolve_model
from spmd.sampling_params import SamplingParams
from workers.model_loader import load_hf_config, validate_tp
from workers.models import get_model_class


class ModelInfo:
    """What both the frontend and the core derive from the model's config alone."""

    def __init__(self, config: EngineConfig):
        self.model_path = resolve_model(config.model.model)
        self.hf_config = load_hf_config(self.model_path)
        get_model_class(self.hf_config)  # unknown architecture: ValueError before any actor starts
        validate_tp(self.hf_config, config.parallel.tensor_parallel_size)
        self.max_model_len = max_model_len(self.hf_config, config.model.max_model_len)
        config.check_warmup_shapes_fit(self.max_model_len)
        self.vocab_size = self.hf_config.vocab_size


class InputProcessor:
    def __init__(self, config: EngineConfig, info: ModelInfo | None = None):
        self.info = info or ModelInfo(config)
        self.tokenizer = None
        if not config.model.skip_tokenizer_init:
            from spmd.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(config.model.tokenizer or self.info.model_path)
        self.eos_token_ids = eos_ids(self.info.hf_config, self.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def process(self, request_id: str, prompt, params: SamplingParams,
                arrival_time: float | None = None) -> tuple[str | None, list[int], EngineCoreRequest]:
        """``(prompt text or None, prompt token ids, the core's request)``; ``ValueError``
        naming the field and the limit for bad input."""
        text, prompt_ids = self._tokenize(prompt)
        max_len = self.info.max_model_len
        if not prompt_ids:
            raise ValueError("prompt: must contain at least 1 token")
        if len(prompt_ids) >= max_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens; the limit is max_model_len - 1 = "
                             f"{max_len - 1} (max_model_len={max_len})")
        vocab = self.info.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab}) (vocab_size)")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs: {params.logprobs} exceeds vocab_size={vocab}")
        budget = max_len - len(prompt_ids)
        max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        request = EngineCoreRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling_options(params),
            n=params.n, seed=params.seed, max_tokens=max_tokens,
            min_tokens=min(params.min_tokens, max_tokens), stop_token_ids=sorted(stop_ids),
            arrival_time=time.time() if arrival_time is None else arrival_time)
        return text, prompt_ids, request

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt.get("prompt")
        if isinstance(prompt, (list, tuple)):
            return None, [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise ValueError("prompt: must be a string, a list of token ids or "
                             "{'prompt_token_ids': [...]}")
        if self.tokenizer is None:
            raise ValueError("prompt: a text prompt needs a tokenizer (skip_tokenizer_init=True "
                             "serves {'prompt_token_ids': [...]} only)")
        return prompt, self.tokenizer.encode(prompt)


def sampling_options(params: SamplingParams, seed: int = 0) -> SamplingOptions:
    return SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        seed=seed, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logprobs=-1 if params.logprobs is None else params.logprobs)


def max_model_len(hf_config, requested: int | None) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's "
                         f"max_position_embeddings={limit}")
    return requested


def eos_ids(hf_config, tokenizer) -> set[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    out = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out
