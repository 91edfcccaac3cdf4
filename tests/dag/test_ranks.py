"""A rank's set-up runs in a thread that ends, so its OpenMP team does not outlive it."""

import subprocess
import sys
import textwrap

import pytest

from dag.ranks import _in_passing_thread


def test_in_passing_thread_returns_and_reraises():
    assert _in_passing_thread(lambda a, b: a + b, 2, 3) == 5

    def fail():
        raise ValueError("bad rank config")

    with pytest.raises(ValueError, match="bad rank config"):
        _in_passing_thread(fail)


def _threads_after_set_up(mode: str) -> int:
    """Threads alive while a long-lived "loop" thread runs parallel torch work, after a
    set-up that also ran parallel torch work, in a fresh process (as in a rank actor)."""
    script = textwrap.dedent("""
        import os, sys, threading, time
        import torch
        from dag.ranks import _in_passing_thread

        def work():
            torch.set_num_threads(2)
            a = torch.randn(1500, 1500)
            for _ in range(3):
                a @ a

        if sys.argv[1] == "passing":
            _in_passing_thread(work)
        else:
            work()
        done, stop = threading.Event(), threading.Event()
        def loop():
            work(); done.set(); stop.wait()
        t = threading.Thread(target=loop); t.start(); done.wait()
        time.sleep(0.5)
        print(len(os.listdir("/proc/self/task")))
        stop.set(); t.join()
    """)
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout)


def test_openmp_team_of_the_set_up_thread_ends_with_it():
    """Set-up in the actor's own thread left its OpenMP team alive beside the loop
    thread's (more OpenMP threads than cores: libgomp stops spinning and the model's
    threads sleep between parallel regions); through the passing thread it does not."""
    assert _threads_after_set_up("passing") < _threads_after_set_up("direct")
