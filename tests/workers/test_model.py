"""The tensor-parallel Llama-family model against transformers, at tp=1 and tp=2."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from workers.attention import AttentionMetadata
from workers.model_loader import load_model

BLOCK_SIZE = 4
PROMPT_LENS = (5, 9, 3)
NUM_DECODE_STEPS = 3
MODEL_VARIANTS = ("llama", "mistral", "qwen2", "tied", "llama3_rope", "llama_bias", "odd_vocab",
                  "qwen3", "qwen3_tied", "qwen3_moe", "qwen3_moe_top8", "mixtral")


def prompts_and_decodes(vocab_size: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    decodes = torch.randint(vocab_size, (NUM_DECODE_STEPS, len(PROMPT_LENS)), generator=gen).tolist()
    return prompts, decodes


def prefill_then_decode(prompts, decodes):
    """Schedule: all prompts in one step, then one token per sequence per step."""
    return [list(enumerate(prompts))] + [[(i, [t]) for i, t in enumerate(step)] for step in decodes]


def chunked_schedule(prompts, decodes):
    """Mixed steps: a prompt split over two steps while another sequence decodes."""
    p0, p1, p2 = prompts
    return [[(0, p0), (1, p1[:4])],
            [(0, [decodes[0][0]]), (1, p1[4:]), (2, p2)],
            [(0, [decodes[1][0]]), (1, [decodes[1][1]]), (2, [decodes[1][2]])]]


def run_schedule(model, schedule, num_seqs: int, max_len: int = 32):
    """Runs ``schedule`` (steps of ``(seq, new_tokens)``) through ``model`` with contiguous
    block tables; returns per step the last-token logits ``[seqs in step, vocab]`` and the
    contexts those logits belong to."""
    max_blocks = -(-max_len // BLOCK_SIZE)
    block_tables = torch.arange(num_seqs * max_blocks, dtype=torch.int32).view(num_seqs, max_blocks)
    kv_caches = [torch.zeros(model.kv_cache_shape(num_seqs * max_blocks, BLOCK_SIZE), dtype=model.dtype)
                 for _ in range(model.num_layers)]
    contexts: list[list[int]] = [[] for _ in range(num_seqs)]
    logits, seen = [], []
    for step in schedule:
        ids, positions, slots, query_lens = [], [], [], []
        for seq, tokens in step:
            pos = torch.arange(len(contexts[seq]), len(contexts[seq]) + len(tokens))
            contexts[seq] = contexts[seq] + list(tokens)
            ids += tokens
            positions.append(pos)
            slots.append(block_tables[seq, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
            query_lens.append(len(tokens))
        query_start_loc = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        seqs = [seq for seq, _ in step]
        meta = AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=torch.tensor([len(contexts[s]) for s in seqs], dtype=torch.int32),
            block_tables=block_tables[seqs],
            slot_mapping=torch.cat(slots),
            max_query_len=max(query_lens),
            max_seq_len=max(len(contexts[s]) for s in seqs))
        with torch.inference_mode():
            hidden = model(torch.tensor(ids, dtype=torch.int64), torch.cat(positions), meta, kv_caches)
            logits.append(model.compute_logits(hidden[query_start_loc[1:].long() - 1]))
        seen.append([list(contexts[s]) for s in seqs])
    return logits, seen


def hf_last_logits(hf_model, contexts) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([hf_model(torch.tensor([c])).logits[0, -1].float() for c in contexts])


@pytest.fixture(scope="module")
def checkpoints(tiny_dir):
    return {v: tiny_dir(v) for v in MODEL_VARIANTS}


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
@pytest.mark.parametrize("make_schedule", [prefill_then_decode, chunked_schedule],
                         ids=["prefill_decode", "chunked"])
def test_matches_transformers_tp1(checkpoints, variant, make_schedule):
    model = load_model(checkpoints[variant], "auto", torch.float32, 0, 1)
    hf_model = _hf(checkpoints[variant])
    prompts, decodes = prompts_and_decodes(hf_model.config.vocab_size)
    logits, contexts = run_schedule(model, make_schedule(prompts, decodes), len(prompts))
    for step_logits, step_contexts in zip(logits, contexts, strict=True):
        assert step_logits.dtype == torch.float32
        assert step_logits.shape == (len(step_contexts), hf_model.config.vocab_size)
        torch.testing.assert_close(step_logits, hf_last_logits(hf_model, step_contexts),
                                   atol=1e-4, rtol=1e-4)


def test_tied_lm_head_shares_embedding(checkpoints):
    model = load_model(checkpoints["tied"], "auto", torch.float32, 0, 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_rank_main(rank: int, world: int, port: int, paths: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for variant, path in paths.items():
            model = load_model(path, "safetensors", torch.float32, rank, world)
            prompts, decodes = prompts_and_decodes(model.config.vocab_size)
            results[variant], _ = run_schedule(model, prefill_then_decode(prompts, decodes), len(prompts))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # rank 0 hosts the store: nobody leaves while another still uses it
    finally:
        dist.destroy_process_group()


def test_tp2_matches_tp1(checkpoints, tmp_path):
    variants = ("llama", "qwen2", "llama3_rope", "llama_bias", "odd_vocab", "qwen3", "qwen3_moe",
                "mixtral")
    paths = {v: checkpoints[v] for v in variants}
    mp.spawn(_tp_rank_main, args=(2, _free_port(), paths, str(tmp_path)), nprocs=2, join=True)
    _assert_ranks_equal_tp1(paths, tmp_path, 2)


def _assert_ranks_equal_tp1(paths: dict, out_dir, world: int) -> None:
    """Every rank's logits (saved by ``_tp_rank_main``) are equal, and close to tp=1's."""
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
    for variant, path in paths.items():
        model = load_model(path, "safetensors", torch.float32, 0, 1)
        prompts, decodes = prompts_and_decodes(model.config.vocab_size)
        expected, _ = run_schedule(model, prefill_then_decode(prompts, decodes), len(prompts))
        for step, want in enumerate(expected):
            for rank in ranks[1:]:
                assert torch.equal(ranks[0][variant][step], rank[variant][step]), (variant, step)
            torch.testing.assert_close(ranks[0][variant][step], want, atol=1e-4, rtol=1e-4)


def test_tp4_replicates_kv_heads(checkpoints, tmp_path):
    """tp=4 over 2 key/value heads: each head lives on two ranks (as vLLM replicates them),
    and the logits equal tp=1's; the experts of Qwen3-MoE are sliced four ways."""
    variants = ("qwen3", "qwen3_moe")
    paths = {v: checkpoints[v] for v in variants}
    shard = load_model(paths["qwen3"], "safetensors", torch.float32, 3, 4)
    assert shard.num_kv_heads == 1 and shard.kv_cache_shape(8, 4)[3] == 1
    qkv = shard.model.layers[0].self_attn.qkv_proj
    assert qkv.kv_head_start == 1  # ranks 2 and 3 hold head 1
    mp.spawn(_tp_rank_main, args=(4, _free_port(), paths, str(tmp_path)), nprocs=4, join=True)
    _assert_ranks_equal_tp1(paths, tmp_path, 4)
