"""`ray job submit` against a real `ray start --head` cluster: the engine attaches
to the running cluster and the benchmark runs tp=2 there."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


# A loopback-only throwaway cluster: no token auth, so the CLI needs no token file.
# The job's `python` is the one on the cluster's PATH: this venv's, as after `source .venv/bin/activate`.
env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled",
       "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    # A short temp dir: Ray's Unix sockets live under it (108-byte path limit).
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    gcs, dash = _free_port(), _free_port()
    # Every agent port explicit: the test session's own cluster already holds the defaults,
    # and a head whose job agent cannot bind never accepts a job.
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    start = subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--num-cpus=4",
                            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
                            "--disable-usage-stats", *ports],
                           capture_output=True, text=True, timeout=180, env=env)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        # Not `ray stop`: that would also stop the test session's own cluster.
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_cluster(temp_dir: str) -> None:
    procs = [p for p in psutil.process_iter(["cmdline"])
             if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


def test_job_submit_runs_throughput_at_tp2(head_node, tiny_dir):
    head_node, env = head_node
    model = tiny_dir("llama")
    job_id = f"spmd-test-{int(time.time())}"
    cmd = [RAY, "job", "submit", "--address", head_node, "--submission-id", job_id,
           "--working-dir", ".", "--no-wait", "--",
           "python", "-m", "bench.throughput", "--model", model, "--tp", "2",
           "--num-prompts", "8", "--input-len", "16", "--output-len", "8"]
    deadline = time.monotonic() + 180  # the head's job agent comes up a while after `ray start`
    while True:
        sub = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        if sub.returncode == 0 or "No available agent" not in sub.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stderr + sub.stdout
    deadline = time.monotonic() + 400
    status = ""
    while time.monotonic() < deadline:
        status = subprocess.run([RAY, "job", "status", "--address", head_node, job_id],
                                capture_output=True, text=True, timeout=60, env=env).stdout
        if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", "--address", head_node, job_id],
                          capture_output=True, text=True, timeout=60, env=env).stdout
    assert re.search(r"succeeded", status, re.IGNORECASE), status + logs[-3000:]
    assert re.search(r"Throughput: [\d.]+ requests/s, [\d.]+ total tokens/s, [\d.]+ output tokens/s",
                     logs), logs[-3000:]
    # It ran on the submitted-to cluster (attached), not a private local one.
    assert "Started a local Ray instance" not in logs
