"""The engine streams behind one HTTP request: started together (so that a refused
request fails before any byte is sent), merged, cut into per-choice deltas, sent as
server-sent events, and aborted when left early (client gone included)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serve_app.errors import bad_value, error_for
from serve_app.metrics import RequestTimer, ServerMetrics
from serve_app.protocol import UsageInfo
from spmd import AsyncEngine, RequestOutput, SamplingParams
from spmd.lora import LoRARequest
from spmd.output_processor import merge_delta



class EngineStreams:
    """The engine streams of one HTTP request (one per prompt), as deltas. Leaving
    them early, client gone included, aborts every unfinished one."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], timers: list[RequestTimer],
                 params: SamplingParams, prompts: list, lora_request: LoRARequest | None = None):
        self.engine = engine
        self.request_ids = request_ids
        self.timers = timers
        self.gens = [engine.generate(p, params, rid, delta=True, lora_request=lora_request)
                     for p, rid in zip(prompts, request_ids)]
        self.firsts: list[RequestOutput] = []
        self._cleanup: asyncio.Future | None = None

    @classmethod
    async def start(cls, engine: AsyncEngine, metrics: ServerMetrics, request_id: str,
                    prompts: list, params: SamplingParams,
                    lora_request: LoRARequest | None = None) -> EngineStreams:
        """Waits for every prompt's first output, so that a request the engine refuses
        (``ValueError``) fails with a 400 before any byte of a stream is sent."""
        start = time.perf_counter()
        ids = ([request_id] if len(prompts) == 1
               else [f"{request_id}-{i}" for i in range(len(prompts))])
        streams = cls(engine, ids, [metrics.timer(start) for _ in prompts], params, prompts,
                      lora_request)
        firsts = [asyncio.ensure_future(anext(gen)) for gen in streams.gens]
        try:
            streams.firsts = await asyncio.gather(*firsts)
        except BaseException as e:
            for task in firsts:
                task.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)
            await streams.close()
            if isinstance(e, ValueError):
                raise bad_value(e) from None
            raise
        for timer, out in zip(streams.timers, streams.firsts):
            timer.observe(out)
        return streams

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(prompt index, delta)`` as they arrive, first outputs first."""
        try:
            for i, out in enumerate(self.firsts):
                yield i, out
            pending = [i for i, out in enumerate(self.firsts) if not out.finished]
            if len(pending) == 1:
                i = pending[0]
                async for out in self.gens[i]:
                    self.timers[i].observe(out)
                    yield i, out
            elif pending:
                async for i, out in merge({i: self.gens[i] for i in pending}):
                    self.timers[i].observe(out)
                    yield i, out
        finally:
            await self.close()

    async def finals(self) -> list[RequestOutput]:
        """Every prompt's whole output (the deltas folded together)."""
        finals: list[RequestOutput | None] = [None] * len(self.gens)
        async for i, out in self.outputs():
            finals[i] = merge_delta(finals[i], out)
        return finals

    async def close(self) -> None:
        # Shielded: Starlette cancels a dropped stream's task again at every await.
        if self._cleanup is None:
            self._cleanup = asyncio.ensure_future(self._close())
        await asyncio.shield(self._cleanup)

    async def _close(self) -> None:
        for gen in self.gens:
            try:
                await gen.aclose()  # an unfinished one aborts its request as it closes
            except RuntimeError:  # still running in a cancelled pump task: abort it here
                pass
        for request_id, timer in zip(self.request_ids, self.timers):
            if not timer.finished:
                await self.engine.abort(request_id)
            timer.done()


async def merge(gens: dict[int, AsyncIterator[RequestOutput]]
                ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleaves several engine streams: ``(stream index, output)`` as they arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in gens.items()]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Delta:
    index: int  # choice index: prompt index * n + completion index
    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    stop_reason: int | str | None
    first: bool


class Deltas:
    """Per-choice chunks from the engine's deltas (stop-string hold-back is the
    engine's: a delta never holds text a stop string may still cut off)."""

    def __init__(self, params: SamplingParams, num_prompts: int):
        self.n = params.n
        self.prompt_tokens = [0] * num_prompts
        self._tokens: dict[int, int] = {}  # choice index -> tokens sent
        self._done: set[int] = set()

    def of(self, i: int, out: RequestOutput) -> list[Delta]:
        self.prompt_tokens[i] = len(out.prompt_token_ids)
        deltas = []
        for c in out.outputs:
            index = i * self.n + c.index
            if index in self._done:
                continue
            first = index not in self._tokens
            if not (c.text or c.token_ids or c.finish_reason or first):
                continue
            self._tokens[index] = self._tokens.get(index, 0) + len(c.token_ids)
            if c.finish_reason:
                self._done.add(index)
            deltas.append(Delta(index, c.text, c.token_ids, c.logprobs, c.finish_reason,
                                c.stop_reason, first))
        return deltas

    def usage(self) -> UsageInfo:
        prompt = sum(self.prompt_tokens)
        completion = sum(self._tokens.values())
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion)


def usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def sse(events: AsyncIterator[BaseModel]) -> StreamingResponse:
    """Server-sent events: ``data: {json}`` per chunk, then ``data: [DONE]``."""

    async def lines():
        try:
            async for event in events:
                yield f"data: {event.model_dump_json()}\n\n"
        except Exception as e:  # a failure mid-stream can only be reported in-band
            yield f"data: {json.dumps(error_for(e, 'stream').body())}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")
