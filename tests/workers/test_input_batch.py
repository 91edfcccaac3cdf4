"""A rank's persistent batch: deltas apply, bad messages never corrupt it."""

import numpy as np
import pytest

from serialization import (BlockUpdate, ExecuteModelRequest, NewRequest, SamplingOptions,
                           pack_i32)
from workers.input_batch import InputBatch


def _new(seq_id, prompt, blocks, computed=0):
    return NewRequest(seq_id, pack_i32(prompt), SamplingOptions(temperature=0), pack_i32(blocks), computed)


def _step(step_id, sched, **kw):
    return ExecuteModelRequest(step_id=step_id, scheduled_seq_ids=pack_i32([s for s, _ in sched]),
                               num_scheduled_tokens=pack_i32([n for _, n in sched]), **kw)


def _snapshot(batch):
    return {s: (batch.tokens_of(s).tolist(), int(batch.num_computed[st.row]),
                batch.block_table[st.row, : batch.num_blocks[st.row]].tolist())
            for s, st in batch.states.items()}


def test_prefill_then_decode_inputs():
    batch = InputBatch(max_model_len=64, block_size=4)
    msg = _step(1, [(7, 6), (9, 3)], new_requests=[_new(7, list(range(10, 16)), [3, 5]),
                                                   _new(9, [1, 2, 3], [8])])
    batch.validate(msg)
    batch.apply(msg)
    inp = batch.prepare(msg)
    assert inp.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 1, 2, 3]
    assert inp.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert inp.slot_mapping.tolist() == [12, 13, 14, 15, 20, 21, 32, 33, 34]
    assert inp.logits_indices.tolist() == [5, 8]
    batch.commit(inp, np.array([99, 98], dtype=np.int32))
    msg2 = _step(2, [(7, 1), (9, 1)], block_updates=[])
    batch.validate(msg2)
    batch.apply(msg2)
    inp2 = batch.prepare(msg2)
    assert inp2.input_ids.tolist() == [99, 98] and inp2.positions.tolist() == [6, 3]
    assert inp2.seq_lens.tolist() == [7, 4]


@pytest.mark.parametrize("bad, field", [
    (dict(finished_ids=pack_i32([42])), "finished_ids"),
    (dict(preempted_ids=pack_i32([42])), "preempted_ids"),
    (dict(block_updates=[BlockUpdate(42, pack_i32([1]))]), "block_updates"),
    (dict(new_requests=[_new(7, [1], [0])]), "already live"),
    (dict(new_requests=[_new(8, [1, 2], [0], computed=5)]), "num_computed_tokens"),
])
def test_bad_message_names_field_and_leaves_batch_intact(bad, field):
    batch = InputBatch(max_model_len=64, block_size=4)
    first = _step(1, [(7, 3)], new_requests=[_new(7, [1, 2, 3], [0])])
    batch.validate(first)
    batch.apply(first)
    before = _snapshot(batch)
    msg = _step(2, [(7, 1)], **bad)
    with pytest.raises(ValueError, match=field):
        batch.validate(msg)
    assert _snapshot(batch) == before


def test_rows_grow_and_are_reused():
    batch = InputBatch(max_model_len=16, block_size=4, initial_rows=2)
    msg = _step(1, [], new_requests=[_new(i, [i + 1], [i]) for i in range(5)])
    batch.validate(msg)
    batch.apply(msg)
    assert sorted(batch.tokens_of(i).tolist()[0] for i in range(5)) == [1, 2, 3, 4, 5]
    done = _step(2, [], finished_ids=pack_i32([0, 1]))
    batch.validate(done)
    batch.apply(done)
    again = _step(3, [], new_requests=[_new(10, [77], [9])])
    batch.apply(again)
    assert batch.tokens_of(10).tolist() == [77] and len(batch.states) == 4


def test_pending_tokens_come_from_the_device_and_hold_their_rows_until_they_land():
    """Overlapped rank steps: a step is committed before its tokens are read back; the next
    step's inputs name which tokens to take from the device, and a row freed meanwhile is
    not reused until its token has landed (it would be written into a new prompt)."""
    batch = InputBatch(max_model_len=64, block_size=4, initial_rows=2)
    msg = _step(1, [(7, 3), (9, 2)], new_requests=[_new(7, [10, 11, 12], [0]),
                                                   _new(9, [20, 21], [1])])
    batch.validate(msg)
    batch.apply(msg)
    inp = batch.prepare(msg)
    assert inp.input_src is None
    batch.commit_pending(inp)  # tokens of 7 and 9 still on the device
    # Step 2 launches before they land: 9 finished (a stop string seen by the engine),
    # 5 is new, 7 decodes its pending token.
    msg2 = _step(2, [(7, 1), (5, 2)], finished_ids=pack_i32([9]),
                 new_requests=[_new(5, [30, 31], [2])])
    batch.validate(msg2)
    batch.apply(msg2)
    row9 = 1 - batch.states[7].row
    assert batch.states[5].row not in (batch.states[7].row, row9)  # 9's row is held
    inp2 = batch.prepare(msg2)
    assert inp2.positions.tolist() == [3, 0, 1]
    assert inp2.input_src.tolist() == [0, -1, -1]  # 7's input: token 0 of step 1's
    assert inp2.input_ids.tolist()[1:] == [30, 31]
    batch.land(np.array([77, 99], dtype=np.int32))
    assert batch.tokens_of(7).tolist() == [10, 11, 12, 77]
    assert int(batch.num_computed[batch.states[7].row]) == 3
    assert row9 in batch._free_rows  # released once its token landed
    batch.commit_pending(inp2)
    msg3 = _step(3, [(7, 1), (5, 1)], block_updates=[BlockUpdate(7, pack_i32([3]))])
    batch.apply(msg3)
    inp3 = batch.prepare(msg3)
    assert inp3.input_src.tolist() == [0, 1] and inp3.positions.tolist() == [4, 2]
    batch.discard_pending()  # a failed step: nothing pending, nothing held
    assert (batch.pending_pos == -1).all() and not batch._held_rows
