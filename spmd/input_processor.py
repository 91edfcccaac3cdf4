"""Where a request enters: tokenization and validation, once, before anything is
queued. It runs in the frontend (the Serve replica, or the offline ``LLM``), so a
bad request is a ``ValueError`` there and the engine core never sees it."""

from __future__ import annotations

import importlib.util
import os
import threading
import time

from serialization import EngineCoreRequest, PoolingRequest, SamplingOptions
from spmd.config import EngineConfig, resolve_model
from spmd.pooling import PoolerInfo, PoolingParams
from spmd.sampling_params import SamplingParams
from spmd.structured_outputs import guided_spec
from workers.model_loader import config_from_json, load_hf_config, validate_tp
from workers.models import get_model_class


class ModelInfo:
    """What both the frontend and the core derive from the model's config alone,
    including the task when the config leaves it to the model (``task="auto"``)."""

    def __init__(self, config: EngineConfig, hf_config: bytes = b""):
        """``hf_config``: the model's config as the frontend read it (``config_json``);
        the engine core then reads nothing and imports no transformers."""
        self.model_path = resolve_model(config.model.model)
        self.hf_config = (config_from_json(hf_config) if hf_config
                          else load_hf_config(self.model_path))
        # An unknown architecture is a ValueError here, before any actor starts.
        model_cls = get_model_class(self.hf_config)
        validate_tp(self.hf_config, config.parallel.tensor_parallel_size)
        self.is_encoder = bool(getattr(model_cls, "is_encoder", False))
        self.task = config.task if config.task != "auto" else (
            "embed" if self.is_encoder else "generate")
        if self.is_encoder and self.task != "embed":
            raise ValueError(f"task: {model_cls.__name__} is an encoder-only model; "
                             "it serves task='embed' (embeddings), not text generation")
        self.pooler: PoolerInfo | None = None
        limit = None
        if self.task == "embed":
            folder = self.model_path if os.path.isdir(self.model_path) else None
            self.pooler = PoolerInfo.from_model(folder, self.hf_config, self.is_encoder,
                                                config.pooler.pooling, config.pooler.normalize)
            if self.is_encoder:
                limit = model_cls.max_positions(self.hf_config)
            if self.pooler.max_seq_length:  # sentence-transformers' own limit, as vLLM reads it
                limit = min(limit or self.pooler.max_seq_length, self.pooler.max_seq_length)
        self.max_model_len = max_model_len(self.hf_config, config.model.max_model_len, limit)
        config.check_warmup_shapes_fit(self.max_model_len)
        self.vocab_size = self.hf_config.vocab_size


