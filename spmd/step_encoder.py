"""SchedulerOutput → ExecuteModelRequest: the delta, and nothing else."""

from __future__ import annotations

import numpy as np

from serialization import (BlockUpdate, ExecuteModelRequest, LoRASlot, NewRequest, ResumedRequest,
                           pack_i32)
from spmd.scheduler import SchedulerOutput


def to_message(out: SchedulerOutput, lora_slots: list[tuple[int, int]] = ()) -> ExecuteModelRequest:
    scheduled = np.array(out.scheduled, dtype=np.int32).reshape(-1, 2)
    start = _starts(out) if out.new_requests or out.resumed else {}
    return ExecuteModelRequest(
        step_id=out.step_id,
        scheduled_seq_ids=scheduled[:, 0].tobytes(),
        num_scheduled_tokens=scheduled[:, 1].tobytes(),
        new_requests=[
            NewRequest(seq_id=r.seq_id, prompt_token_ids=pack_i32(r.prompt_token_ids),
                       sampling=r.sampling, block_ids=pack_i32(r.block_ids),
                       num_computed_tokens=start[r.seq_id], lora_id=r.lora_id,
                       guided=r.guided)
            for r in out.new_requests],
        block_updates=[BlockUpdate(seq_id, pack_i32(ids)) for seq_id, ids in out.block_updates],
        resumed=[ResumedRequest(r.seq_id, pack_i32(r.block_ids), start[r.seq_id])
                 for r in out.resumed],
        finished_ids=pack_i32(out.finished_ids),
        preempted_ids=pack_i32(out.preempted_ids),
        shape_index=out.shape_index,
        lora_slots=[LoRASlot(slot, lora_id) for slot, lora_id in lora_slots],
    )


def _starts(out: SchedulerOutput) -> dict[int, int]:
    """Where each scheduled request starts this step: its ``num_computed_tokens`` before
    the step (the scheduler advances it when it schedules; a scheduler that advances it
    only when the step returns leaves ``starts`` empty)."""
    if out.starts:
        return {seq_id: s for (seq_id, _), s in zip(out.scheduled, out.starts)}
    return {r.seq_id: r.num_computed_tokens for r in out.scheduled_requests}
