"""Offline inference, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import weakref

import ray
from tqdm.auto import tqdm

from spmd.config import DEFAULT_MODEL, EngineConfig
from spmd.engine import Engine
from spmd.lora import LoRARequest
from spmd.outputs import RequestOutput
from spmd.pooling import EmbeddingRequestOutput, PoolingParams
from spmd.sampling_params import SamplingParams


class LLM:
    """``LLM(model, tensor_parallel_size=2).generate(prompts, SamplingParams(...))``.

    Keyword arguments are engine options with vLLM's names (``dtype``,
    ``max_model_len``, ``load_format``, ``skip_tokenizer_init``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``backend``, ...).

    The rank actors are freed by ``shutdown()``, at the end of a ``with LLM(...) as llm:``
    block, when the ``LLM`` is garbage-collected, or at interpreter exit; ``llm.engine``
    serves only while its ``LLM`` lives.
    """

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs):
        # Offline: outputs only when requests finish; text decoded once at the end.
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **kwargs), stream_outputs=False)
        self._ids = itertools.count()
        # The finalizer holds the engine, never the LLM, so `del llm` frees the ranks.
        # Registered with atexit after ray.init, it runs before Ray's own exit hook.
        self._finalizer = weakref.finalize(self, _close, self.engine)
        self._finalizer.atexit = False
        atexit.register(self._finalizer)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                 ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order.
        A prompt is a string, a list of token ids or ``{"prompt_token_ids": [...]}``.
        ``lora_request``: one adapter for every prompt, or one (or None) per prompt."""
        if self.engine.task == "embed":
            raise ValueError("task: this LLM computes embeddings (task='embed'); use embed(), "
                             "not generate()")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request: {len(loras)} given for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p, lora_request=lora)
                ids.append(request_id)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def embed(self, prompts, pooling_params: PoolingParams | list[PoolingParams] | None = None,
              use_tqdm: bool = True, truncate_prompt_tokens: int | None = None,
              ) -> list[EmbeddingRequestOutput]:
        """Embeds every prompt (a string, a list of token ids or ``{"prompt_token_ids":
        [...]}``, or a list of those) on an engine with ``task="embed"`` (an encoder
        checkpoint picks it itself); outputs in input order, ``.outputs.embedding``
        each. ``truncate_prompt_tokens`` applies to every prompt whose params leave it unset."""
        if self.engine.task != "embed":
            raise ValueError("task: this LLM generates text; embed() needs "
                             "LLM(model, task='embed') (or an encoder-only model)")
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts: must hold at least one input")
        params = pooling_params if isinstance(pooling_params, list) else \
            [pooling_params or PoolingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"pooling_params: {len(params)} given for {len(prompts)} prompts")
        if truncate_prompt_tokens is not None:
            params = [p if p.truncate_prompt_tokens is not None else
                      dataclasses.replace(p, truncate_prompt_tokens=truncate_prompt_tokens)
                      for p in params]
        ids: list[str] = []
        # Texts are tokenized a chunk at a time (one batched call each), between steps, so
        # that tokenizing the next chunk overlaps the ranks running the batches in flight.
        chunk = max(4 * self.engine.config.scheduler.max_num_seqs, 256)
        added = 0

        def feed(num_unfinished: int) -> bool:
            nonlocal added
            if added < len(prompts) and num_unfinished < chunk:
                part = slice(added, added + chunk)
                for prompt, p in zip(self.engine.inputs.pretokenize(prompts[part], params[part]),
                                     params[part]):
                    request_id = str(next(self._ids))
                    self.engine.add_pooling_request(request_id, prompt, p)
                    ids.append(request_id)
                added = min(added + chunk, len(prompts))
            return added < len(prompts)

        try:
            feed(0)
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm, feed=feed, total=len(prompts))

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None,
             ) -> list[RequestOutput]:
        """Generates the assistant's reply to one conversation (a list of ``{"role",
        "content"}`` dicts) or to each of a list of them, rendered with the tokenizer's
        chat template (or ``chat_template``) as vLLM's ``LLM.chat`` does."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not conversations:
            raise ValueError("messages: must hold at least one conversation")
        prompts = [self._render_chat(c, chat_template, chat_template_kwargs or {})
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _render_chat(self, conversation: list[dict], chat_template: str | None,
                     kwargs: dict) -> dict:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer; this LLM was built with "
                             "skip_tokenizer_init=True (generate() takes token ids)")
        if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"chat_template: the tokenizer of {self.engine.config.model.model} "
                             "has none; pass chat_template=... or format the prompt for generate()")
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                 add_generation_prompt=True, tokenize=False,
                                                 **kwargs)
        except Exception as e:  # a template that rejects the conversation (roles, order, ...)
            raise ValueError(f"messages: cannot render the chat template: {e}") from None
        # The template already holds the special tokens; vLLM tokenizes chat the same way.
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def _run(self, ids: list[str], use_tqdm: bool, feed=None, total: int | None = None,
             ) -> list[RequestOutput]:
        """Steps until every request in ``ids`` is done. ``feed(num_unfinished)``, if given,
        adds more requests to ``ids`` before a step and says whether more are to come."""
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=total or len(ids), desc="Processed prompts", disable=not use_tqdm,
                   unit="req")
        generated = 0
        more = feed is not None
        try:
            while more or self.engine.has_unfinished_requests():
                if more:
                    more = feed(len(ids) - len(done))
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                        if isinstance(out, RequestOutput):
                            generated += sum(len(c.token_ids) for c in out.outputs)
                            bar.set_postfix_str(f"{generated} tokens", refresh=False)
            self.engine.step()  # flush finished ids to the ranks
            self.engine.park()
        except BaseException:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        """Frees the rank actors and their placement group; a second call does nothing."""
        finalizer = getattr(self, "_finalizer", None)  # absent when __init__ failed
        if finalizer is not None:
            atexit.unregister(finalizer)
            finalizer()


def _close(engine: Engine) -> None:
    if engine.config.parallel.backend != "inproc" and not ray.is_initialized():
        return  # Ray was shut down first: the ranks went with it
    engine.shutdown()
