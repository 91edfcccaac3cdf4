"""Scheduler: budgets, chunked prefill, block growth, preemption, prefix caching,
aborts and stops, checked against a miniature rank side (``FakeRanks``)."""

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spmd.request import Request, RequestStatus
from spmd.scheduler import Scheduler, SchedulerOutput

VOCAB = 97


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context."""
    return (sum((i % 7 + 1) * t for i, t in enumerate(context)) + len(context)) % VOCAB


def reference_output(prompt, max_tokens, max_model_len, stop_token_ids=(), min_tokens=0):
    tokens, output = list(prompt), []
    while True:
        tok = next_token(tokens)
        tokens.append(tok)
        output.append(tok)
        if tok in stop_token_ids and len(output) >= min_tokens:
            return output, "stop"
        if len(output) >= max_tokens or len(tokens) >= max_model_len:
            return output, "length"


@dataclass
class RankSeq:
    token_ids: list[int]
    num_computed: int
    block_ids: list[int] = field(default_factory=list)
    running: bool = True


class FakeRanks:
    """The rank side in miniature. It learns requests only from the step deltas,
    writes (token, position) into a fake paged KV cache, reads the context back
    through the block table, and samples ``next_token`` from what it read: a wrong
    block table or prefix hit changes the outputs or trips an assert."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv = [[None] * block_size for _ in range(num_blocks)]
        self.seqs: dict[int, RankSeq] = {}
        self.sent_num_computed: dict[int, int] = {}  # as the last new/resumed message said

    def step(self, out: SchedulerOutput) -> dict[int, int]:
        for seq_id in out.finished_ids:
            del self.seqs[seq_id]
        for seq_id in out.preempted_ids:
            seq = self.seqs[seq_id]
            seq.num_computed, seq.block_ids, seq.running = 0, [], False
        # What the message says (the scheduler has advanced num_computed_tokens already).
        start = {seq_id: s for (seq_id, _), s in zip(out.scheduled, out.starts)}
        for req in out.new_requests:
            assert req.seq_id not in self.seqs
            assert 0 <= start[req.seq_id] < len(req.prompt_token_ids)
            self.seqs[req.seq_id] = RankSeq(list(req.prompt_token_ids), start[req.seq_id],
                                            list(req.block_ids))
            self.sent_num_computed[req.seq_id] = start[req.seq_id]
        for req in out.resumed:
            seq = self.seqs[req.seq_id]
            assert not seq.running
            seq.num_computed, seq.block_ids, seq.running = start[req.seq_id], list(req.block_ids), True
            self.sent_num_computed[req.seq_id] = start[req.seq_id]
        for seq_id, new_block_ids in out.block_updates:
            self.seqs[seq_id].block_ids.extend(new_block_ids)

        owners: dict[int, int] = {}
        for seq in self.seqs.values():
            for block_id in seq.block_ids:
                owners[block_id] = owners.get(block_id, 0) + 1
        sampled = {}
        size = self.block_size
        for seq_id, num_tokens in out.scheduled:
            seq = self.seqs[seq_id]
            assert seq.running and num_tokens >= 1
            end = seq.num_computed + num_tokens
            assert end <= len(seq.token_ids) and end <= len(seq.block_ids) * size
            for pos in range(seq.num_computed, end):
                block_id = seq.block_ids[pos // size]
                assert owners[block_id] == 1, f"write into shared block {block_id}"
                self.kv[block_id][pos % size] = (seq.token_ids[pos], pos)
            context = [self.kv[seq.block_ids[pos // size]][pos % size] for pos in range(end)]
            assert context == [(t, pos) for pos, t in enumerate(seq.token_ids[:end])]
            seq.num_computed = end
            if end == len(seq.token_ids):
                tok = next_token([t for t, _ in context])
                seq.token_ids.append(tok)
                sampled[seq_id] = tok
        return sampled


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                   max_model_len=64, **kw):
    sched = Scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, **kw)
    return sched, FakeRanks(num_blocks, block_size)


_next_seq_id = iter(range(10**9))


def make_request(prompt, max_tokens=8, request_id=None, **kw):
    seq_id = next(_next_seq_id)
    return Request(request_id or f"r{seq_id}", seq_id, prompt, max_tokens, **kw)


def step(sched, ranks):
    out = sched.schedule()
    sampled = ranks.step(out)
    return out, sched.update_from_output(out, sampled)


class Overlapped:
    """Drives the scheduler as the engine does with overlapped steps: up to ``depth``
    steps scheduled (and run by the fake ranks, which append their own tokens) before
    the oldest one's output is applied."""

    def __init__(self, sched, ranks, depth=2):
        self.sched, self.ranks, self.depth = sched, ranks, depth
        self.inflight: list[tuple[SchedulerOutput, dict]] = []

    def step(self, on_step=None) -> list[Request]:
        while len(self.inflight) < self.depth:
            out = self.sched.schedule()
            if not (out.scheduled or out.finished_ids or out.preempted_ids):
                break
            if on_step:
                on_step(out)
            self.inflight.append((out, self.ranks.step(out)))
        if not self.inflight:
            return []
        out, sampled = self.inflight.pop(0)
        return self.sched.update_from_output(out, sampled)

    def run_to_completion(self, on_step=None, max_steps=5000) -> list[Request]:
        finished = []
        for _ in range(max_steps):
            if not (self.sched.has_unfinished_requests() or self.inflight):
                break
            finished += [r for r in self.step(on_step) if r.status.is_finished]
        else:
            raise AssertionError("requests did not finish")
        self.step()  # delivers the last finished_ids
        assert not self.inflight and not self.ranks.seqs
        return finished


def run_to_completion(sched, ranks, on_step=None, max_steps=5000):
    finished = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out, updated = step(sched, ranks)
        if on_step:
            on_step(out)
        finished += [r for r in updated if r.status.is_finished]
    else:
        raise AssertionError("requests did not finish")
    step(sched, ranks)  # delivers the last finished_ids
    assert not ranks.seqs
    return finished


def prompt_of(n, seed=0):
    return [(seed * 31 + 7 * i) % VOCAB for i in range(n)]


def assert_invariants(sched):
    """Ref counts match the block tables; a block in two tables is a shared, cached prefix block."""
    pool = sched.block_pool
    alive = list(sched.requests.values())
    holders: dict[int, list[tuple[Request, int]]] = {}
    for req in alive:
        assert len(set(req.block_ids)) == len(req.block_ids)
        if req.status is not RequestStatus.RUNNING:
            assert not req.block_ids and req.num_computed_tokens == 0
        assert len(req.block_ids) * sched.block_size >= req.num_computed_tokens
        for i, block_id in enumerate(req.block_ids):
            holders.setdefault(block_id, []).append((req, i))
    for block in pool.blocks:
        assert block.ref_cnt == len(holders.get(block.block_id, []))
    assert pool.num_free_blocks == sum(b.ref_cnt == 0 for b in pool.blocks)
    for block_id, users in holders.items():
        if len(users) > 1:
            block_hash = pool.blocks[block_id].block_hash
            assert block_hash is not None
            for req, i in users:
                assert i < req.num_cached_blocks and req.block_hashes[i] == block_hash


# ---- budgets and chunked prefill ---------------------------------------------------------


def test_token_budget_and_max_num_seqs_are_respected():
    sched, ranks = make_scheduler(num_blocks=256, max_num_seqs=3, max_num_batched_tokens=10,
                                  max_model_len=128)
    for i in range(7):
        sched.add_request(make_request(prompt_of(5 + 3 * i, i), max_tokens=6))

    def check(out):
        assert out.total_num_scheduled_tokens == sum(n for _, n in out.scheduled) <= 10
        assert len(out.scheduled) <= 3 and sched.num_running <= 3

    finished = run_to_completion(sched, ranks, check)
    assert len(finished) == 7


def test_chunked_prefill_samples_only_after_the_last_chunk():
    sched, ranks = make_scheduler(max_num_batched_tokens=16, max_model_len=64)
    req = make_request(prompt_of(50), max_tokens=3)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out, updated = step(sched, ranks)
        chunks.append(out.scheduled[0][1])
        assert updated == [] and req.output_token_ids == []
    out, updated = step(sched, ranks)
    assert chunks + [out.scheduled[0][1]] == [16, 16, 16, 2]
    assert updated == [req] and len(req.output_token_ids) == 1
    assert req.num_computed_tokens == 50 and req.num_tokens == 51
    # Only the first step introduces the request; later chunks append blocks.
    assert sched.num_running == 1


def test_running_requests_go_first_and_a_new_prompt_gets_the_remaining_budget():
    sched, ranks = make_scheduler(max_num_batched_tokens=8, max_model_len=64)
    a = make_request(prompt_of(6), max_tokens=10)
    sched.add_request(a)
    step(sched, ranks)
    b = make_request(prompt_of(20, 1), max_tokens=2)
    sched.add_request(b)
    out, _ = step(sched, ranks)
    assert out.scheduled == [(a.seq_id, 1), (b.seq_id, 7)]
    assert out.new_requests == [b]
    out, _ = step(sched, ranks)
    assert out.scheduled == [(a.seq_id, 1), (b.seq_id, 7)] and out.new_requests == []


def test_long_prefill_token_threshold_caps_prefill_chunks():
    sched, ranks = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=5)
    req = make_request(prompt_of(12), max_tokens=2)
    sched.add_request(req)
    sizes = [step(sched, ranks)[0].scheduled[0][1] for _ in range(4)]
    assert sizes == [5, 5, 2, 1]


# ---- blocks ------------------------------------------------------------------------------


def test_decode_allocates_a_block_exactly_at_block_boundaries():
    sched, ranks = make_scheduler(block_size=4, max_model_len=64)
    req = make_request(prompt_of(6), max_tokens=10)
    sched.add_request(req)
    out, _ = step(sched, ranks)
    assert out.new_requests == [req] and len(req.block_ids) == 2 and out.block_updates == []
    first_blocks = list(req.block_ids)
    updates = []
    for _ in range(8):  # computes positions 6..13
        out, _ = step(sched, ranks)
        updates.append(out.block_updates)
    # Position 8 is computed at the third decode step, position 12 at the seventh.
    assert [bool(u) for u in updates] == [False, False, True, False, False, False, True, False]
    assert updates[2] == [(req.seq_id, [req.block_ids[2]])]
    assert updates[6] == [(req.seq_id, [req.block_ids[3]])]
    assert req.block_ids[:2] == first_blocks and len(req.block_ids) == 4


# ---- preemption --------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_recomputes_and_yields_the_same_outputs(enable_prefix_caching):
    prompts = [prompt_of(6 + (5 * i) % 11, i) for i in range(8)]

    def run(num_blocks):
        sched, ranks = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=8,
                                      max_num_batched_tokens=24, max_model_len=40,
                                      enable_prefix_caching=enable_prefix_caching)
        reqs = [make_request(p, max_tokens=20, request_id=f"q{i}") for i, p in enumerate(prompts)]
        for r in reqs:
            sched.add_request(r)
        preempted, resumed = set(), set()

        def on_step(out):
            preempted.update(out.preempted_ids)
            resumed.update(r.seq_id for r in out.resumed)
            assert_invariants(sched)

        run_to_completion(sched, ranks, on_step)
        assert sched.block_pool.num_free_blocks == num_blocks
        return {r.request_id: r.output_token_ids for r in reqs}, preempted, resumed

    plenty, preempted, _ = run(num_blocks=256)
    assert not preempted
    scarce, preempted, resumed = run(num_blocks=12)
    assert preempted and resumed == preempted
    assert scarce == plenty
    for i, p in enumerate(prompts):
        assert plenty[f"q{i}"] == reference_output(p, 20, 40)[0]


