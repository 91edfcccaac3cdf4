"""``bench.ipc`` with tiny counts: every candidate answers round trips and streams."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import msgspec
import pytest


def test_messages_round_trip_and_sizes_grow():
    from bench import ipc

    enc = msgspec.msgpack.Encoder()
    sizes = []
    for n in (1, 64):
        outputs = ipc.step_outputs(n)
        assert len(outputs) == n and all(len(o.request_id) == 32 for o in outputs)
        data = enc.encode(ipc.StepOutputs(7, 123, outputs))
        assert msgspec.msgpack.decode(data, type=ipc.StepOutputs).outputs == outputs
        sizes.append(len(data))
    assert sizes[1] > 30 * sizes[0]
    frontend = msgspec.msgpack.Decoder(ipc.FrontendMessage)
    for msg in (ipc.add_request(8), ipc.AbortRequests(["a" * 32]), ipc.Burst(3), ipc.Stop()):
        assert frontend.decode(enc.encode(msg)) == msg


def test_rejects_unknown_candidates_and_bad_sizes():
    from bench import ipc

    for argv in (["--candidates", "zmq-udp"], ["--sizes", "0"], ["--sizes", "x"], ["--num-messages", "0"]):
        with pytest.raises(SystemExit):
            ipc.parse_args(argv)


@pytest.mark.slow
def test_every_candidate_reports_round_trip_and_throughput(ray_cluster, tmp_path, capsys):
    from bench import ipc

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "spmd-ipc-*")))
    record = ipc.main(["--num-messages", "50", "--warmup", "5", "--sizes", "1", "--settle-s", "0",
                       "--no-progress", "--json-out", str(tmp_path / "ipc.json")])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == record
    assert json.loads((tmp_path / "ipc.json").read_text()) == record
    assert [r["candidate"] for r in record["results"]] == list(ipc.CANDIDATES)
    for r in record["results"]:
        assert r["num_requests"] == 1 and r["message_bytes"] > 0
        assert 0 < r["round_trip_us"]["p50"] <= r["round_trip_us"]["p99"]
        assert r["throughput_msgs_per_s"] > 0
        assert r["stream_frontend_cpu_us"] >= 0 and r["round_trip_frontend_cpu_us"] >= 0
        assert r["candidate"] in out
    assert record["codec"][0]["message_bytes"] == record["results"][0]["message_bytes"]
    # the socket directories are gone; the fixture's Ray is left up
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "spmd-ipc-*"))) == before
    assert ray_cluster.is_initialized()
