"""The compiled-graph transport waits for rank 0 in the kernel (a named pipe) instead of
spinning on the channel: the engine process stays off the ranks' cores while they run."""

import os
import threading
import time

import pytest

from dag.done_pipe import DonePipe, DoneWriter, pipe_dir
from spmd import LLM, SamplingParams


def _pipe() -> tuple[DonePipe, list[DoneWriter]]:
    writers: list[DoneWriter] = []
    pipe = DonePipe(lambda path: writers.append(DoneWriter(path)))
    return pipe, writers


def test_wait_returns_once_per_finished_call_and_leaves_no_file():
    before = set(os.listdir(pipe_dir()))
    pipe, (writer,) = _pipe()
    assert not {f for f in set(os.listdir(pipe_dir())) - before if f.startswith("spmd-done")}
    writer.done()
    writer.done()
    t0 = time.monotonic()
    pipe.wait(5.0, lambda: False)  # both calls already finished: no waiting
    pipe.wait(5.0, lambda: False)
    assert time.monotonic() - t0 < 0.5
    # The third waits for its byte, written from another thread a little later.
    threading.Timer(0.3, writer.done).start()
    t0 = time.monotonic()
    pipe.wait(5.0, lambda: False)
    assert 0.25 < time.monotonic() - t0 < 2.0
    pipe.close()


def test_wait_gives_up_on_timeout_on_a_failed_loop_and_when_rank0_is_gone():
    pipe, (writer,) = _pipe()
    t0 = time.monotonic()
    pipe.wait(0.3, lambda: False)  # nothing finishes: back after the timeout
    assert 0.25 < time.monotonic() - t0 < 1.5
    t0 = time.monotonic()
    pipe.wait(30.0, lambda: True)  # a rank's loop ended: back within the 1 s check
    assert time.monotonic() - t0 < 2.5
    os.close(writer._fd)  # rank 0's process exits: end of file
    t0 = time.monotonic()
    pipe.wait(30.0, lambda: False)
    assert time.monotonic() - t0 < 0.5
    pipe.close()


@pytest.mark.slow
def test_engine_does_not_spin_while_the_ranks_run(ray_cluster, tiny_dir):
    llm = LLM(tiny_dir("llama"), skip_tokenizer_init=True, max_model_len=128, backend="dag")
    try:
        assert llm.engine.transport._done is not None  # rank 0 shares the engine's node
        llm.engine.call_all("ping")
        cpu0, t0 = time.process_time(), time.monotonic()
        llm.engine.call_all("sleep", 2.0)  # rank 0 busy for 2 s
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        assert wall >= 2.0
        # A spinning channel read burns ~a core for the whole wait (1.9 s of 2 s measured).
        assert cpu < 0.4, cpu
        # Steps come back right, each woken by its own byte (two in flight).
        out = llm.generate([{"prompt_token_ids": [1, 2, 3 + i]} for i in range(4)],
                           SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                           use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in out] == [5] * 4
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_loop_ended_sees_a_dead_rank(ray_cluster, tiny_dir):
    """The check the wait makes once a second, against real rank actors: false while the
    ranks live, true once one is gone (its graph loop ends with it)."""
    import ray

    llm = LLM(tiny_dir("llama"), tensor_parallel_size=2, skip_tokenizer_init=True,
              max_model_len=128, backend="dag")
    try:
        transport = llm.engine.transport
        assert not transport._loop_ended()
        ray.kill(transport.group.actors[1])
        deadline = time.monotonic() + 20
        while not transport._loop_ended() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert transport._loop_ended()
    finally:
        llm.shutdown()