def test_preempted_request_resumes_with_full_block_table_and_its_tokens():
    # Two requests that each need 4 blocks eventually, with 6 blocks in all.
    sched, ranks = make_scheduler(num_blocks=6, block_size=4, max_model_len=16,
                                  enable_prefix_caching=False)
    a = make_request(prompt_of(4, 1), max_tokens=12)
    b = make_request(prompt_of(4, 2), max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    while True:
        out, _ = step(sched, ranks)
        if out.preempted_ids:
            break
    assert out.preempted_ids == [b.seq_id] and b.status is RequestStatus.PREEMPTED
    assert b.block_ids == [] and b.num_computed_tokens == 0 and sched.waiting[0] is b
    tokens_before = list(b.all_token_ids)
    while True:
        out, _ = step(sched, ranks)
        if out.resumed:
            break
    assert out.resumed == [b] and b.status is RequestStatus.RUNNING
    assert b.all_token_ids[:len(tokens_before)] == tokens_before
    num_tokens = dict(out.scheduled)[b.seq_id]
    assert num_tokens == len(tokens_before)  # prompt + outputs recomputed in one chunk
    assert len(b.block_ids) == -(-num_tokens // 4)
    run_to_completion(sched, ranks)
    assert a.output_token_ids == reference_output(a.prompt_token_ids, 12, 16)[0]
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 12, 16)[0]


def test_a_request_that_cannot_grow_preempts_itself_when_it_is_last():
    sched, ranks = make_scheduler(num_blocks=4, block_size=4, max_model_len=16,
                                  enable_prefix_caching=False)
    a = make_request(prompt_of(7, 1), max_tokens=9)
    b = make_request(prompt_of(7, 2), max_tokens=9)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, ranks)
    assert [s for s, _ in out.scheduled] == [a.seq_id, b.seq_id] and sched.block_pool.num_free_blocks == 0
    out, _ = step(sched, ranks)  # position 7 still fits in two blocks
    assert not out.preempted_ids and len(out.scheduled) == 2
    out, _ = step(sched, ranks)  # both need a third block: b is preempted, a grows
    assert out.preempted_ids == [b.seq_id] and out.scheduled == [(a.seq_id, 1)]
    run_to_completion(sched, ranks)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 9, 16)[0]


