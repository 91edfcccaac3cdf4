"""spmd custom ops: opcheck, float64 references, and parity with transformers' Llama."""

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from workers import ops

FEW = settings(max_examples=12, deadline=None)

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_opcheck(dtype):
    gen = _gen()
    for tokens, hidden in [(1, 8), (5, 64), (7, 96)]:
        x = _randn(tokens, hidden, dtype=dtype, gen=gen)
        args = (x, _randn(hidden, dtype=dtype, gen=gen), 1e-6)
        torch.library.opcheck(torch.ops.spmd.rms_norm, args)
        residual = _randn(tokens, hidden, dtype=dtype, gen=gen)
        torch.library.opcheck(torch.ops.spmd.fused_add_rms_norm, (args[0], residual, *args[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama(dtype):
    gen = _gen(1)
    hidden, eps = 96, 1e-5
    hf = LlamaRMSNorm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(_randn(hidden, gen=gen))
    x = _randn(13, hidden, gen=gen).mul(3).to(dtype)
    residual = _randn(13, hidden, dtype=dtype, gen=gen)
    with torch.no_grad():
        assert torch.equal(ops.rms_norm(x, hf.weight, eps), hf(x))
        normed, new_residual = ops.fused_add_rms_norm(x, residual, hf.weight, eps)
        assert torch.equal(new_residual, residual + x)
        assert torch.equal(normed, hf(residual + x))


@FEW
@given(tokens=st.integers(1, 9), hidden=st.sampled_from([4, 32, 80]), seed=st.integers(0, 2**16))
def test_rms_norm_float64_reference(tokens, hidden, seed):
    gen = _gen(seed)
    x, weight, eps = _randn(tokens, hidden, gen=gen), _randn(hidden, gen=gen), 1e-6
    x64 = x.double()
    expected = weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    out = ops.rms_norm(x, weight, eps).double()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype):
    gen = _gen(2)
    for tokens, inter in [(1, 4), (6, 48)]:
        x = _randn(tokens, 2 * inter, dtype=dtype, gen=gen)
        torch.library.opcheck(torch.ops.spmd.silu_and_mul, (x,))
        gate, up = x.double()[:, :inter], x.double()[:, inter:]
        expected = gate / (1 + torch.exp(-gate)) * up
        out = ops.silu_and_mul(x)
        assert out.shape == (tokens, inter) and out.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- RoPE


def _hf_rope(scaling_name: str, head_dim: int, base: float):
    rope_parameters = {"rope_type": "default", **(ROPE_SCALINGS[scaling_name] or {})}
    rope_parameters["rope_theta"] = base
    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=2048,
        rope_parameters=rope_parameters,
    )
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling_name", list(ROPE_SCALINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_llama(scaling_name, dtype):
    gen = _gen(3)
    head_dim, num_heads, num_kv_heads, base = 64, 4, 2, 500000.0
    hf = _hf_rope(scaling_name, head_dim, base)
    cache = ops.build_cos_sin_cache(head_dim, 2048, base, ROPE_SCALINGS[scaling_name], dtype)
    positions = torch.randint(0, 2048, (17,), generator=gen)
    positions[:3] = torch.tensor([0, 1, 2047])
    # q and k as the model gets them: non-contiguous column slices of one qkv projection.
    qkv = _randn(17, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, gen=gen)
    q, k, _ = qkv.split([num_heads * head_dim, *[num_kv_heads * head_dim] * 2], dim=-1)

    q_out, k_out = ops.rotary_embedding(positions, q, k, cache, head_dim)

    cos, sin = hf(qkv[None], positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(
        q.view(1, 17, num_heads, head_dim).transpose(1, 2),
        k.view(1, 17, num_kv_heads, head_dim).transpose(1, 2),
        cos,
        sin,
    )
    assert torch.equal(q_out, hf_q.transpose(1, 2).reshape(17, -1))
    assert torch.equal(k_out, hf_k.transpose(1, 2).reshape(17, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_opcheck(dtype):
    gen = _gen(4)
    head_dim = 16
    cache = ops.build_cos_sin_cache(head_dim, 64, 10000.0, ROPE_SCALINGS["llama3"], dtype)
    for tokens, num_heads, num_kv_heads in [(1, 2, 1), (9, 6, 2)]:
        positions = torch.randint(0, 64, (tokens,), generator=gen)
        q = _randn(tokens, num_heads * head_dim, dtype=dtype, gen=gen)
        k = _randn(tokens, num_kv_heads * head_dim, dtype=dtype, gen=gen)
        torch.library.opcheck(torch.ops.spmd.rotary_embedding, (positions, q, k, cache, head_dim))


def test_rotary_float64_reference():
    gen = _gen(5)
    head_dim, base = 32, 10000.0
    cache = ops.build_cos_sin_cache(head_dim, 512, base, None, torch.float32)
    positions = torch.randint(0, 512, (11,), generator=gen)
    q, k = _randn(11, 3 * head_dim, gen=gen), _randn(11, head_dim, gen=gen)
    q_out, k_out = ops.rotary_embedding(positions, q, k, cache, head_dim)

    inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = positions.double()[:, None, None] * inv_freq  # [T, 1, hd/2]
    for x, out in [(q, q_out), (k, k_out)]:
        x1, x2 = x.double().view(11, -1, head_dim).chunk(2, -1)
        cos, sin = angle.cos(), angle.sin()
        expected = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        torch.testing.assert_close(out.double(), expected.view(11, -1), atol=1e-4, rtol=1e-5)


def test_rope_scaling_rejects_unknown_type():
    with pytest.raises(ValueError, match="rope_type"):
        ops.build_cos_sin_cache(16, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0}, torch.float32)


# --------------------------------------------------------------------------- paged KV cache


def _paged_batch(
    query_lens,
    seq_lens,
    *,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    block_size=4,
    dtype=torch.float32,
    seed=0,
    pad_tokens=0,
):
    """Op arguments for a batch over a garbage-filled cache with shuffled blocks, and each
    sequence's contiguous K/V ``[2, seq_len, nkv, hd]``."""
    gen = _gen(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    # Unused table entries are out of range: the op must never read them.
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), num_blocks + 100)
    cache_shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    # Unwritten slots hold large finite garbage (the worker zero-fills its cache, so never
    # NaN): any leak past the length mask shows up in the output.
    kv_cache = torch.full(cache_shape, 1e4, dtype=dtype)
    contexts = []
    for i, (seq_len, used) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_ids, free_blocks = free_blocks[:used], free_blocks[used:]
        block_tables[i, :used] = torch.tensor(block_ids)
        kv = _randn(2, seq_len, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        for pos in range(seq_len):
            kv_cache[:, block_ids[pos // block_size], pos % block_size] = kv[:, pos]
        contexts.append(kv)
    q = _randn(sum(query_lens) + pad_tokens, num_heads, head_dim, dtype=dtype, gen=gen)
    query_start_loc = torch.tensor([0, *query_lens]).cumsum(0)
    args = (
        q,
        kv_cache,
        block_tables.to(torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc.to(torch.int32),
        max(query_lens),
        max(seq_lens),
        head_dim**-0.5,
    )
    return args, contexts


def _assert_matches_reference(out, args, contexts, tol=1e-5):
    """Naive float64 attention per query over the contiguous K/V."""
    q, _, _, seq_lens, query_start_loc, _, _, scale = args
    group = q.shape[1] // contexts[0].shape[2]
    expected = torch.zeros(q.shape, dtype=torch.float64)
    for i, (k, v) in enumerate(contexts):
        start, end = query_start_loc[i].item(), query_start_loc[i + 1].item()
        k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
        for t in range(start, end):
            pos = seq_lens[i].item() - (end - t)
            scores = torch.einsum("hd,lhd->hl", q[t].double(), k[: pos + 1]) * scale
            expected[t] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[: pos + 1])
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@FEW
@given(
    seqs=st.lists(
        st.tuples(st.sampled_from(["decode", "prefill", "chunk"]), st.integers(1, 40)),
        min_size=1,
        max_size=6,
    ),
    block_size=st.sampled_from([1, 4, 16]),
    heads=st.sampled_from([(1, 1), (4, 2), (9, 3)]),
    head_dim=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_mixed_batch(seqs, block_size, heads, head_dim, seed):
    """Decode, whole-prompt prefill and chunked prefill (the last half of a context) together."""
    query_lens = [{"decode": 1, "prefill": n, "chunk": max(1, n // 2)}[kind] for kind, n in seqs]
    seq_lens = [n for _, n in seqs]
    num_heads, num_kv_heads = heads
    args, contexts = _paged_batch(
        query_lens,
        seq_lens,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        seed=seed,
    )
    _assert_matches_reference(ops.paged_attention(*args), args, contexts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_decode_batch(dtype):
    seq_lens = [1, 5, 16, 17, 33, 64]
    args, contexts = _paged_batch(
        [1] * 6, seq_lens, num_heads=6, head_dim=16, block_size=16, dtype=dtype, seed=6
    )
    out = ops.paged_attention(*args)
    assert out.dtype == dtype
    _assert_matches_reference(out, args, contexts, tol=1e-5 if dtype == torch.float32 else 3e-2)


def test_paged_attention_zero_for_padding_tokens():
    args, contexts = _paged_batch([1, 7, 1], [9, 7, 20], seed=7, pad_tokens=3)
    out = ops.paged_attention(*args)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))
    _assert_matches_reference(out, args, contexts)


def test_paged_attention_chunks_long_inputs(monkeypatch):
    """Tiny chunk budget: many decode chunks and one query row per prefill chunk."""
    monkeypatch.setattr(ops, "_ATTENTION_CHUNK_BYTES", 1)
    args, contexts = _paged_batch([1, 1, 12, 1, 5], [30, 3, 12, 50, 21], num_kv_heads=1, seed=8)
    _assert_matches_reference(ops.paged_attention(*args), args, contexts)


def test_paged_attention_matches_llama_eager():
    """The project's parity bar: transformers' fp32 eager attention (prefill is exact on x86)."""
    query_lens, seq_lens = [1, 40, 9, 1], [70, 40, 33, 5]
    num_heads, num_kv_heads, head_dim = 9, 3, 16
    args, contexts = _paged_batch(
        query_lens, seq_lens, num_heads=9, num_kv_heads=3, head_dim=16, block_size=16, seed=12
    )
    q, scale = args[0].mul_(3), args[-1]  # larger scores make rounding differences visible
    out = ops.paged_attention(*args)
    module = types.SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads, training=False)
    start = 0
    for n, seq_len, (k, v) in zip(query_lens, seq_lens, contexts):
        future = torch.arange(seq_len) > torch.arange(seq_len - n, seq_len)[:, None]
        mask = torch.zeros(n, seq_len).masked_fill(future, torch.finfo(torch.float32).min)
        expected, _ = eager_attention_forward(
            module,
            q[None, start : start + n].transpose(1, 2),
            k[None].transpose(1, 2),
            v[None].transpose(1, 2),
            mask[None, None],
            scale,
        )
        torch.testing.assert_close(out[start : start + n], expected[0], atol=1e-5, rtol=0)
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_opcheck(dtype):
    for query_lens, seq_lens in [([1, 1, 1], [3, 9, 17]), ([1, 6, 3, 1], [5, 6, 11, 2])]:
        args, _ = _paged_batch(query_lens, seq_lens, dtype=dtype, seed=9)
        args[1].nan_to_num_(0.0)  # opcheck compares the inputs before and after, and NaN != NaN
        torch.library.opcheck(torch.ops.spmd.paged_attention, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache(dtype):
    gen = _gen(10)
    num_blocks, block_size, num_kv_heads, head_dim = 5, 4, 2, 8
    for slots in [[3, 0, 19, 7], [-1, 12, -1, 5, 6]]:
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        key = _randn(len(slots), num_kv_heads, head_dim, dtype=dtype, gen=gen)
        value = _randn(len(slots), num_kv_heads, head_dim, dtype=dtype, gen=gen)
        kv_cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        opcheck_args = (key, value, kv_cache.clone(), slot_mapping)
        torch.library.opcheck(torch.ops.spmd.write_kv_cache, opcheck_args)

        ops.write_kv_cache(key, value, kv_cache, slot_mapping)
        expected = torch.zeros_like(kv_cache)
        for t, slot in enumerate(slots):
            if slot >= 0:
                expected[:, slot // block_size, slot % block_size] = torch.stack((key[t], value[t]))
        assert torch.equal(kv_cache, expected)


def test_fp8_write_and_attention_opcheck_and_roundtrip():
    """The FP8 ops' schemas and fakes, and the write stores x / scale with scale =
    amax / 448 per (token, kv head), at the slot the mapping names."""
    gen = _gen(12)
    num_blocks, block_size, num_kv_heads, head_dim = 5, 4, 2, 8
    slot_mapping = torch.tensor([3, -1, 12, 19, 6], dtype=torch.int64)
    key = _randn(5, num_kv_heads, head_dim, dtype=torch.float32, gen=gen) * 4
    value = _randn(5, num_kv_heads, head_dim, dtype=torch.float32, gen=gen)
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn)
    scales = torch.zeros(2, num_blocks, num_kv_heads, block_size)
    # Not test_schema: it compares float8 tensors with an op the CPU lacks for float8.
    utils = ("test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.spmd.write_kv_cache_fp8,
                          (key, value, cache.clone(), scales.clone(), slot_mapping), test_utils=utils)
    ops.write_kv_cache(key, value, cache, slot_mapping, scales)
    back = ops.fp8_dequantize_cache(cache, scales, torch.float32)
    for t, slot in enumerate(slot_mapping.tolist()):
        block, offset = divmod(slot, block_size)
        for i, x in enumerate((key, value)):
            if slot < 0:
                continue
            amax = x[t].abs().amax(-1)
            torch.testing.assert_close(scales[i, block, :, offset], amax / ops.FP8_MAX)
            assert ((back[i, block, offset] - x[t]).abs() <= amax[:, None] * 2**-4).all()
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slot_mapping[slot_mapping >= 0]] = True
    assert (back.view(2, -1, num_kv_heads, head_dim)[:, ~written] == 0).all()
    args, _ = _paged_batch([1, 3], [6, 9], block_size=block_size, seed=13)
    values, kv_scales = ops.fp8_quantize_cache(args[1].nan_to_num(0.0))
    torch.library.opcheck(torch.ops.spmd.paged_attention, (args[0], values, *args[2:], kv_scales),
                          test_utils=utils)


def test_ops_trace_under_torch_compile():
    """Write then attend in one compiled graph: the fake impls and the in-place write trace."""
    args, contexts = _paged_batch([1, 4], [6, 4], block_size=4, seed=11)
    q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale = args
    # The step's tokens (the last one of each sequence) reach the cache only through the op.
    last = [n - 1 for n in seq_lens.tolist()]
    slots = [block_tables[i, p // 4].item() * 4 + p % 4 for i, p in enumerate(last)]
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    kv_cache.view(2, -1, *kv_cache.shape[-2:])[:, slot_mapping] = float("nan")
    key, value = (torch.stack([kv[j, p] for kv, p in zip(contexts, last)]) for j in (0, 1))

    def step(key, value, q, kv_cache, slot_mapping):
        ops.write_kv_cache(key, value, kv_cache, slot_mapping)
        return ops.paged_attention(
            q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    _assert_matches_reference(compiled(key, value, q, kv_cache, slot_mapping), args, contexts)
