"""Multi-LoRA offline: greedy parity with transformers + PEFT per adapter (tp=1, tp=2),
mixed batches equal each request alone, eviction and reload, the scheduler's slot
limit, prefix caching per adapter, the TPU path's zero recompiles, and bad adapters."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from lora_adapters import build_adapter, peft_greedy
from spmd import LLM, LoRARequest, SamplingParams
from spmd.lora import LoRAInUseError
from spmd.request import Request
from spmd.scheduler import Scheduler

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tiny_dir):
    return tiny_dir("llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Four adapters: all seven projections at r=8; rsLoRA; attention only at r=4; MLP only."""
    root = tmp_path_factory.mktemp("lora")
    return [build_adapter(root, base, seed=1),
            build_adapter(root, base, seed=2, use_rslora=True, lora_alpha=4),
            build_adapter(root, base, seed=3, r=4, target_modules=["q_proj", "v_proj", "o_proj"]),
            build_adapter(root, base, seed=4, target_modules=["gate_proj", "up_proj", "down_proj"])]


@pytest.fixture(scope="module")
def loras(adapters):
    return [LoRARequest(f"adapter{i}", i + 1, path) for i, path in enumerate(adapters)]


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 30))] for _ in range(10)]


@pytest.fixture(scope="module")
def expected(base, adapters, prompts):
    """transformers + PEFT greedy tokens of prompt 0 under the base and each adapter."""
    return [peft_greedy(base, a, prompts[0], MAX_TOKENS) for a in [None, *adapters]]


@pytest.fixture(scope="module")
def llm(base, ray_cluster):
    with LLM(base, enable_lora=True, max_loras=4, max_lora_rank=8, max_cpu_loras=8,
             skip_tokenizer_init=True, max_num_seqs=16, max_num_batched_tokens=128) as engine:
        yield engine


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_each_adapter_equals_transformers_peft(llm, loras, prompts, expected):
    for lora, want in zip([None, *loras], expected):
        (out,) = llm.generate([prompts[0]], GREEDY, lora_request=lora, use_tqdm=False)
        assert out.outputs[0].token_ids == want, lora
    assert len(set(map(tuple, expected))) == len(expected), "every adapter changes the output"


def test_a_mixed_batch_equals_each_request_alone(llm, loras, prompts):
    rng = random.Random(1)
    mix = [rng.choice([None, *loras]) for _ in prompts]
    together = _tokens(llm.generate(prompts, GREEDY, lora_request=mix, use_tqdm=False))
    alone = [_tokens(llm.generate([p], GREEDY, lora_request=m, use_tqdm=False))[0]
             for p, m in zip(prompts, mix)]
    assert together == alone
    assert len({m.lora_int_id if m else 0 for m in mix}) == 5  # base + 4 adapters in one batch


def test_the_ranks_agree_on_every_slot(llm, loras, prompts):
    llm.generate(prompts[:4], GREEDY, lora_request=loras, use_tqdm=False)
    registry = llm.engine.core.loras
    want = {lora_id: slot for slot, lora_id in enumerate(registry.slots) if lora_id is not None}
    assert llm.engine.call_all("lora_slots") == [want]
    assert sorted(want) == [1, 2, 3, 4]


def test_an_adapter_travels_only_in_its_new_request(llm, loras, prompts):
    from serialization import decode_rank_input

    sent = []
    transport = llm.engine.core.transport
    submit = transport.submit  # every step goes through it (two in flight)

    def spy(data, *args):
        sent.append(decode_rank_input(data))
        return submit(data, *args)

    transport.submit = spy
    try:
        llm.generate([prompts[1]], GREEDY, lora_request=loras[0], use_tqdm=False)
    finally:
        transport.submit = submit
    steps = [m for m in sent if m.scheduled_seq_ids]
    assert [r.lora_id for r in steps[0].new_requests] == [1]
    assert all(not m.new_requests and not m.lora_slots for m in steps[1:])


