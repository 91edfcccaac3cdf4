"""Turns sampled tokens into user-facing outputs: detokenization, stop strings,
log-probs, and fan-in of ``n`` sequences into one ``RequestOutput``."""

from __future__ import annotations

import time

import numpy as np

from serialization import SamplerOutput
from spmd.detokenizer import DetokState, detokenize_step
from spmd.outputs import CompletionOutput, Logprob, RequestOutput
from spmd.request import Request, RequestStatus
from spmd.sampling_params import SamplingParams


class _Tracked:
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "children", "completions",
                 "detok", "arrival_time", "first_token_time")

    def __init__(self, request_id, prompt, prompt_ids, params: SamplingParams, children, tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_ids
        self.params = params
        self.children: list[Request] = children
        self.completions = [CompletionOutput(i, "", c.output_token_ids,
                                             0.0 if params.logprobs is not None else None,
                                             [] if params.logprobs is not None else None)
                            for i, c in enumerate(children)]
        detok = tokenizer is not None and params.detokenize
        self.detok = [DetokState(prompt_ids, params.stop, params.include_stop_str_in_output,
                                 params.skip_special_tokens) if detok else None for _ in children]
        self.arrival_time = children[0].arrival_time
        self.first_token_time = None


class OutputProcessor:
    """``stream=True`` (online) reports every request that advanced, with its text
    so far; ``stream=False`` (offline) reports finished requests only and
    detokenizes incrementally just the requests with stop strings."""

    def __init__(self, tokenizer, stream: bool = True):
        self.tokenizer = tokenizer
        self.stream = stream
        self._by_request: dict[str, _Tracked] = {}
        self._by_seq: dict[int, tuple[_Tracked, int]] = {}

    def has(self, request_id: str) -> bool:
        return request_id in self._by_request

    def add(self, request_id, prompt, prompt_ids, params, children) -> None:
        tracked = _Tracked(request_id, prompt, prompt_ids, params, children, self.tokenizer)
        self._by_request[request_id] = tracked
        for i, child in enumerate(children):
            self._by_seq[child.seq_id] = (tracked, i)

    def abort(self, request_id: str) -> list[Request]:
        tracked = self._by_request.pop(request_id, None)
        if tracked is None:
            return []
        for child in tracked.children:
            self._by_seq.pop(child.seq_id, None)
        return [c for c in tracked.children if not c.status.is_finished]

    def process(self, updated: list[Request], out: SamplerOutput, scheduler) -> list[RequestOutput]:
        now = time.time()
        self._add_logprobs(out)
        touched: dict[str, _Tracked] = {}
        detok_updates, detok_owner = [], []
        for req in updated:
            tracked, i = self._by_seq[req.seq_id]
            touched[tracked.request_id] = tracked
            tracked.first_token_time = tracked.first_token_time or now
            det = tracked.detok[i]
            if det is not None and (self.stream or det.stop):
                detok_updates.append((tracked.detok[i], [req.output_token_ids[-1]]))
                detok_owner.append((tracked, i, req))
        if detok_updates:
            stops = detokenize_step(self.tokenizer, detok_updates)
            for (tracked, i, req), stop in zip(detok_owner, stops):
                tracked.completions[i].text = tracked.detok[i].text
                if stop is not None and not req.status.is_finished:
                    scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                    tracked.completions[i].stop_reason = stop
        results = []
        for tracked in touched.values():
            finished = True
            for comp, child in zip(tracked.completions, tracked.children):
                if child.status.is_finished:
                    comp.finish_reason = child.finish_reason
                    if comp.stop_reason is None and child.finish_reason == "stop" and child.output_token_ids:
                        last = child.output_token_ids[-1]
                        comp.stop_reason = last if last in child.stop_token_ids else None
                else:
                    finished = False
            if finished:
                self._final_text(tracked)
                self._forget(tracked)
            if finished or self.stream:
                results.append(self._output(tracked, finished, now))
        return results

    def _final_text(self, tracked: _Tracked) -> None:
        """Decodes, once, the completions that were not detokenized step by step."""
        for comp, det in zip(tracked.completions, tracked.detok):
            if det is None or self.stream or det.stop:
                continue
            context = det.tokens[: det.read]  # the prompt's tail: keeps the first token's leading space
            texts = self.tokenizer.batch_decode([context, context + list(comp.token_ids)],
                                                skip_special_tokens=det.skip_special,
                                                clean_up_tokenization_spaces=False)
            comp.text = texts[1][len(texts[0]):]

    def _output(self, tracked: _Tracked, finished: bool, now: float) -> RequestOutput:
        metrics = dict(arrival_time=tracked.arrival_time, first_token_time=tracked.first_token_time)
        if finished:
            metrics["finished_time"] = now
        return RequestOutput(tracked.request_id, tracked.prompt, tracked.prompt_token_ids,
                             tracked.completions, finished,
                             num_cached_tokens=tracked.children[0].num_cached_tokens, metrics=metrics)

    def _forget(self, tracked: _Tracked) -> None:
        self._by_request.pop(tracked.request_id, None)
        for child in tracked.children:
            self._by_seq.pop(child.seq_id, None)

    def _add_logprobs(self, out: SamplerOutput) -> None:
        if not out.logprob_seq_ids:
            return
        seq_ids = np.frombuffer(out.logprob_seq_ids, dtype="<i4").tolist()
        sampled_lp = np.frombuffer(out.sampled_logprobs, dtype="<f4").tolist()
        all_ids = np.frombuffer(out.seq_ids, dtype="<i4").tolist()
        all_toks = dict(zip(all_ids, np.frombuffer(out.token_ids, dtype="<i4").tolist()))
        k = out.num_top
        top_ids = np.frombuffer(out.top_ids, dtype="<i4").reshape(-1, k) if k else None
        top_lps = np.frombuffer(out.top_logprobs, dtype="<f4").reshape(-1, k) if k else None
        for row, seq_id in enumerate(seq_ids):
            if seq_id not in self._by_seq:
                continue
            tracked, i = self._by_seq[seq_id]
            comp = tracked.completions[i]
            n = tracked.params.logprobs
            token = all_toks[seq_id]
            entry: dict[int, Logprob] = {}
            rank_of_sampled = None
            for r in range(min(n, k)):
                tid = int(top_ids[row, r])
                entry[tid] = Logprob(float(top_lps[row, r]), r + 1, self._decode(tid))
                if tid == token:
                    rank_of_sampled = r + 1
            if token not in entry:
                entry[token] = Logprob(sampled_lp[row], rank_of_sampled, self._decode(token))
            else:
                entry[token].logprob = sampled_lp[row]
            comp.logprobs.append(entry)
            comp.cumulative_logprob += sampled_lp[row]

    def _decode(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])