def test_a_waiting_request_waits_for_blocks():
    sched, ranks = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    a = make_request(prompt_of(12, 1), max_tokens=4)
    b = make_request(prompt_of(6, 2), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, ranks)
    assert out.scheduled == [(a.seq_id, 12)] and sched.num_waiting == 1 and not out.preempted_ids
    run_to_completion(sched, ranks)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2, 16)[0]


def test_watermark_keeps_blocks_free_while_others_run():
    # 10 blocks, watermark 0.2 = 2 blocks kept free when admitting beside a running request.
    sched, ranks = make_scheduler(num_blocks=10, block_size=4, max_model_len=32,
                                  max_num_batched_tokens=64, enable_prefix_caching=False,
                                  kv_watermark=0.2)
    a = make_request(prompt_of(16, 1), max_tokens=2)  # 4 blocks, admitted alone: 6 free
    b = make_request(prompt_of(12, 2), max_tokens=2)  # 3 blocks + 2 kept free <= 6: admitted
    c = make_request(prompt_of(8, 3), max_tokens=2)  # 2 blocks + 2 kept free > 3: waits
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = step(sched, ranks)
    assert [s for s, _ in out.scheduled] == [a.seq_id, b.seq_id]
    assert sched.block_pool.num_free_blocks == 3 and sched.num_waiting == 1
    run_to_completion(sched, ranks)
    assert c.output_token_ids == reference_output(c.prompt_token_ids, 2, 32)[0]
    # Alone, a request is admitted whenever it fits, watermark or not.
    sched, ranks = make_scheduler(num_blocks=8, block_size=4, max_model_len=32,
                                  enable_prefix_caching=False, kv_watermark=0.5)
    d = make_request(prompt_of(28, 4), max_tokens=4)
    sched.add_request(d)
    out, _ = step(sched, ranks)
    assert out.scheduled == [(d.seq_id, 28)]