def test_prefix_cache_is_per_adapter(llm, loras):
    prompt = list(range(1, 50))  # three full blocks of 16
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    first = llm.generate([prompt], sp, lora_request=loras[0], use_tqdm=False)[0]
    again = llm.generate([prompt], sp, lora_request=loras[0], use_tqdm=False)[0]
    other = llm.generate([prompt], sp, lora_request=loras[1], use_tqdm=False)[0]
    plain = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == 48
    assert other.num_cached_tokens == 0 and plain.num_cached_tokens == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_eviction_and_reload_keep_results(base, loras, prompts, expected, ray_cluster, overlap):
    """Two device slots and two CPU slots for four adapters: every batch evicts (with
    overlapped rank steps, a slot is refilled while the step before still runs)."""
    with LLM(base, enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=2,
             skip_tokenizer_init=True, max_num_seqs=16, max_num_batched_tokens=128,
             overlap_rank_steps=overlap) as small:
        loads = []
        call_all = small.engine.core.loras._call_all

        def counting(method, *args):
            loads.append(method)
            return call_all(method, *args)

        small.engine.core.loras._call_all = counting
        for _ in range(2):
            for lora, want in zip([None, *loras], expected):
                (out,) = small.generate([prompts[0]], GREEDY, lora_request=lora, use_tqdm=False)
                assert out.outputs[0].token_ids == want
        mix = [loras[i % 4] for i in range(len(prompts))]
        together = _tokens(small.generate(prompts, GREEDY, lora_request=mix, use_tqdm=False))
        alone = [_tokens(small.generate([p], GREEDY, lora_request=m, use_tqdm=False))[0]
                 for p, m in zip(prompts, mix)]
        assert together == alone
        assert loads.count("unload_lora") >= 4 and loads.count("load_lora") >= 6
        assert len(small.engine.call_all("lora_slots")[0]) <= 2


def test_tp2_equals_transformers_peft(base, loras, prompts, expected, ray_cluster):
    with LLM(base, tensor_parallel_size=2, enable_lora=True, max_loras=4, max_lora_rank=8,
             skip_tokenizer_init=True) as tp2:
        outs = tp2.generate([prompts[0]] * 5, GREEDY, lora_request=[None, *loras],
                            use_tqdm=False)
        assert _tokens(outs) == expected
        assert tp2.engine.call_all("lora_slots")[0] == tp2.engine.call_all("lora_slots")[1]


def test_tpu_emulated_equals_the_default_path_and_never_recompiles(llm, base, loras, prompts,
                                                                    ray_cluster):
    with LLM(base, device="tpu-emulated", enable_lora=True, max_loras=4, max_lora_rank=8,
             skip_tokenizer_init=True, max_num_seqs=8, max_num_batched_tokens=64,
             max_model_len=96, compile_backend="eager") as tpu:
        before = tpu.engine.call_all("num_compiled_graphs")[0]
        assert before == tpu.engine.call_all("num_warmup_steps")[0]
        rng = random.Random(3)
        sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        for _ in range(100):
            batch = rng.sample(prompts, 3)
            mix = [rng.choice([None, *loras]) for _ in batch]
            assert (_tokens(tpu.generate(batch, sp, lora_request=mix, use_tqdm=False))
                    == _tokens(llm.generate(batch, sp, lora_request=mix, use_tqdm=False)))
        assert tpu.engine.call_all("num_compiled_graphs")[0] == before


def test_the_scheduler_runs_at_most_max_loras_adapters():
    sched = Scheduler(num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256,
                      max_model_len=128, max_loras=1)
    reqs = [Request(str(i), i, [1, 2, 3], max_tokens=2, lora_id=lora)
            for i, lora in enumerate([1, 2, 1, 0])]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    # adapter 2 would be a second adapter: it waits, and keeps its place in the queue
    assert [seq for seq, _ in out.scheduled] == [0, 2, 3]
    assert [r.seq_id for r in sched.waiting] == [1]
    sched.update_from_output(out, {0: 5, 2: 5, 3: 5})
    out = sched.schedule()
    assert [seq for seq, _ in out.scheduled] == [0, 2, 3]
    sched.update_from_output(out, {0: 5, 2: 5, 3: 5})  # all three finish (max_tokens=2)
    out = sched.schedule()
    assert [seq for seq, _ in out.scheduled] == [1]


# ---- bad input ------------------------------------------------------------------------


def _corrupt(src, tmp_path, name, edit):
    path = tmp_path / name
    shutil.copytree(src, path)
    edit(str(path))
    return str(path)


def _set_config(**changes):
    def edit(path):
        file = os.path.join(path, "adapter_config.json")
        with open(file) as f:
            cfg = json.load(f)
        cfg.update(changes)
        with open(file, "w") as f:
            json.dump(cfg, f)
    return edit


