"""The receiver thread's outputs reach a loop's collectors in the order they arrived, even
when one step holds more requests than the loop wakes per callback (the soak's stream
that never ended: its final delta overtaken by an older one)."""

import asyncio
import threading

from spmd.async_engine import FAN_OUT_SLICE, LoopInbox, RequestCollector
from spmd.outputs import CompletionOutput, RequestOutput


def _delta(request_id: str, tokens: list[int], finished: bool) -> RequestOutput:
    reason = "length" if finished else None
    return RequestOutput(request_id, None, [1], [CompletionOutput(0, "", list(tokens),
                                                                  finish_reason=reason)],
                         finished=finished)


def test_a_later_step_never_overtakes_the_rest_of_a_big_one():
    loop = asyncio.new_event_loop()
    try:
        inbox = LoopInbox(loop)
        collectors = [RequestCollector(loop, inbox) for _ in range(FAN_OUT_SLICE + 3)]
        last = collectors[-1]  # beyond the first slice of the first step
        # Both steps arrive before the loop runs a callback (a busy loop, a fast core).
        inbox.push([(c, _delta(f"r{i}", [10], False)) for i, c in enumerate(collectors)])
        inbox.push([(last, _delta(f"r{len(collectors) - 1}", [11], True))])
        out = loop.run_until_complete(last.get())
        assert out.finished and out.outputs[0].token_ids == [10, 11]
        assert out.outputs[0].finish_reason == "length"
        for c in collectors[:-1]:
            assert loop.run_until_complete(c.get()).outputs[0].token_ids == [10]
    finally:
        loop.close()


def test_pushes_from_another_thread_arrive_in_order_and_a_closed_loop_drops_them():
    loop = asyncio.new_event_loop()
    try:
        inbox = LoopInbox(loop)
        collector = RequestCollector(loop, inbox)
        steps = 50

        def receiver():
            for k in range(steps):
                inbox.push([(collector, _delta("r", [k], k == steps - 1))]
                           + [(RequestCollector(loop, inbox), _delta("x", [k], False))
                              for _ in range(FAN_OUT_SLICE)])

        async def consume():
            tokens = []
            while True:
                out = await collector.get()
                tokens += out.outputs[0].token_ids
                if out.finished:
                    return tokens

        thread = threading.Thread(target=receiver)
        thread.start()
        tokens = loop.run_until_complete(consume())
        thread.join()
        assert tokens == list(range(steps))
    finally:
        loop.close()
    inbox.push([(collector, _delta("r", [0], True))])  # no error: nobody is left to wake