def test_full_reserve_admits_only_what_can_run_to_its_end():
    # Each request needs 2 blocks for its prompt and 4 by its last token; 12 blocks hold
    # three of them to the end. Without the reserve all six start and growth preempts.
    prompts = [prompt_of(8, i) for i in range(6)]

    def run(reserve):
        sched, ranks = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=8,
                                      max_num_batched_tokens=64, max_model_len=32,
                                      enable_prefix_caching=False,
                                      kv_watermark=0.0, kv_reserve=reserve)
        reqs = [make_request(p, max_tokens=8) for p in prompts]
        for r in reqs:
            sched.add_request(r)
        seen = {"preempted": 0, "max_running": 0}

        def on_step(out):
            seen["preempted"] += len(out.preempted_ids)
            seen["max_running"] = max(seen["max_running"], sched.num_running)
            assert_invariants(sched)

        run_to_completion(sched, ranks, on_step)
        return [r.output_token_ids for r in reqs], seen

    optimistic, seen0 = run(0.0)
    reserved, seen1 = run(1.0)
    assert seen0["preempted"] > 0 and seen0["max_running"] == 6
    assert seen1["preempted"] == 0 and seen1["max_running"] == 3
    assert reserved == optimistic == [reference_output(p, 8, 32)[0] for p in prompts]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12)), min_size=1,
                      max_size=12),
       num_blocks=st.integers(8, 16), budget=st.integers(4, 24),
       enable_prefix_caching=st.booleans())
