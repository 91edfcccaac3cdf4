"""Wire format: round trips, delta sizes, schema errors."""

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serialization import (
    BlockUpdate, ExecuteModelRequest, MessageError, NewRequest, RankCall, ResumedRequest,
    SamplerOutput, SamplingOptions, decode_output, decode_rank_input, encode, pack_f32, pack_i32,
    unpack_f32, unpack_i32,
)

i32 = st.integers(-(2**31), 2**31 - 1)
ids = st.lists(st.integers(0, 2**31 - 1), max_size=40)
options = st.builds(SamplingOptions, temperature=st.floats(0, 2), top_p=st.floats(0.01, 1),
                    top_k=st.integers(0, 100), seed=st.integers(0, 2**63 - 1),
                    logprobs=st.integers(-1, 20))
new_req = st.builds(lambda s, p, o, b, n: NewRequest(s, pack_i32(p), o, pack_i32(b), n),
                    st.integers(0, 2**31 - 1), st.lists(i32, min_size=1, max_size=50), options,
                    ids, st.integers(0, 100))
steps = st.builds(
    lambda step, sched, news, upd, res, fin, pre: ExecuteModelRequest(
        step_id=step, scheduled_seq_ids=pack_i32([s for s, _ in sched]),
        num_scheduled_tokens=pack_i32([n for _, n in sched]), new_requests=news,
        block_updates=[BlockUpdate(s, pack_i32(b)) for s, b in upd],
        resumed=[ResumedRequest(s, pack_i32(b), n) for s, b, n in res],
        finished_ids=pack_i32(fin), preempted_ids=pack_i32(pre)),
    st.integers(0, 2**40), st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4096)), max_size=30),
    st.lists(new_req, max_size=4), st.lists(st.tuples(st.integers(0, 2**31 - 1), ids), max_size=5),
    st.lists(st.tuples(st.integers(0, 2**31 - 1), ids, st.integers(0, 64)), max_size=3), ids, ids)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_step_round_trip(msg):
    assert decode_rank_input(encode(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**31 - 1), i32), max_size=300),
       st.lists(st.floats(-100, 0, width=32), min_size=6, max_size=6))
def test_output_round_trip(rows, lps):
    out = SamplerOutput(step_id=7, seq_ids=pack_i32([r[0] for r in rows]),
                        token_ids=pack_i32([r[1] for r in rows]), logprob_seq_ids=pack_i32([1, 2]),
                        sampled_logprobs=pack_f32(lps[:2]), num_top=2,
                        top_ids=pack_i32([1, 2, 3, 4]), top_logprobs=pack_f32(lps[2:]),
                        model_time_s=0.5)
    back = decode_output(encode(out))
    assert back == out
    assert unpack_i32(back.seq_ids).tolist() == [r[0] for r in rows]
    assert unpack_f32(back.top_logprobs).reshape(2, 2).tolist() == np.float32(lps[2:]).reshape(2, 2).tolist()


def test_call_round_trip():
    call = RankCall("initialize_cache", [123])
    assert decode_rank_input(encode(call)) == call


def _decode_step(num_requests: int, context: int, block_size: int = 16) -> ExecuteModelRequest:
    """A steady decode step: one token each, a new block for the requests that cross a boundary."""
    seq_ids = np.arange(num_requests)
    crossing = [s for s in seq_ids.tolist() if (context + s) % block_size == 0]
    return ExecuteModelRequest(
        step_id=10_000, scheduled_seq_ids=pack_i32(seq_ids),
        num_scheduled_tokens=pack_i32(np.ones(num_requests)),
        block_updates=[BlockUpdate(s, pack_i32([50_000 + s])) for s in crossing])


def _full_resend(num_requests: int, context: int, block_size: int = 16) -> bytes:
    """What a non-delta protocol would send for the same step: every request's
    whole token history and block table (as msgspec arrays of ints)."""
    rng = np.random.default_rng(0)
    state = [dict(seq_id=s, token_ids=rng.integers(0, 128_000, context).tolist(),
                  block_ids=list(range(s * 128, s * 128 + context // block_size)),
                  sampling=SamplingOptions()) for s in range(num_requests)]
    return msgspec.msgpack.encode(state)


def test_delta_decode_step_is_small_and_full_resend_is_not():
    delta = encode(_decode_step(256, 2048))
    assert len(delta) < 16 * 1024, len(delta)
    assert len(_full_resend(256, 2048)) > 1 << 20
    # Size grows with the number of requests, not their context.
    assert abs(len(encode(_decode_step(256, 16_000))) - len(delta)) < 200


@pytest.mark.parametrize("data, field", [
    (b"\x01\x02", "rank message"),
    (msgspec.msgpack.encode(["step", "not-an-int"]), "$[1]"),
    (msgspec.msgpack.encode(["nope", 1]), "tag"),
])
def test_bad_messages_raise_naming_the_problem(data, field):
    with pytest.raises(MessageError) as err:
        decode_rank_input(data)
    assert field in str(err.value) or "rank message" in str(err.value)