class InputProcessor:
    """``clamp_max_tokens``: a ``max_tokens`` beyond the context is cut to fit (offline,
    as vLLM's ``LLM`` does) instead of refused (the server, as OpenAI and vLLM do)."""

    def __init__(self, config: EngineConfig, info: ModelInfo | None = None, *,
                 clamp_max_tokens: bool = True):
        self.info = info or ModelInfo(config)
        self.limits = config.limits
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.clamp_max_tokens = clamp_max_tokens
        self.enable_lora = config.lora.enable_lora
        self.tokenizer = None
        if not config.model.skip_tokenizer_init:
            from spmd.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(config.model.tokenizer or self.info.model_path)
        self.eos_token_ids = eos_ids(self.info.hf_config, self.tokenizer)
        self._grammar_vocab: bytes | None = None
        self._grammar_lock = threading.Lock()
        self.grammar_thread: threading.Thread | None = None  # prepare_grammar_vocab's

    def grammar_vocab(self) -> bytes:
        """The vocabulary the ranks compile constraints against (built once, on first use
        or by ``prepare_grammar_vocab``'s thread, which this waits for)."""
        with self._grammar_lock:
            if self._grammar_vocab is None:
                from workers.structured import pack_vocab

                self._grammar_vocab = pack_vocab(self.tokenizer, self.info.vocab_size)
            return self._grammar_vocab

    def prepare_grammar_vocab(self) -> threading.Thread | None:
        """Builds ``grammar_vocab`` in a daemon thread, started while the ranks load, so
        the first constrained request does not pay xgrammar's import and the vocabulary
        (0.5-1.8 s on a 2-core VM; an H200 run's first constrained batch paid ~0.9 s). Only
        where there is a tokenizer and xgrammar is installed; a failure here is raised again
        by the first constrained request."""
        if self.tokenizer is None or self.info.task == "embed" \
                or importlib.util.find_spec("xgrammar") is None:
            return None

        def build():
            try:
                self.grammar_vocab()
            except Exception:  # noqa: BLE001 - the first constrained request raises it
                pass

        self.grammar_thread = threading.Thread(target=build, daemon=True,
                                               name="spmd-grammar-vocab")
        self.grammar_thread.start()
        return self.grammar_thread

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def process(self, request_id: str, prompt, params: SamplingParams,
                arrival_time: float | None = None, lora_request=None,
                ) -> tuple[str | None, list[int], EngineCoreRequest]:
        """``(prompt text or None, prompt token ids, the core's request)``; ``ValueError``
        naming the field and the limit for bad input. ``lora_request``: a ``LoRARequest``
        the request runs with (registered with the core beforehand)."""
        if self.info.task == "embed":
            raise ValueError("task: this engine computes embeddings (task='embed'); it does "
                             "not generate text: use embed() (/v1/embeddings)")
        self._check_limits(params)
        if lora_request is not None and not self.enable_lora:
            raise ValueError("lora_request: LoRA is not enabled (start the engine with "
                             "enable_lora=True)")
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
        budget = max_len - len(prompt_ids)
        if params.max_tokens is None:
            max_tokens = budget
        elif params.max_tokens <= budget or self.clamp_max_tokens:
            max_tokens = min(params.max_tokens, budget)
        else:
            raise ValueError(
                f"max_tokens: {params.max_tokens} exceeds the room left in the context: the "
                f"prompt has {len(prompt_ids)} tokens and max_model_len is {max_len}, so at "
                f"most {budget} tokens can be generated")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        guided = None
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs: needs the model's tokenizer (the engine "
                                 "runs with skip_tokenizer_init)")
            # The grammar may end on the request's stop tokens (on EOS with ignore_eos).
            guided = guided_spec(params.structured_outputs, sorted(stop_ids or self.eos_token_ids))
        request = EngineCoreRequest(
            request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling_options(params),
            n=params.n, seed=params.seed, max_tokens=max_tokens,
            min_tokens=min(params.min_tokens, max_tokens), stop_token_ids=sorted(stop_ids),
            arrival_time=time.time() if arrival_time is None else arrival_time,
            lora_id=0 if lora_request is None else lora_request.lora_int_id, guided=guided)
        return text, prompt_ids, request

    def pretokenize(self, prompts: list, params: list[PoolingParams], tokenizer=None) -> list:
        """The prompts with every valid text one replaced by ``{"prompt": text,
        "prompt_token_ids": ids}``, tokenized in one batched call per truncation length (the
        tokenizer's batch path runs in Rust, on all cores, without the GIL) with
        ``tokenizer`` (default: this processor's; a copy of it for another thread). What
        ``process_pooling`` would refuse (an empty or invalid text, a bad
        ``truncate_prompt_tokens``) is left to it, so that its message names the problem."""
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is None:
            return list(prompts)
        groups: dict[int | None, list[int]] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(prompt, str) or not prompt or not _is_unicode(prompt):
                continue
            try:
                groups.setdefault(self._keep_tokens(p), []).append(i)
            except ValueError:
                continue
        out = list(prompts)
        for keep, idx in groups.items():
            for i, ids in zip(idx, _encode_texts(tokenizer, [prompts[i] for i in idx], keep)):
                out[i] = {"prompt": prompts[i], "prompt_token_ids": ids}
        return out

    def _keep_tokens(self, params: PoolingParams) -> int | None:
        """``truncate_prompt_tokens`` resolved (-1: the model's maximum); a ``ValueError``
        past the model's maximum."""
        max_len = self.info.max_model_len
        keep = params.truncate_prompt_tokens
        if keep == -1:
            return max_len
        if keep is not None and keep > max_len:
            raise ValueError(f"truncate_prompt_tokens: {keep} exceeds the model's maximum of "
                             f"{max_len} tokens (max_model_len)")
        return keep

    def process_pooling(self, request_id: str, prompt, params: PoolingParams | None = None,
                        arrival_time: float | None = None,
                        ) -> tuple[str | None, list[int], PoolingRequest]:
        """``(prompt text or None, prompt token ids, the core's request)`` of an embedding
        request; ``ValueError`` naming the field and the limit for bad input."""
        if self.info.task != "embed":
            raise ValueError("task: this engine generates text (task='generate'); start it "
                             "with task='embed' to compute embeddings")
        params = params or PoolingParams()
        self.info.pooler.check(params)
        max_len = self.info.max_model_len
        keep = self._keep_tokens(params)
        if isinstance(prompt, str) and not prompt:
            raise ValueError("input: an empty string has nothing to embed")
        if isinstance(prompt, str) and keep is not None and self.tokenizer is not None:
            text, prompt_ids = prompt, _encode_texts(self.tokenizer, [prompt], keep)[0]
        else:
            text, prompt_ids = self._tokenize(prompt)
            if keep is not None:
                prompt_ids = prompt_ids[:keep]
        if not prompt_ids:
            raise ValueError("prompt_token_ids: must contain at least 1 token")
        if len(prompt_ids) > max_len:
            raise ValueError(f"input: {len(prompt_ids)} tokens exceed the model's maximum of "
                             f"{max_len} tokens (max_model_len); shorten the input or set "
                             "truncate_prompt_tokens")
        vocab = self.info.vocab_size
        if max(prompt_ids) >= vocab or min(prompt_ids) < 0:
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab}) (vocab_size)")
        request = PoolingRequest(request_id, list(prompt_ids),
                                 time.time() if arrival_time is None else arrival_time)
        return text, list(prompt_ids), request

    def _check_limits(self, params: SamplingParams) -> None:
        """The engine's per-request limits (``LimitsConfig``), each a ``ValueError``
        naming the field, the value and the limit."""
        lim = self.limits
        max_n = min(lim.max_n, self.max_num_seqs)
        if params.n > max_n:
            which = "max_n" if lim.max_n <= self.max_num_seqs else "max_num_seqs"
            raise ValueError(f"n: {params.n} exceeds the limit of {max_n} ({which})")
        vocab = self.info.vocab_size
        max_logprobs = min(lim.max_logprobs, vocab)
        if params.logprobs is not None and params.logprobs > max_logprobs:
            raise ValueError(f"logprobs: {params.logprobs} exceeds the limit of {max_logprobs} "
                             "(max_logprobs)")
        if len(params.stop) > lim.max_stop_strings:
            raise ValueError(f"stop: {len(params.stop)} strings exceed the limit of "
                             f"{lim.max_stop_strings} (max_stop_strings)")
        if params.stop and (longest := max(map(len, params.stop))) > lim.max_stop_string_chars:
            raise ValueError(f"stop: a string of {longest} characters exceeds the limit of "
                             f"{lim.max_stop_string_chars} (max_stop_string_chars)")
        if len(params.stop_token_ids) > lim.max_stop_token_ids:
            raise ValueError(f"stop_token_ids: {len(params.stop_token_ids)} ids exceed the limit "
                             f"of {lim.max_stop_token_ids} (max_stop_token_ids)")

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._tokenize(list(prompt["prompt_token_ids"]))[1]
            prompt = prompt.get("prompt")
        if isinstance(prompt, (list, tuple)):
            if not set(map(type, prompt)) <= {int}:  # ints, not bools (one pass in C)
                raise ValueError("prompt_token_ids: must be a list of ints")
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError("prompt: must be a string, a list of token ids or "
                             "{'prompt_token_ids': [...]}")
        if self.tokenizer is None:
            raise ValueError("prompt: a text prompt needs a tokenizer (skip_tokenizer_init=True "
                             "serves {'prompt_token_ids': [...]} only)")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt: not valid Unicode (a lone surrogate at character "
                             f"{e.start})") from None
        return prompt, self.tokenizer.encode(prompt)


def _encode_texts(tokenizer, texts: list[str], keep: int | None) -> list[list[int]]:
    """Token ids of each text, special tokens included ([CLS] ... [SEP] kept when the
    tokenizer truncates to ``keep``)."""
    cut = {} if keep is None else dict(truncation=True, max_length=keep)
    return tokenizer(texts, **cut)["input_ids"]


def sampling_options(params: SamplingParams, seed: int = 0) -> SamplingOptions:
    return SamplingOptions(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        seed=seed, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logprobs=-1 if params.logprobs is None else params.logprobs)


def max_model_len(hf_config, requested: int | None, limit: int | None = None) -> int:
    """``requested`` (checked) or the model's limit: ``limit`` where the caller knows one
    (an encoder's position table, sentence-transformers' max_seq_length), else
    ``max_position_embeddings``."""
    what = "its maximum sequence length"
    if limit is None:
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        what = "max_position_embeddings"
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len: {requested} exceeds the model's {what}={limit}")
    return requested


def eos_ids(hf_config, tokenizer) -> set[int]:
    ids = getattr(hf_config, "eos_token_id", None)
    out = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out


def _is_unicode(text: str) -> bool:
    """Whether the text encodes to UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

