"""The driver that test_two_node.py runs against its two-node cluster (RAY_ADDRESS set):
tp=2 across both nodes, greedy outputs, then, once told the second node is gone,
the error of the generate that finds it gone (idle: the next one; busy: the one in
flight), and when it came.

Speaks one JSON line per phase on stdout; waits for a line on stdin between them.
"""

import json
import sys
import time

import ray

from dag import RankFailure
from spmd import LLM, SamplingParams


def main(mode: str, model: str, prompts_json: str, max_tokens: int) -> None:
    prompts = json.loads(prompts_json)
    llm = LLM(model, tensor_parallel_size=2, placement_strategy="STRICT_SPREAD",
              num_cpus_per_rank=1, skip_tokenizer_init=True, max_model_len=128,
              kv_cache_memory_bytes=8 << 20, step_timeout_s=30, start_timeout_s=120)
    group = llm.engine.transport.group
    bundle_nodes = ray.util.placement_group_table(group.pg)["bundles_to_node_id"]
    actor_nodes = [ray._private.state.actors(a._actor_id.hex())["Address"]["NodeID"]
                   for a in group.actors]
    # Each node carries a custom resource naming it (node_a: the head, node_b: the one stopped).
    node_names = {r: n["NodeID"] for n in ray.nodes() if n["Alive"] for r in n["Resources"]
                  if r.startswith("node_")}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    _say(bundle_nodes=[bundle_nodes[i] for i in range(len(group.actors))],
         actor_nodes=actor_nodes, node_names=node_names,
         tokens=[o.outputs[0].token_ids for o in outs])

    # idle: the test stops the second node, then says go; busy: the test says go, then
    # stops the node while generate runs (a step in flight, ranks inside the all-reduce).
    sys.stdin.readline()
    t0 = time.monotonic()
    error = None
    while error is None:
        try:
            llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        except RankFailure as e:
            error = dict(type="RankFailure", message=str(e), ranks=e.ranks, fatal=e.fatal)
        except Exception as e:  # reported, so the test can say what it got instead
            error = dict(type=type(e).__name__, message=str(e), ranks=[], fatal=None)
        if mode == "idle":
            break
    error_at = time.time()
    elapsed_s = time.monotonic() - t0
    t1 = time.monotonic()
    llm.shutdown()
    ray.shutdown()
    _say(error=error, error_at=error_at, generate_s=elapsed_s, shutdown_s=time.monotonic() - t1)


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
