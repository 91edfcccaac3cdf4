"""Embeddings, engine side: the pooling a model asks for (its sentence-transformers
config, overridable), per-request ``PoolingParams``, and the outputs, shaped like
vLLM's ``EmbeddingRequestOutput``. Ranks return each prompt's pooled hidden state;
``dimensions`` (Matryoshka truncation) and normalization are applied here."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

import numpy as np

from serialization import PooledOutput

# sentence-transformers modules we run: the model, its pooling, L2 normalization.
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PoolingParams:
    """Per-request options of ``LLM.embed`` / ``AsyncEngine.embed`` (vLLM's names).

    ``dimensions``: keep the first n dimensions (Matryoshka models only);
    ``normalize``: L2-normalize (None: as the model's config says);
    ``truncate_prompt_tokens``: cut a longer prompt to this many tokens instead of
    refusing it (-1: to the model's maximum)."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self):
        if self.dimensions is not None and (type(self.dimensions) is not int or self.dimensions < 1):
            raise ValueError(f"dimensions: must be an int >= 1, got {self.dimensions!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize: must be a bool, got {self.normalize!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (type(t) is not int or (t < 1 and t != -1)):
            raise ValueError(f"truncate_prompt_tokens: must be -1 or an int >= 1, got {t!r}")


class EmbeddingOutput:
    """``embedding``: the vector as a list of floats (vLLM's shape), made on first use;
    ``vector``: the same as a float32 array (what the server encodes to base64)."""

    __slots__ = ("vector", "_list")

    def __init__(self, embedding):
        self.vector = np.asarray(embedding, dtype=np.float32)
        self._list = None

    @property
    def embedding(self) -> list[float]:
        if self._list is None:
            self._list = self.vector.tolist()
        return self._list

    @property
    def hidden_size(self) -> int:
        return len(self.vector)

    def __repr__(self) -> str:
        return f"EmbeddingOutput(hidden_size={self.hidden_size})"

    def __eq__(self, other) -> bool:
        return isinstance(other, EmbeddingOutput) and np.array_equal(self.vector, other.vector)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
    prompt: str | None = None
    metrics: dict = field(default_factory=dict)

    def base64(self) -> str:
        """The embedding as base64 of little-endian float32 (OpenAI's ``encoding_format``)."""
        return base64.b64encode(self.outputs.vector.astype("<f4", copy=False).tobytes()).decode()


@dataclass(frozen=True)
class PoolerInfo:
    """How a model's embeddings are made: pooling type, default normalization, the largest
    ``dimensions``, whether truncation is allowed, and sentence-transformers' max length."""

    pooling: str
    normalize: bool
    hidden_size: int
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    max_seq_length: int | None = None

    @classmethod
    def from_model(cls, folder: str | None, hf_config, is_encoder: bool, pooling: str | None,
                   normalize: bool | None) -> PoolerInfo:
        st = _sentence_transformers_config(folder) if folder else {}
        default_pooling = st.get("pooling") or ("mean" if is_encoder else "last")
        default_normalize = st.get("normalize", True)  # vLLM normalizes embeddings by default
        dims = getattr(hf_config, "matryoshka_dimensions", None)
        return cls(pooling=pooling or default_pooling,
                   normalize=default_normalize if normalize is None else normalize,
                   hidden_size=hf_config.hidden_size,
                   is_matryoshka=bool(getattr(hf_config, "is_matryoshka", False) or dims),
                   matryoshka_dimensions=tuple(dims) if dims else None,
                   max_seq_length=st.get("max_seq_length"))

    def check(self, params: PoolingParams) -> None:
        """``ValueError`` naming the field and the limit for options this model refuses."""
        d = params.dimensions
        if d is None:
            return
        if not self.is_matryoshka:
            raise ValueError(f"dimensions: this model does not support Matryoshka embeddings; "
                             f"its embeddings have {self.hidden_size} dimensions, leave "
                             "dimensions unset")
        if d > self.hidden_size:
            raise ValueError(f"dimensions: {d} exceeds the model's {self.hidden_size}")
        if self.matryoshka_dimensions and d not in self.matryoshka_dimensions:
            raise ValueError(f"dimensions: {d} is not one the model was trained for: "
                             f"{list(self.matryoshka_dimensions)}")

    def finish(self, pooled: np.ndarray, params: PoolingParams) -> np.ndarray:
        """Truncation (Matryoshka), then L2 normalization, in float32."""
        if params.dimensions is not None:
            pooled = pooled[: params.dimensions]
        normalize = self.normalize if params.normalize is None else params.normalize
        if normalize:
            pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        return pooled


def _sentence_transformers_config(folder: str) -> dict:
    """Pooling, normalization and max length from a sentence-transformers folder; {} if
    the folder is not one. A module we cannot run is a ``ValueError`` naming it."""
    path = os.path.join(folder, "modules.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        modules = json.load(f)
    out: dict = {"normalize": False}
    for module in modules:
        kind = module.get("type", "")
        if kind == _ST_TRANSFORMER:
            cfg = _read_json(os.path.join(folder, module.get("path", ""), "sentence_bert_config.json"))
            if cfg.get("max_seq_length"):
                out["max_seq_length"] = int(cfg["max_seq_length"])
        elif kind == _ST_POOLING:
            out["pooling"] = _pooling_mode(_read_json(os.path.join(folder, module["path"],
                                                                    "config.json")))
        elif kind == _ST_NORMALIZE:
            out["normalize"] = True
        else:
            raise ValueError(f"model: sentence-transformers module {kind!r} ({module.get('path')}) "
                             f"is not supported; supported: Transformer, Pooling, Normalize")
    return out


def _pooling_mode(cfg: dict) -> str:
    modes = {"cls": cfg.get("pooling_mode_cls_token"), "mean": cfg.get("pooling_mode_mean_tokens"),
             "last": cfg.get("pooling_mode_lasttoken")}
    chosen = [m for m, on in modes.items() if on]
    others = [k for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                          "pooling_mode_weightedmean_tokens") if cfg.get(k)]
    if others or len(chosen) != 1:
        raise ValueError(f"model: pooling {others or chosen} is not supported; one of "
                         "mean, cls or last-token pooling is")
    return chosen[0]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class PoolingOutputs:
    """The frontend's side of pooling requests: their params until their result comes."""

    def __init__(self, info: PoolerInfo):
        self.info = info
        self._pending: dict[str, tuple[list[int], PoolingParams, str | None, float]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int],
            params: PoolingParams, arrival_time: float) -> None:
        self._pending[request_id] = (prompt_ids, params, prompt, arrival_time)

    def abort(self, request_id: str) -> bool:
        return self._pending.pop(request_id, None) is not None

    def clear(self) -> None:
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)

    def process(self, pooled: list[PooledOutput]) -> list[EmbeddingRequestOutput]:
        out = []
        for p in pooled:
            entry = self._pending.pop(p.request_id, None)
            if entry is None:  # aborted meanwhile
                continue
            prompt_ids, params, prompt, arrival = entry
            vector = self.info.finish(np.frombuffer(p.embedding, dtype="<f4"), params)
            out.append(EmbeddingRequestOutput(p.request_id, prompt_ids,
                                              EmbeddingOutput(vector), True, prompt,
                                              dict(arrival_time=arrival)))
        return out