def test_full_reserve_never_preempts(specs, num_blocks, budget, enable_prefix_caching):
    sched, ranks = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=6,
                                  max_num_batched_tokens=budget, max_model_len=32,
                                  enable_prefix_caching=enable_prefix_caching, kv_reserve=1.0,
                                  kv_watermark=0.1)
    reqs = [make_request((prompt_of(8, 0) + prompt_of(20, i))[:n], max_tokens=m)
            for i, (n, m) in enumerate(specs)]
    for r in reqs:
        sched.add_request(r)

    def on_step(out):
        assert not out.preempted_ids
        assert_invariants(sched)

    run_to_completion(sched, ranks, on_step)
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, r.max_tokens, 32)[0]


def test_admission_options_are_checked():
    from spmd.config import EngineConfig

    for kw, match in ((dict(kv_watermark=1.0), r"kv_watermark: must be in \[0, 1\), got 1.0"),
                      (dict(kv_reserve=-0.1), r"kv_reserve: must be in \[0, 1\], got -0.1"),
                      (dict(kv_reserve="all"), "kv_reserve: .* got 'all'")):
        with pytest.raises(ValueError, match=match):
            EngineConfig.from_kwargs(**kw)
    config = EngineConfig.from_kwargs(kv_watermark=0.05, kv_reserve=1)
    assert (config.scheduler.kv_watermark, config.scheduler.kv_reserve) == (0.05, 1)


# ---- prefix caching ----------------------------------------------------------------------


def test_prefix_cache_hit_shares_blocks_and_skips_computed_tokens():
    sched, ranks = make_scheduler(block_size=4, max_model_len=64)
    shared = prompt_of(8, 3)
    a = make_request(shared + [1, 2, 3], max_tokens=20)
    sched.add_request(a)
    step(sched, ranks)
    b = make_request(shared + [4, 5], max_tokens=2)
    sched.add_request(b)
    out, _ = step(sched, ranks)
    assert out.new_requests == [b] and ranks.sent_num_computed[b.seq_id] == 8
    assert b.num_cached_tokens == 8
    assert dict(out.scheduled)[b.seq_id] == 2
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    pool = sched.block_pool
    assert [pool.blocks[i].ref_cnt for i in b.block_ids] == [2, 2, 1]
    assert_invariants(sched)
    run_to_completion(sched, ranks)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, 2, 64)[0]
    assert all(block.ref_cnt == 0 for block in pool.blocks) and pool.num_free_blocks == 64


def test_a_fully_cached_prompt_still_computes_its_last_block():
    sched, ranks = make_scheduler(block_size=4, max_model_len=64)
    prompt = prompt_of(8, 4)
    a = make_request(prompt, max_tokens=1)
    sched.add_request(a)
    run_to_completion(sched, ranks)
    b = make_request(prompt, max_tokens=3)
    sched.add_request(b)
    out, _ = step(sched, ranks)
    assert ranks.sent_num_computed[b.seq_id] == 4 and dict(out.scheduled)[b.seq_id] == 4
    run_to_completion(sched, ranks)
    assert b.output_token_ids == reference_output(prompt, 3, 64)[0]


