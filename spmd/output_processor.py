"""Turns the core's per-step token deltas into user-facing outputs: incremental
detokenization, stop strings, log-probs, and fan-in of ``n`` sequences into one
``RequestOutput``. It runs wherever the tokenizer is: in the frontend when
serving, in process for the offline ``LLM``."""

from __future__ import annotations

import time

from serialization import SeqDelta
from spmd.detokenizer import DetokState, detokenize_step
from spmd.outputs import CompletionOutput, Logprob, RequestOutput
from spmd.sampling_params import SamplingParams


class _Tracked:
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "completions", "detok",
                 "sent", "arrival_time", "first_token_time", "num_cached_tokens", "holdback",
                 "arrival_step")

    def __init__(self, request_id, prompt, prompt_ids, params: SamplingParams, tokenizer,
                 arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_ids
        self.params = params
        want_lp = params.logprobs is not None
        self.completions = [CompletionOutput(i, "", [], 0.0 if want_lp else None,
                                             [] if want_lp else None) for i in range(params.n)]
        detok = tokenizer is not None and params.detokenize
        self.detok = [DetokState(prompt_ids, params.stop, params.include_stop_str_in_output,
                                 params.skip_special_tokens) if detok else None
                      for _ in range(params.n)]
        self.sent = [(0, 0) for _ in range(params.n)]  # (characters, tokens) already streamed
        longest_stop = max(map(len, params.stop), default=1)
        self.holdback = 0 if params.include_stop_str_in_output else longest_stop - 1
        self.arrival_time = arrival_time
        self.first_token_time = None
        self.num_cached_tokens = 0
        self.arrival_step = None


class OutputProcessor:
    """``stream=True`` (online) reports every request that advanced as a *delta*: the
    text and tokens new since its last report (text within a stop string's length
    of the end is held back until the sequence finishes, as the stop may still cut
    it). ``stream=False`` (offline) reports finished requests only, whole, and
    detokenizes incrementally just the requests with stop strings."""

    def __init__(self, tokenizer, stream: bool = True):
        self.tokenizer = tokenizer
        self.stream = stream
        self._by_request: dict[str, _Tracked] = {}

    def has(self, request_id: str) -> bool:
        return request_id in self._by_request

    def __len__(self) -> int:
        return len(self._by_request)

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int],
            params: SamplingParams, arrival_time: float) -> None:
        if request_id in self._by_request:
            raise ValueError(f"request_id: {request_id!r} is already running")
        self._by_request[request_id] = _Tracked(request_id, prompt, prompt_ids, params,
                                                self.tokenizer, arrival_time)

    def clear(self) -> list[str]:
        """Forgets every request; their ids."""
        ids = list(self._by_request)
        self._by_request.clear()
        return ids

    def abort(self, request_id: str) -> bool:
        """Forgets a request; True if it was still running."""
        return self._by_request.pop(request_id, None) is not None

    def process(self, deltas: list[SeqDelta]) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Applies one step's deltas. Returns the outputs to report and the sequences
        ``(request id, index)`` that reached a stop string (to finish in the core)."""
        now = time.time()
        touched: dict[str, _Tracked] = {}
        detok_updates, detok_owner = [], []
        for d in deltas:
            tracked = self._by_request.get(d.request_id)
            if tracked is None:
                continue  # aborted, or finished by a stop string a step ago
            comp = tracked.completions[d.index]
            if comp.finish_reason is not None:
                continue
            touched[d.request_id] = tracked
            tracked.first_token_time = tracked.first_token_time or now
            tracked.num_cached_tokens = d.num_cached_tokens
            if d.arrival_step >= 0 and tracked.arrival_step is None:
                tracked.arrival_step = d.arrival_step
            comp.token_ids.extend(d.new_token_ids)
            if d.logprobs is not None and comp.logprobs is not None:
                self._add_logprobs(tracked, comp, d)
            if d.finish_reason is not None:
                comp.finish_reason = d.finish_reason
                comp.stop_reason = d.stop_token
            det = tracked.detok[d.index]
            if det is not None and (self.stream or det.stop):
                detok_updates.append((det, d.new_token_ids))
                detok_owner.append((tracked, d.index))
        stops = []
        if detok_updates:
            for (tracked, i), stop in zip(detok_owner, detokenize_step(self.tokenizer,
                                                                       detok_updates)):
                comp = tracked.completions[i]
                comp.text = tracked.detok[i].text
                if stop is not None and comp.finish_reason is None:
                    comp.finish_reason, comp.stop_reason = "stop", stop
                    stops.append((tracked.request_id, i))
        results = []
        for tracked in touched.values():
            finished = all(c.finish_reason is not None for c in tracked.completions)
            if finished:
                self._final_text(tracked)
                del self._by_request[tracked.request_id]
            if self.stream:
                results.append(self._delta_output(tracked, finished, now))
            elif finished:
                results.append(self._output(tracked, tracked.completions, finished, now))
        return results, stops

    def _delta_output(self, tracked: _Tracked, finished: bool, now: float) -> RequestOutput:
        """What is new in each completion since its last report (unchanged ones left out)."""
        parts = []
        for i, c in enumerate(tracked.completions):
            chars, tokens = tracked.sent[i]
            if chars < 0:
                continue  # its final delta went out already
            done = c.finish_reason is not None
            end = len(c.text) if done else max(chars, len(c.text) - tracked.holdback)
            if not done and end == chars and tokens == len(c.token_ids):
                continue
            tracked.sent[i] = (-1, -1) if done else (end, len(c.token_ids))
            parts.append(CompletionOutput(
                i, c.text[chars:end], c.token_ids[tokens:],
                c.cumulative_logprob, None if c.logprobs is None else c.logprobs[tokens:],
                c.finish_reason, c.stop_reason))
        return self._output(tracked, parts, finished, now)

    def _output(self, tracked: _Tracked, completions: list[CompletionOutput], finished: bool,
                now: float) -> RequestOutput:
        metrics = dict(arrival_time=tracked.arrival_time, first_token_time=tracked.first_token_time,
                       arrival_step=tracked.arrival_step)
        if finished:
            metrics["finished_time"] = now
        return RequestOutput(tracked.request_id, tracked.prompt, tracked.prompt_token_ids,
                             completions, finished, num_cached_tokens=tracked.num_cached_tokens,
                             metrics=metrics)

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

    def _add_logprobs(self, tracked: _Tracked, comp: CompletionOutput, d: SeqDelta) -> None:
        n = tracked.params.logprobs
        for token, lp in zip(d.new_token_ids, d.logprobs):
            entry: dict[int, Logprob] = {}
            rank_of_sampled = None
            for r, (tid, value) in enumerate(zip(lp.top_ids[:n], lp.top_logprobs[:n])):
                entry[tid] = Logprob(value, r + 1, self._decode(tid))
                if tid == token:
                    rank_of_sampled = r + 1
            if token not in entry:
                entry[token] = Logprob(lp.sampled, rank_of_sampled, self._decode(token))
            else:
                entry[token].logprob = lp.sampled
            comp.logprobs.append(entry)
            comp.cumulative_logprob += lp.sampled

    def _decode(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Folds a delta into ``acc`` (the merged pending delta, or the cumulative output)."""
    if acc is None:
        return delta
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        mine = by_index.get(c.index)
        if mine is None:
            acc.outputs.append(c)
            by_index[c.index] = c
            continue
        mine.text += c.text
        mine.token_ids.extend(c.token_ids)  # a delta's lists are its own
        if c.logprobs is not None:
            if mine.logprobs is None:
                mine.logprobs = []
            mine.logprobs.extend(c.logprobs)
        mine.cumulative_logprob = c.cumulative_logprob
        mine.finish_reason = c.finish_reason
        mine.stop_reason = c.stop_reason
    acc.outputs.sort(key=lambda c: c.index)
    acc.finished = delta.finished
    acc.num_cached_tokens = delta.num_cached_tokens
    acc.metrics = delta.metrics
    return acc
