"""Static batching over warm-up shapes, and the static-shape config: pure, no ranks."""

import pytest

from spmd import EngineConfig
from spmd.config import parse_warmup_shapes
from spmd.request import Request, RequestStatus
from spmd.static_scheduler import StaticBatchScheduler

SHAPES = [(16, 8, 2), (32, 8, 4), (64, 16, 4)]


def _req(i: int, prompt_len: int, max_tokens: int) -> Request:
    return Request(str(i), i, [1] * prompt_len, max_tokens)


def _run_step(sched: StaticBatchScheduler, token: int = 7):
    out = sched.schedule()
    finished = sched.update_from_output(out, {seq_id: token for seq_id, _ in out.scheduled})
    return out, finished


def test_picks_the_smallest_shape_that_takes_the_waiting_requests():
    sched = StaticBatchScheduler(warmup_shapes=SHAPES, max_model_len=256)
    for i, (n, m) in enumerate([(10, 4), (12, 8)]):
        sched.add_request(_req(i, n, m))
    out = sched.schedule()
    assert out.shape_index == 0 and [s for s, _ in out.scheduled] == [0, 1]
    assert [n for _, n in out.scheduled] == [10, 12] and len(out.new_requests) == 2

    # Three waiting requests: (32, 8, 4) takes all three where (16, 8, 2) takes two.
    sched = StaticBatchScheduler(warmup_shapes=SHAPES, max_model_len=256)
    for i in range(3):
        sched.add_request(_req(i, 10, 4))
    assert sched.schedule().shape_index == 1

    # A long prompt at the head needs the largest shape; it also takes the short ones.
    sched = StaticBatchScheduler(warmup_shapes=SHAPES, max_model_len=256)
    sched.add_request(_req(0, 50, 4))
    sched.add_request(_req(1, 5, 2))
    out = sched.schedule()
    assert out.shape_index == 2 and len(out.scheduled) == 2


def test_no_prefill_while_a_batch_decodes():
    sched = StaticBatchScheduler(warmup_shapes=SHAPES, max_model_len=256)
    sched.add_request(_req(0, 10, 3))
    sched.add_request(_req(1, 10, 1))
    first, _ = _run_step(sched)
    assert first.shape_index == 0 and len(first.new_requests) == 2
    # Request 1 got its only token; a newcomer waits until request 0 is done too.
    sched.add_request(_req(2, 4, 2))
    steps = []
    while sched.running:
        out, _ = _run_step(sched)
        steps.append(out)
        assert out.shape_index == -1 and not out.new_requests
        assert [n for _, n in out.scheduled] == [1] * len(out.scheduled)
    assert [[s for s, _ in o.scheduled] for o in steps] == [[0], [0]]
    assert steps[0].finished_ids == [1]
    nxt = sched.schedule()
    assert nxt.finished_ids == [0] and [s for s, _ in nxt.scheduled] == [2]
    assert nxt.shape_index == 0


def test_rejects_a_request_that_fits_no_shape():
    sched = StaticBatchScheduler(warmup_shapes=SHAPES, max_model_len=256)
    with pytest.raises(ValueError, match=r"fits no warm-up shape.*\(16, 8, 2\), \(32, 8, 4\), \(64, 16, 4\)"):
        sched.add_request(_req(0, 65, 4))
    with pytest.raises(ValueError, match="max_tokens=17"):
        sched.add_request(_req(1, 20, 17))
    assert not sched.has_unfinished_requests()


def test_abort_frees_a_running_request_and_tells_the_ranks():
    sched = StaticBatchScheduler(warmup_shapes=SHAPES, max_model_len=256)
    sched.add_request(_req(0, 10, 8))
    sched.add_request(_req(1, 10, 8))
    sched.add_request(_req(2, 10, 8))  # three: (32, 8, 4) takes them all
    _run_step(sched)
    assert sched.num_running == 3 and sched.kv_usage == 0.75
    sched.abort_request("1")
    out, _ = _run_step(sched)
    assert out.finished_ids == [1] and [s for s, _ in out.scheduled] == [0, 2]
    assert sched.get_request("1") is None
    sched.abort_request("0")
    sched.abort_request("2")
    assert not sched.has_unfinished_requests() and sched.has_pending_frees()


def test_stop_token_finishes_early():
    sched = StaticBatchScheduler(warmup_shapes=SHAPES, max_model_len=256)
    req = Request("0", 0, [1, 2, 3], 8, stop_token_ids=[7])
    sched.add_request(req)
    _, updated = _run_step(sched, token=7)
    assert updated == [req] and req.status is RequestStatus.FINISHED_STOPPED
    assert not sched.has_unfinished_requests()


def test_warmup_shapes_config():
    assert parse_warmup_shapes("64,16,4;16,8,2 16,8,2") == ((16, 8, 2), (64, 16, 4))
    assert parse_warmup_shapes([[64, 16, 4]]) == ((64, 16, 4),)
    cfg = EngineConfig.from_kwargs(device="spyre", warmup_shapes="64,16,4", compile_backend="eager")
    assert cfg.device.warmup_shapes == ((64, 16, 4),) and cfg.dtype == "float32"
    rank = cfg.rank_config(256)
    assert rank.warmup_shapes == [(64, 16, 4)] and rank.compile_backend == "eager"
    assert EngineConfig.from_kwargs(device="tpu").dtype == "bfloat16"
    assert EngineConfig.from_kwargs(device="tpu-emulated").dtype == "float32"
    for kwargs, match in [
        (dict(device="spyre"), "warmup_shapes: device='spyre' needs"),
        (dict(device="cpu", warmup_shapes="64,16,4"), "warmup_shapes: only device='spyre'"),
        (dict(device="spyre", warmup_shapes="64,16"), "warmup_shapes: .* positive ints"),
        (dict(device="spyre", warmup_shapes="64,0,4"), "warmup_shapes"),
        (dict(device="spyre", warmup_shapes="200,100,1", max_model_len=256),
         "needs 300 tokens of context; max_model_len=256"),
        (dict(device="spyre", warmup_shapes="64,16,4", compile_backend="xla"), "compile_backend"),
        (dict(device="gpu"), "device: must be one of auto, cpu, cuda, spyre, tpu, tpu-emulated"),
    ]:
        with pytest.raises(ValueError, match=match):
            EngineConfig.from_kwargs(**kwargs)