def test_generated_tokens_are_cached_and_preempted_requests_hit_their_own_blocks():
    sched, ranks = make_scheduler(num_blocks=8, block_size=4, max_model_len=32)
    a = make_request(prompt_of(5, 5), max_tokens=8)
    sched.add_request(a)
    run_to_completion(sched, ranks)  # 5 prompt + 8 output tokens: 3 full blocks computed
    c = make_request(prompt_of(12, 6), max_tokens=9)  # grows to 5 blocks
    follow_up = a.all_token_ids + [9, 9]  # a second turn of a's conversation
    b = make_request(follow_up, max_tokens=6)  # grows to 5 blocks, 3 of them a's
    sched.add_request(c)
    sched.add_request(b)
    out, _ = step(sched, ranks)
    assert ranks.sent_num_computed[b.seq_id] == 12 and dict(out.scheduled)[b.seq_id] == 3
    shared = b.block_ids[:3]
    while not out.preempted_ids:
        out, _ = step(sched, ranks)
    assert out.preempted_ids == [b.seq_id]
    while not out.resumed:
        out, _ = step(sched, ranks)
    # Its prefix blocks were freed last and evicted last: it resumes from them.
    assert out.resumed == [b] and ranks.sent_num_computed[b.seq_id] == 12
    assert b.block_ids[:3] == shared
    run_to_completion(sched, ranks)
    assert b.output_token_ids == reference_output(follow_up, 6, 32)[0]
    assert c.output_token_ids == reference_output(c.prompt_token_ids, 9, 32)[0]


def test_cached_blocks_are_evicted_when_their_ids_are_reused():
    sched, ranks = make_scheduler(num_blocks=8, block_size=4, max_model_len=32)
    prompt = prompt_of(9, 6)
    a = make_request(prompt, max_tokens=1)
    sched.add_request(a)
    run_to_completion(sched, ranks)
    assert sched.block_pool.num_free_blocks == 8  # cached blocks count as free
    big = make_request(prompt_of(31, 7), max_tokens=1)  # needs all 8 blocks
    sched.add_request(big)
    run_to_completion(sched, ranks)
    c = make_request(prompt, max_tokens=1)
    sched.add_request(c)
    step(sched, ranks)
    assert ranks.sent_num_computed[c.seq_id] == 0


def test_reset_prefix_cache_and_disabled_caching_give_no_hits():
    for enable in (True, False):
        sched, ranks = make_scheduler(block_size=4, enable_prefix_caching=enable)
        prompt = prompt_of(9, 8)
        sched.add_request(make_request(prompt, max_tokens=1))
        run_to_completion(sched, ranks)
        if enable:
            sched.reset_prefix_cache()
        c = make_request(prompt, max_tokens=1)
        sched.add_request(c)
        step(sched, ranks)
        assert ranks.sent_num_computed[c.seq_id] == 0 == c.num_cached_tokens


# ---- aborts and stops --------------------------------------------------------------------


def test_abort_frees_blocks_and_reports_the_seq_id_once():
    sched, ranks = make_scheduler(num_blocks=16)
    req = make_request(prompt_of(10), max_tokens=20)
    sched.add_request(req)
    for _ in range(3):
        step(sched, ranks)
    assert sched.block_pool.num_free_blocks < 16
    sched.abort_request(req.request_id)
    assert req.status is RequestStatus.FINISHED_ABORTED and req.finish_reason == "abort"
    assert sched.block_pool.num_free_blocks == 16 and not sched.has_unfinished_requests()
    assert sched.get_request(req.request_id) is None
    out, _ = step(sched, ranks)
    assert out.finished_ids == [req.seq_id] and out.scheduled == []
    assert not ranks.seqs
    assert step(sched, ranks)[0].finished_ids == []
    sched.abort_request(req.request_id)  # unknown ids are ignored


def test_aborting_a_never_scheduled_request_tells_the_ranks_nothing():
    sched, ranks = make_scheduler(max_num_seqs=1)
    a = make_request(prompt_of(4), max_tokens=5)
    b = make_request(prompt_of(4, 1), max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, ranks)
    sched.abort_request(b.request_id)
    out, _ = step(sched, ranks)
    assert out.finished_ids == [] and sched.num_waiting == 0


def test_abort_during_a_step_is_applied_after_it():
    sched, ranks = make_scheduler(num_blocks=16)
    req = make_request(prompt_of(5), max_tokens=20)
    sched.add_request(req)
    out = sched.schedule()
    sampled = ranks.step(out)
    sched.abort_request(req.request_id)
    assert sched.update_from_output(out, sampled) == []
    assert req.output_token_ids == [] and sched.block_pool.num_free_blocks == 16
    out, _ = step(sched, ranks)
    assert out.finished_ids == [req.seq_id] and not ranks.seqs


