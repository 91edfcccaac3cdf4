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
        args = (_randn(tokens, hidden, dtype=dtype, gen=gen), _randn(hidden, dtype=dtype, gen=gen), 1e-6)
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
    torch.testing.assert_close(ops.rms_norm(x, weight, eps).double(), expected, atol=1e-5, rtol=1e-5)


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
    rope_parameters = {"rope_type": "default", **(ROPE_SCALINGS[scaling_name] or {}), "rope_theta": base}
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
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)

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
        expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), -1)
        torch.testing.assert_close(out.double(), expected.view(11, -1), atol=1e-4, rtol=1e-5)


def test_rope_scaling_rejects_unknown_type():
    with pytest.raises(ValueError, match="rope_type"):
        ops.build_cos_sin_cache(16, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0}, torch.float32)


# --------------------------------------------------------------------------- paged KV cache


def _paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, pad_tokens=0):
    """A mixed batch over a NaN-poisoned cache with shuffled blocks; also returns contiguous K/V per sequence."""
    gen = _gen(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + 1
    # Unused table entries are out of range: the op must never read them.
    block_tables = torch.full((len(seq_lens), max_blocks), num_blocks + 100, dtype=torch.int32)
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    contexts = []
    for i, (seq_len, used) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids, block_ids = block_ids[:used], block_ids[used:]
        block_tables[i, :used] = torch.tensor(ids, dtype=torch.int32)
        kv = _randn(2, seq_len, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        for p in range(seq_len):
            kv_cache[:, ids[p // block_size], p % block_size] = kv[:, p]
        contexts.append(kv)
    num_tokens = sum(query_lens)
    q = _randn(num_tokens + pad_tokens, num_heads, head_dim, dtype=dtype, gen=gen)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (
        q,
        kv_cache,
        block_tables,
        torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc,
        max(query_lens),
        max(seq_lens),
        head_dim**-0.5,
    )
    return args, contexts


def _reference_attention(args, contexts):
    q, _, _, seq_lens, query_start_loc, _, _, scale = args
    num_heads, num_kv_heads = q.shape[1], contexts[0].shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, (k, v) in enumerate(contexts):
        start, end = query_start_loc[i].item(), query_start_loc[i + 1].item()
        k = k.double().repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.double().repeat_interleave(num_heads // num_kv_heads, dim=1)
        for j, t in enumerate(range(start, end)):
            pos = seq_lens[i].item() - (end - start) + j
            scores = torch.einsum("hd,lhd->hl", q[t].double(), k[: pos + 1]) * scale
            out[t] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[: pos + 1])
    return out


@FEW
@given(
    seqs=st.lists(
        st.tuples(st.sampled_from(["decode", "prefill", "chunk"]), st.integers(1, 40)), min_size=1, max_size=6
    ),
    block_size=st.sampled_from([1, 4, 16]),
    heads=st.sampled_from([(1, 1), (4, 2), (9, 3)]),
    head_dim=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_mixed_batch(seqs, block_size, heads, head_dim, seed):
    query_lens, seq_lens = [], []
    for kind, seq_len in seqs:
        if kind == "chunk" and seq_len < 3:
            kind = "decode"
        seq_lens.append(seq_len)
        query_lens.append({"decode": 1, "prefill": seq_len, "chunk": seq_len // 2}[kind])
    args, contexts = _paged_batch(query_lens, seq_lens, *heads, head_dim, block_size, torch.float32, seed)
    out = ops.paged_attention(*args)
    torch.testing.assert_close(out.double(), _reference_attention(args, contexts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_decode_batch(dtype):
    seq_lens = [1, 5, 16, 17, 33, 64]
    args, contexts = _paged_batch([1] * 6, seq_lens, 6, 2, 16, 16, dtype, seed=6)
    out = ops.paged_attention(*args)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), _reference_attention(args, contexts), atol=tol, rtol=tol)


def test_paged_attention_zero_for_padding_tokens():
    args, contexts = _paged_batch([1, 7, 1], [9, 7, 20], 4, 2, 8, 4, torch.float32, seed=7, pad_tokens=3)
    out = ops.paged_attention(*args)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))
    torch.testing.assert_close(out.double(), _reference_attention(args, contexts), atol=1e-5, rtol=1e-5)


def test_paged_attention_chunks_long_inputs(monkeypatch):
    """Tiny chunk budget: many decode chunks and one query row per prefill chunk."""
    monkeypatch.setattr(ops, "_ATTENTION_CHUNK_BYTES", 1)
    args, contexts = _paged_batch([1, 1, 12, 1, 5], [30, 3, 12, 50, 21], 4, 1, 8, 4, torch.float32, seed=8)
    out = ops.paged_attention(*args)
    torch.testing.assert_close(out.double(), _reference_attention(args, contexts), atol=1e-5, rtol=1e-5)


def test_paged_attention_matches_llama_eager():
    """The project's parity bar: transformers' fp32 eager attention (prefill exact on this CPU)."""
    query_lens, seq_lens = [1, 40, 9, 1], [70, 40, 33, 5]
    num_heads, num_kv_heads, head_dim = 9, 3, 16
    args, contexts = _paged_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, 16, torch.float32, 12)
    q, scale = args[0].mul_(3), args[-1]  # larger scores make rounding differences visible
    out = ops.paged_attention(*args)
    module = types.SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads, training=False)
    start = 0
    for n, seq_len, (k, v) in zip(query_lens, seq_lens, contexts):
        q_pos = torch.arange(seq_len - n, seq_len)
        mask = torch.zeros(n, seq_len).masked_fill(
            torch.arange(seq_len) > q_pos[:, None], torch.finfo(torch.float32).min
        )
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
        args, _ = _paged_batch(query_lens, seq_lens, 4, 2, 8, 4, dtype, seed=9)
        args[1].nan_to_num_(0.0)  # opcheck compares cache inputs, and NaN != NaN
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
        torch.library.opcheck(torch.ops.spmd.write_kv_cache, (key, value, kv_cache.clone(), slot_mapping))

        ops.write_kv_cache(key, value, kv_cache, slot_mapping)
        expected = torch.zeros_like(kv_cache)
        for t, slot in enumerate(slots):
            if slot >= 0:
                expected[0, slot // block_size, slot % block_size] = key[t]
                expected[1, slot // block_size, slot % block_size] = value[t]
        assert torch.equal(kv_cache, expected)


def test_ops_trace_under_torch_compile():
    """Write then attend, compiled in one graph: the fake impls and the mutation must trace."""
    args, contexts = _paged_batch([1, 4], [6, 4], 4, 2, 8, 4, torch.float32, seed=11)
    q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale = args
    # Re-write the last token of each sequence through the op (same values it already holds).
    slot_mapping, key, value = [], [], []
    for i, (k, v) in enumerate(contexts):
        pos = seq_lens[i].item() - 1
        slot_mapping.append(block_tables[i, pos // 4].item() * 4 + pos % 4)
        key.append(k[pos])
        value.append(v[pos])

    def step(key, value, q, kv_cache, slot_mapping):
        ops.write_kv_cache(key, value, kv_cache, slot_mapping)
        return ops.paged_attention(
            q, kv_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(torch.stack(key), torch.stack(value), q, kv_cache, torch.tensor(slot_mapping))
    torch.testing.assert_close(out.double(), _reference_attention(args, contexts), atol=1e-5, rtol=1e-5)
