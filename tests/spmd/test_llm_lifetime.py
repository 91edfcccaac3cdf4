"""An offline ``LLM`` frees its rank actors and placement group on ``del`` + gc, on
``shutdown()`` (idempotent) and at the end of a ``with`` block, so a second ``LLM``
in the same process finds the resources free."""

import gc
import time
import weakref

import pytest
import ray
from ray.util import placement_group_table

from spmd import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = {"prompt_token_ids": [5, 17, 42, 7]}


def _start(model: str) -> tuple[LLM, float]:
    t0 = time.perf_counter()
    llm = LLM(model, tensor_parallel_size=2, skip_tokenizer_init=True)  # backend: dag
    return llm, time.perf_counter() - t0


def _ranks(llm: LLM) -> tuple[list, object]:
    """The rank actors' handles and their placement group (held by the test, not the LLM)."""
    group = llm.engine.transport.group
    assert group.actors and group.pg is not None
    return list(group.actors), group.pg


def _assert_freed(actors: list, pg) -> None:
    assert placement_group_table(pg)["state"] == "REMOVED"
    for rank, actor in enumerate(actors):
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
        print(f"rank {rank}: dead")


def test_del_frees_the_ranks_and_a_second_llm_starts(ray_cluster, tiny_dir):
    model = tiny_dir("llama")
    llm, first_s = _start(model)
    expected = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    actors, pg = _ranks(llm)
    ref = weakref.ref(llm)
    del llm
    gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
    _assert_freed(actors, pg)

    second, second_s = _start(model)
    print(f"start: first LLM {first_s:.1f} s, second LLM {second_s:.1f} s")
    try:
        assert second.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected
    finally:
        second.shutdown()


def test_with_block_shuts_down_on_exception_and_shutdown_is_idempotent(ray_cluster, tiny_dir):
    with pytest.raises(RuntimeError, match="user code failed"):
        with LLM(tiny_dir("llama"), skip_tokenizer_init=True) as llm:
            assert len(llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
            actors, pg = _ranks(llm)
            raise RuntimeError("user code failed")
    _assert_freed(actors, pg)
    llm.shutdown()  # a second time: nothing left to free, nothing raised
    ref = weakref.ref(llm)
    del llm
    gc.collect()
    assert ref() is None