def test_stop_token_after_min_tokens():
    prompt = prompt_of(6, 9)
    expected, _ = reference_output(prompt, 30, 64)
    stop = expected[3]
    first = expected.index(stop)
    for min_tokens in (0, first + 2):
        sched, ranks = make_scheduler()
        req = make_request(prompt, max_tokens=30, stop_token_ids={stop}, min_tokens=min_tokens)
        sched.add_request(req)
        finished = run_to_completion(sched, ranks)
        assert finished == [req]
        want = reference_output(prompt, 30, 64, {stop}, min_tokens)
        assert (req.output_token_ids, req.finish_reason) == want
        assert req.output_token_ids[-1] == stop or req.finish_reason == "length"
        if min_tokens == 0:
            assert len(req.output_token_ids) == first + 1
        else:
            assert len(req.output_token_ids) > first + 1


def test_max_tokens_and_max_model_len_finish_with_length():
    sched, ranks = make_scheduler(max_model_len=32)
    a = make_request(prompt_of(5), max_tokens=4)
    b = make_request(prompt_of(28, 1), max_tokens=100)  # capped to 4 by max_model_len
    sched.add_request(a)
    sched.add_request(b)
    run_to_completion(sched, ranks)
    assert len(a.output_token_ids) == 4 and a.status is RequestStatus.FINISHED_LENGTH
    assert b.num_tokens == 32 and b.finish_reason == "length"


def test_prompt_of_max_model_len_is_rejected():
    sched, _ = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError, match=r"prompt length 32.*max_model_len=32"):
        sched.add_request(make_request(prompt_of(32)))
    sched.add_request(make_request(prompt_of(31)))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request(prompt_of(3), request_id="dup"))
        sched.add_request(make_request(prompt_of(3), request_id="dup"))


def test_finish_request_for_a_stop_string():
    sched, ranks = make_scheduler(num_blocks=16)
    req = make_request(prompt_of(5), max_tokens=20)
    sched.add_request(req)
    step(sched, ranks)
    sched.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
    assert req.finish_reason == "stop" and sched.block_pool.num_free_blocks == 16
    assert step(sched, ranks)[0].finished_ids == [req.seq_id]


def test_kv_too_small_for_max_model_len_is_a_config_error():
    with pytest.raises(ValueError, match="max_model_len=64"):
        Scheduler(num_blocks=3, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                  max_model_len=64)


# ---- property: no leaks, no unshared double use --------------------------------------------

op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 31), st.integers(4, 24), st.integers(0, 2),
              st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 40)),
    st.tuples(st.just("stop_string"), st.integers(0, 40)),
    st.tuples(st.just("step"), st.integers(1, 6)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=5, max_size=40), num_blocks=st.integers(8, 12),
       budget=st.integers(1, 24), enable_prefix_caching=st.booleans(), depth=st.sampled_from([1, 2]))
def test_random_workloads_never_leak_or_double_use_blocks(ops, num_blocks, budget,
                                                          enable_prefix_caching, depth):
    """Depth 2: steps overlap (aborts and stop strings land while a step is in flight)."""
    sched, ranks = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=6,
                                  max_num_batched_tokens=budget, max_model_len=32,
                                  enable_prefix_caching=enable_prefix_caching)
    driver = Overlapped(sched, ranks, depth)
    added: list[Request] = []
    completed: list[Request] = []

    def run_steps(n):
        for _ in range(n):
            updated = driver.step()
            completed.extend(r for r in updated if r.status.is_finished)
            assert_invariants(sched)

    for kind, *args in ops:
        if kind == "add":
            length, max_tokens, prefix, count = args
            for _ in range(count):
                # A few shared prefixes so that the prefix cache gets hits.
                prompt = (prompt_of(12, prefix) + prompt_of(30, len(added)))[:length]
                req = make_request(prompt, max_tokens=max_tokens, stop_token_ids={0})
                sched.add_request(req)
                added.append(req)
        elif kind in ("abort", "stop_string") and added:
            req = added[args[0] % len(added)]
            status = (RequestStatus.FINISHED_ABORTED if kind == "abort"
                      else RequestStatus.FINISHED_STOPPED)
            sched.finish_request(req.request_id, status)
            assert_invariants(sched)
        elif kind == "step":
            run_steps(args[0])

    for req in list(sched.requests.values())[::2]:
        sched.abort_request(req.request_id)
    completed += driver.run_to_completion(on_step=lambda out: assert_invariants(sched))
    assert sched.block_pool.num_free_blocks == num_blocks
    assert all(block.ref_cnt == 0 for block in sched.block_pool.blocks)
    assert not ranks.seqs and sched.num_running == sched.num_waiting == 0
    for req in added:
        assert req.status.is_finished
        if req.status is not RequestStatus.FINISHED_ABORTED and req in completed:
            want = reference_output(req.prompt_token_ids, req.max_tokens, 32, {0})
            assert (req.output_token_ids, req.finish_reason) == want


