"""A two-node Ray cluster on this machine (``ray start --head`` plus a second
``ray start --address``, each with its own resources) and a tp=2 group spread across
both (STRICT_SPREAD): greedy parity with transformers holds, and stopping the second
node fails the group with a clear error, in bounded time, and no hang.

The test session has its own Ray cluster in-process and a process joins one cluster
only, so the engine runs in a driver subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import free_port, hf_greedy, mixed_prompts

pytestmark = pytest.mark.slow

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
STOPPED_BOUND_S = 60

DRIVER = textwrap.dedent("""
    import json, sys, time
    import ray
    from ray._private import state
    from spmd import LLM, SamplingParams

    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    ray.init(address="auto", include_dashboard=False, log_to_driver=False)
    llm = LLM(model, tensor_parallel_size=2, placement_strategy="STRICT_SPREAD",
              num_cpus_per_rank=1, skip_tokenizer_init=True, max_model_len=256, device="cpu",
              step_timeout_s=30)
    ranks = sorted((a["Name"], a["Address"]["NodeID"]) for a in state.actors().values()
                   if a["ActorClassName"] == "RankActor" and a["State"] == "ALIVE")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    print(json.dumps({"rank_nodes": [n for _, n in ranks],
                      "tokens": [o.outputs[0].token_ids for o in outs]}), flush=True)
    sys.stdin.readline()  # the test stops the second node, then says go
    t0 = time.monotonic()
    try:
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = {"error": None}
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    result["error_after_s"] = time.monotonic() - t0
    llm.shutdown()
    print(json.dumps(result), flush=True)
""")


def _ray_start(tmp, env, *args) -> None:
    subprocess.run([RAY, "start", "--disable-usage-stats", *args], env=env, check=True,
                   capture_output=True, timeout=120)


def _node_processes(temp_dir: str, resource: str) -> list[int]:
    """The raylet holding ``resource`` and its children (that node's workers)."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        procs[int(pid)] = (ppid, args)
    raylets = [pid for pid, (_, args) in procs.items()
               if "raylet/raylet" in args and temp_dir in args and f"={resource}," in args]
    return raylets + [pid for pid, (ppid, _) in procs.items() if ppid in raylets]


@pytest.fixture
def two_nodes(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="spmd2n-", dir="/tmp")  # short: socket paths have a limit
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # a local test cluster: no token to hand around
    try:
        _ray_start(tmp_path, env, "--head", "--port", str(port), "--num-cpus", "2",
                   "--resources", '{"node_a": 1}', "--temp-dir", temp_dir,
                   "--include-dashboard=false", "--ray-client-server-port", str(free_port()))
        _ray_start(tmp_path, env, "--address", f"127.0.0.1:{port}", "--num-cpus", "2",
                   "--resources", '{"node_b": 1}')
        yield temp_dir, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        # Not `ray stop`: it would stop the test session's own cluster too.
        out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout
        for pid in map(int, out.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_tp2_across_two_nodes_keeps_parity_and_a_stopped_node_fails_cleanly(two_nodes, tiny_dir):
    temp_dir, env = two_nodes
    path = tiny_dir("llama")
    prompts = mixed_prompts(4, 256, seed=21)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, path, json.dumps(prompts)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(driver.stdout.readline() or "null")
        assert first is not None, driver.stderr.read()[-3000:]
        assert len(set(first["rank_nodes"])) == 2, first  # one rank per node
        assert first["tokens"] == hf_greedy(path, prompts, 8)
        node_b = _node_processes(temp_dir, "node_b")
        assert node_b, "the second node's raylet was not found"
        t0 = time.monotonic()
        for pid in node_b:
            os.kill(pid, signal.SIGKILL)
        driver.stdin.write("go\n")
        driver.stdin.flush()
        line = driver.stdout.readline()
        second = json.loads(line or "null")
        assert second is not None, driver.stderr.read()[-3000:]
        elapsed = time.monotonic() - t0
        print(f"two nodes: parity on {len(prompts)} prompts; after the node stopped the group "
              f"failed in {second['error_after_s']:.1f} s: {second['error']}")
        assert second["error"] is not None and "rank" in second["error"], second
        assert elapsed < STOPPED_BOUND_S
        assert driver.wait(60) == 0
        stderr = driver.stderr.read()
        assert "Traceback" not in stderr, stderr[-3000:]
        out = os.environ.get("RELIABILITY_OUT")
        if out:
            with open(os.path.join(out, "two_node.json"), "w") as f:
                json.dump(dict(prompts=len(prompts), parity=True, rank_nodes=2,
                               error_after_s=round(second["error_after_s"], 1),
                               error=second["error"]), f, indent=1)
    finally:
        if driver.poll() is None:
            driver.kill()