def test_bad_adapters_are_clear_errors_and_change_nothing(llm, adapters, base, tiny_dir,
                                                          tmp_path, prompts):
    wide = tiny_dir("llama", hidden_size=96)
    cases = {
        "rank": (build_adapter(tmp_path, base, seed=5, r=16), "rank 16 exceeds max_lora_rank=8"),
        "module": (build_adapter(tmp_path, base, seed=6, target_modules=["lm_head"]),
                   "not a LoRA weight of a supported module"),
        "shape": (build_adapter(tmp_path, wide, seed=7), r"layers\.0\.\w+: lora_[AB] has shape"),
        "missing": (str(tmp_path / "nowhere"), "is not a directory"),
        "no weights": (_corrupt(adapters[0], tmp_path, "noweights",
                                lambda p: os.remove(os.path.join(p, "adapter_model.safetensors"))),
                       "adapter_model.safetensors is missing"),
        "truncated": (_corrupt(adapters[0], tmp_path, "truncated", lambda p: os.truncate(
            os.path.join(p, "adapter_model.safetensors"), 200)), "cannot be read"),
        "config": (_corrupt(adapters[0], tmp_path, "badjson", lambda p: open(
            os.path.join(p, "adapter_config.json"), "w").write("{")), "not valid JSON"),
        "dora": (_corrupt(adapters[0], tmp_path, "dora", _set_config(use_dora=True)),
                 "DoRA is not supported"),
    }
    slots_before = llm.engine.call_all("lora_slots")
    loaded_before = llm.engine.call_all("loaded_loras")
    registered = llm.engine.list_loras()
    for i, (case, (path, message)) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            llm.generate([prompts[0]], GREEDY, lora_request=LoRARequest(case, 100 + i, path),
                         use_tqdm=False)
    assert llm.engine.list_loras() == registered
    assert llm.engine.call_all("lora_slots") == slots_before
    assert llm.engine.call_all("loaded_loras") == loaded_before
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate([prompts[0]], GREEDY, use_tqdm=False)  # still serving
    assert len(out.outputs[0].token_ids) == MAX_TOKENS


def test_a_request_for_an_unregistered_adapter_is_refused(llm, prompts):
    from serialization import EngineCoreRequest
    from spmd.input_processor import sampling_options

    req = EngineCoreRequest("ghost", prompts[0], sampling_options(GREEDY), lora_id=999)
    with pytest.raises(ValueError, match="adapter 999 is not loaded"):
        llm.engine.core.add_request(req)
    assert not llm.engine.has_unfinished_requests()


def test_conflicting_registrations_and_disabled_lora_are_refused(llm, loras, base, ray_cluster):
    with pytest.raises(ValueError, match="lora_int_id: 1 is already registered"):
        llm.engine.add_lora(LoRARequest("another", 1, loras[1].lora_path))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, loras[0].lora_path)
    with LLM(base, backend="inproc", skip_tokenizer_init=True) as plain:
        with pytest.raises(ValueError, match="LoRA is not enabled"):
            plain.generate([[1, 2, 3]], GREEDY, lora_request=loras[0], use_tqdm=False)


def test_removing_an_adapter_in_use_is_refused_and_breaks_nothing(llm, loras, prompts):
    engine = llm.engine
    engine.add_request("long", prompts[2], SamplingParams(temperature=0.0, max_tokens=40,
                                                          ignore_eos=True),
                       lora_request=loras[3])
    engine.step()
    with pytest.raises(LoRAInUseError, match="in use by 1 unfinished request"):
        engine.remove_lora(loras[3].lora_int_id)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert len(finished[0].outputs[0].token_ids) == 40
    assert engine.remove_lora(loras[3].lora_int_id)
    assert loras[3].lora_int_id not in [r.lora_int_id for r in engine.list_loras()]
    assert loras[3].lora_int_id not in engine.call_all("lora_slots")[0]
    assert not engine.remove_lora(loras[3].lora_int_id)


def test_qwen3_moe_adapters_on_attention_and_dense_layers(tiny_dir, tmp_path, ray_cluster):
    """On Qwen3-MoE an attention adapter at tp=2 equals transformers + PEFT. An adapter
    for an expert layer's MLP is a clear error before any rank loads it."""
    from safetensors.torch import load_file, save_file

    from workers.lora import check_adapter
    from workers.model_loader import load_hf_config

    base = tiny_dir("qwen3_moe")
    adapter = build_adapter(tmp_path, base, seed=5, target_modules=["q_proj", "k_proj", "v_proj",
                                                                    "o_proj"])
    prompt = [3, 14, 15, 92, 65, 35, 89, 79]
    want = [peft_greedy(base, a, prompt, MAX_TOKENS) for a in (None, adapter)]
    assert want[0] != want[1]
    with LLM(base, tensor_parallel_size=2, enable_lora=True, max_loras=1, max_lora_rank=8,
             skip_tokenizer_init=True) as tp2:
        outs = tp2.generate([prompt] * 2, GREEDY, use_tqdm=False,
                            lora_request=[None, LoRARequest("qwen3-moe", 1, adapter)])
        assert _tokens(outs) == want
    bad = os.path.join(tmp_path, "expert-lora")
    shutil.copytree(adapter, bad)
    weights = os.path.join(bad, "adapter_model.safetensors")
    # q_proj's A [r, 64] and B [128, r] have gate_proj's shapes (intermediate 128).
    tensors = load_file(weights)
    save_file({k.replace("layers.0.self_attn.q_proj", "layers.0.mlp.gate_proj"): v
               for k, v in tensors.items()}, weights)
    with pytest.raises(ValueError, match="layer 0's MLP is a mixture of experts"):
        check_adapter(bad, load_hf_config(base), 8)
