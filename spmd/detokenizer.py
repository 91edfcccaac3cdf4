"""Incremental detokenization with stop strings, batched across requests so a
step costs a couple of tokenizer calls, not two per request."""

from __future__ import annotations

_PROMPT_CONTEXT = 5  # prompt tokens kept as left context: decoding a token alone loses its leading space


class DetokState:
    """One sequence's decoding window: ``tokens[prefix:read]`` is already in ``text``."""

    __slots__ = ("tokens", "prefix", "read", "text", "stop", "include_stop", "skip_special", "_max_stop")

    def __init__(self, prompt_token_ids: list[int], stop: list[str], include_stop: bool,
                 skip_special: bool):
        self.tokens = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.tokens)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special = skip_special
        self._max_stop = max((len(s) for s in stop), default=0)


def detokenize_step(tokenizer, updates: list[tuple[DetokState, list[int]]]) -> list[str | None]:
    """Appends new tokens to each state and decodes the new text. Returns, per
    update, the stop string that matched (text already truncated) or None."""
    for state, new_tokens in updates:
        state.tokens.extend(new_tokens)
    stops: list[str | None] = [None] * len(updates)
    for skip in (True, False):
        idx = [i for i, (s, _) in enumerate(updates) if s.skip_special == skip]
        if not idx:
            continue
        windows = [updates[i][0] for i in idx]
        texts = tokenizer.batch_decode(
            [s.tokens[s.prefix : s.read] for s in windows]
            + [s.tokens[s.prefix :] for s in windows],
            skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        n = len(windows)
        for j, i in enumerate(idx):
            state, before, after = windows[j], texts[j], texts[n + j]
            # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token.
            if len(after) > len(before) and not after.endswith("\ufffd"):
                old_len = len(state.text)
                state.text += after[len(before):]
                state.prefix, state.read = state.read, len(state.tokens)
                stops[i] = _find_stop(state, old_len)
    return stops


def _find_stop(state: DetokState, old_len: int) -> str | None:
    if not state.stop:
        return None
    start = max(0, old_len - state._max_stop + 1)
    best = None
    for s in state.stop:
        at = state.text.find(s, start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, s)
    if best is None:
        return None
    at, s = best
    state.text = state.text[: at + len(s)] if state.include_stop else state.text[:at]
    return s