# ---- overlapped steps --------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 14), st.integers(0, 3)),
                      min_size=1, max_size=10),
       num_blocks=st.integers(8, 40), budget=st.integers(1, 24),
       enable_prefix_caching=st.booleans())
def test_overlapped_steps_give_the_outputs_of_sequential_ones(specs, num_blocks, budget,
                                                              enable_prefix_caching):
    """Same tokens and finish reasons with one step in flight as with none, under
    preemption (few blocks), stop tokens mid-batch, max_tokens and max_model_len."""
    results = []
    for depth in (1, 2):
        sched, ranks = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_seqs=6,
                                      max_num_batched_tokens=budget, max_model_len=32,
                                      enable_prefix_caching=enable_prefix_caching)
        reqs = [make_request((prompt_of(12, prefix) + prompt_of(30, i))[:length],
                             max_tokens=max_tokens, stop_token_ids={0, 1, 2})
                for i, (length, max_tokens, prefix) in enumerate(specs)]
        for req in reqs:
            sched.add_request(req)
        driver = Overlapped(sched, ranks, depth)
        driver.run_to_completion(on_step=lambda out: assert_invariants(sched))
        assert sched.block_pool.num_free_blocks == num_blocks
        results.append([(r.output_token_ids, r.finish_reason) for r in reqs])
        for r in reqs:
            assert (r.output_token_ids, r.finish_reason) == reference_output(
                r.prompt_token_ids, r.max_tokens, 32, {0, 1, 2})
    assert results[0] == results[1]


def test_a_request_whose_last_token_is_in_flight_is_not_scheduled_again():
    sched, ranks = make_scheduler()
    a = make_request(prompt_of(5), max_tokens=2)
    sched.add_request(a)
    first = sched.schedule()  # prefill: samples token 1 (pending)
    assert a.num_pending == 1 and a.num_computed_tokens == 5
    second = sched.schedule()  # decode of the pending token: samples token 2, the last
    assert second.scheduled == [(a.seq_id, 1)] and a.num_pending == 2
    assert sched.schedule().scheduled == []  # token 2 ends it: nothing more to run
    sched.update_from_output(first, ranks.step(first))
    sched.update_from_output(second, ranks.step(second))
    assert a.finish_reason == "length" and a.output_token_ids == reference_output(
        a.prompt_token_ids, 2, 64)[0]


def test_a_token_for_a_request_that_stopped_meanwhile_is_dropped():
    sched, ranks = make_scheduler()
    a = make_request(prompt_of(5), max_tokens=10)
    sched.add_request(a)
    first = sched.schedule()
    second = sched.schedule()  # scheduled before the first step's token is known
    sampled_first, sampled_second = ranks.step(first), ranks.step(second)
    sched.update_from_output(first, sampled_first)
    sched.finish_request(a.request_id, RequestStatus.FINISHED_STOPPED)  # a stop string
    assert sched.update_from_output(second, sampled_second) == []
    assert a.output_token_ids == [sampled_first[a.seq_id]]
    out = sched.schedule()
    assert out.finished_ids == [a.seq_id] and out.scheduled == []
    ranks.step(out)
    assert not ranks.seqs and sched.block_pool.num_free_blocks == 64


def test_blocks_are_cached_only_when_the_step_that_wrote_them_returns():
    sched, ranks = make_scheduler(max_num_batched_tokens=8)
    a = make_request(prompt_of(16), max_tokens=4)
    sched.add_request(a)
    first = sched.schedule()  # tokens 0..7: two full blocks, not yet written
    assert a.num_cached_blocks == 0
    sched.update_from_output(first, ranks.step(first))
    assert a.num_cached_blocks == 2
