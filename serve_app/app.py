"""The OpenAI-compatible server: a Ray Serve deployment with a FastAPI ingress.
One replica owns one ``AsyncEngine``, hence one TP group (the engine's own
placement group); replicas add data parallelism."""

# No "from __future__ import annotations": FastAPI must see the real Request type
# of the routes after Serve rewrites them into class-based views.

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve import Application

from serve_app.errors import APIError, bad_schema, bad_value, error_for, install_handlers
from serve_app.metrics import ServerMetrics
from serve_app.openapi import publish_request_schemas
from serve_app.options import ServerOptions, parse_args
from serve_app.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    LoadLoRAAdapterRequest,
    FunctionCall,
    ModelCard,
    ModelList,
    ToolCallOut,
    UnloadLoRAAdapterRequest,
)
from serve_app.streams import Deltas, EngineStreams, sse, usage
from serve_app.tool_parsers import ContentDelta, ToolParser, get_tool_parser
from spmd import StructuredOutputsParams
from spmd.structured_outputs import check_json_schema
from spmd import AsyncEngine, PoolingParams, RequestOutput, SamplingParams
from spmd.async_engine import EngineDeadError, LoRANotFoundError
from spmd.config import default_threads_per_rank
from spmd.lora import LoRAInUseError, LoRARequest

logger = logging.getLogger(__name__)

# /openapi.json is a route of the class below (behind the API key when one is set).
fastapi_app = FastAPI(title="spmd-serve", docs_url=None, redoc_url=None, openapi_url=None)
install_handlers(fastapi_app)
publish_request_schemas(fastapi_app)


def _sampling_params(req) -> SamplingParams:
    try:
        return req.sampling_params()
    except ValueError as e:
        raise bad_value(e) from None


def _pooling_params(req: EmbeddingRequest) -> PoolingParams:
    try:
        return req.pooling_params()
    except ValueError as e:
        raise bad_value(e) from None


def _input_error(err: ValueError, index: int | None) -> APIError:
    """A 400 for the engine's ``ValueError`` about one input of an embeddings request:
    named as the request names it (``input``, ``input[i]``), unless it is about a field."""
    message = str(err)
    field, sep, rest = message.partition(": ")
    if sep and field in ("dimensions", "truncate_prompt_tokens"):
        return APIError(400, message, param=field)
    if sep and field in ("input", "prompt", "prompt_token_ids"):  # the engine's names for it
        message = rest
    where = "input" if index is None else f"input[{index}]"
    return APIError(400, f"{where}: {message}", param="input")


def _tool_finish(reason: str | None, called: bool) -> str | None:
    """OpenAI's finish reason: ``tool_calls`` when the model stopped after calling tools."""
    return "tool_calls" if called and reason == "stop" else reason


def _with_tool_prompt(messages: list[dict], parser: ToolParser) -> list[dict]:
    """The conversation with the tools described in its system message (added first
    when it has none), for chat templates that do not render ``tools`` themselves."""
    prompt = parser.system_prompt()
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


async def _async(value):
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _depth_exceeds(data, limit: int) -> bool:
    """Whether ``data`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def share_cores(engine_kwargs: dict, num_replicas: int | str) -> dict:
    """Engine options for one of ``num_replicas`` replicas. A rank's model threads default
    to the host's cores / tp: right for one engine, but replicas sharing a host then run
    replicas x cores spinning OpenMP threads (on 2 cores two tp=1 CPU replicas served
    0.33x what one did). Unless ``num_threads_per_rank`` is set, each replica's ranks get
    an equal share of this host's cores (GPU ranks use them only for host-side work)."""
    if (type(num_replicas) is not int or num_replicas < 2
            or engine_kwargs.get("num_threads_per_rank")):
        return engine_kwargs
    tp = int(engine_kwargs.get("tensor_parallel_size") or 1)
    return {**engine_kwargs, "num_threads_per_rank": default_threads_per_rank(tp, num_replicas)}


# serve.ingress pickles a copy of the FastAPI app, route methods and all, when it
# decorates the class: whatever they use must be defined above. The name stays bound to
# the class (serve.deployment is applied in deploy()), so that Ray pickles it by
# reference and replicas import this module.
@serve.ingress(fastapi_app)
class LLMServer:
    async def __init__(self, engine_kwargs: dict, options: ServerOptions):
        self.engine = AsyncEngine(**share_cores(engine_kwargs, options.num_replicas))
        self.options = options
        self.model_name = options.served_model_name
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        for name, path in options.lora_modules:  # before the replica reports ready
            try:
                await self.engine.add_lora(LoRARequest(name, self.engine.next_lora_id(), path))
            except ValueError as e:
                self.engine.shutdown()
                raise ValueError(f"lora_modules: adapter {name!r} ({path}): {e}") from None

    # ---- routes ---------------------------------------------------------------------

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        return await self._handle("/v1/models", request, self._models)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle("/v1/completions", request, self._completions)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle("/v1/chat/completions", request, self._chat)

    @fastapi_app.post("/v1/embeddings")
    async def embeddings(self, request: Request):
        return await self._handle("/v1/embeddings", request, self._embeddings)

    @fastapi_app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request):
        return await self._handle("/v1/load_lora_adapter", request, self._load_lora)

    @fastapi_app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request):
        return await self._handle("/v1/unload_lora_adapter", request, self._unload_lora)

    @fastapi_app.get("/health")
    async def health(self):
        """Public (no API key): load balancers and Serve ask it."""
        try:
            self.engine.check_health()
        except EngineDeadError as e:
            logger.debug("/health: %s", e)
            return APIError(503, "engine unhealthy", code="engine_unavailable").response()
        return Response(status_code=200)

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request):
        return await self._handle("/metrics", request, self._metrics,
                                  public=self.options.metrics_public)

    @fastapi_app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        return await self._handle("/openapi.json", request,
                                  lambda r: _async(JSONResponse(fastapi_app.openapi())))

    async def check_health(self) -> None:
        """Serve's replica health check: answered from the engine core's last heartbeat,
        never by waiting behind a step; passes while the replica rebuilds its engine core
        after a failure (``/health`` says 503 meanwhile). Raises a plain ``RuntimeError``
        (Serve's controller must be able to unpickle it)."""
        try:
            self.engine.check_health(rebuilding_ok=True)
        except EngineDeadError as e:
            raise RuntimeError(f"engine unhealthy: {e}") from None

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # ---- handlers -------------------------------------------------------------------

    async def _handle(self, endpoint: str, request: Request, handler: Callable, *,
                      public: bool = False) -> Response:
        """Auth, error bodies and the request counter, around one endpoint."""
        status = 500
        try:
            if not public:
                self._authorize(request)
            response = await handler(request)
            status = response.status_code
            return response
        except asyncio.CancelledError:
            status = 499  # the client closed the connection
            raise
        except Exception as e:  # clients get a short message; details go to the log
            err = error_for(e, endpoint)
            status = err.status
            return err.response()
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(self.engine.stats()), media_type=CONTENT_TYPE_LATEST)

    async def _models(self, request: Request) -> Response:
        max_model_len = self.engine.max_model_len
        cards = [ModelCard(id=self.model_name, created=self.created, max_model_len=max_model_len)]
        cards += [ModelCard(id=lora.lora_name, created=self.created, max_model_len=max_model_len,
                            root=lora.lora_path, parent=self.model_name)
                  for lora in self.engine.list_loras()]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def _load_lora(self, request: Request) -> Response:
        req = self._parse(LoadLoRAAdapterRequest, await self._read_json(request))
        name = req.lora_name
        if name == self.model_name or self._lora(name) is not None:
            raise APIError(400, f"lora_name: the LoRA adapter {name!r} has already been loaded",
                           param="lora_name")
        if not os.path.isdir(req.lora_path):
            raise APIError(400, f"lora_path: {req.lora_path!r} is not a folder on the server",
                           param="lora_path")
        await self.engine.add_lora(LoRARequest(name, self.engine.next_lora_id(), req.lora_path))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: Request) -> Response:
        req = self._parse(UnloadLoRAAdapterRequest, await self._read_json(request))
        which = req.lora_name if req.lora_name is not None else req.lora_int_id
        try:
            lora = await self.engine.remove_lora(which)
        except LoRANotFoundError:
            raise APIError(404, f"The LoRA adapter {which!r} is not loaded.", param="lora_name",
                           code="lora_not_found") from None
        except LoRAInUseError:
            raise APIError(409, f"The LoRA adapter {which!r} is in use by unfinished requests; "
                           "unload it once they finish.", param="lora_name",
                           code="lora_in_use") from None
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.")

    async def _completions(self, request: Request) -> Response:
        req = self._parse(CompletionRequest, await self._read_json(request))
        self._check_generates("/v1/completions")
        lora = self._model(req.model)
        params = _sampling_params(req)
        if req.echo and self.engine.tokenizer is None:
            raise APIError(400, "echo: needs a tokenizer (the server runs with "
                           "skip_tokenizer_init)", param="echo")
        prompts = req.prompts()
        limit = min(self.engine.config.limits.max_n, self.engine.config.scheduler.max_num_seqs)
        if len(prompts) > 1 and len(prompts) * params.n > limit:  # one prompt: n's own check
            raise APIError(400, f"prompt: {len(prompts)} prompts × n={params.n} = "
                           f"{len(prompts) * params.n} sequences exceed the limit of {limit} "
                           "per request (max_n, max_num_seqs)", param="prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await EngineStreams.start(self.engine, self.metrics, request_id, prompts,
                                            params, lora)
        echo = [self._prompt_text(out) if req.echo else "" for out in streams.firsts]
        head = dict(id=request_id, created=int(time.time()),
                    model=lora.lora_name if lora else self.model_name)
        if req.stream:
            return sse(self._completion_chunks(req, head, streams, params, echo))
        finals = await streams.finals()
        choices = [CompletionChoice(
            index=i * params.n + c.index, text=echo[i] + c.text,
            logprobs=None if req.logprobs is None else CompletionLogprobs.build(
                c.token_ids, c.logprobs, len(echo[i])),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, out in enumerate(finals) for c in out.outputs]
        return _json(CompletionResponse(**head, choices=choices, usage=usage(finals)))

    async def _completion_chunks(self, req: CompletionRequest, head: dict, streams: EngineStreams,
                                 params: SamplingParams, echo: list[str]):
        deltas = Deltas(params, len(streams.gens))
        offsets: dict[int, int] = {}  # choice index -> characters before its next token
        async for i, out in streams.outputs():
            for d in deltas.of(i, out):
                text = echo[i] + d.text if d.first else d.text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = CompletionLogprobs.build(d.token_ids, d.logprobs,
                                                        offsets.get(d.index, len(echo[i])))
                    offsets[d.index] = (offsets.get(d.index, len(echo[i]))
                                        + sum(map(len, logprobs.tokens)))
                yield CompletionResponse(**head, choices=[CompletionChoice(
                    index=d.index, text=text, logprobs=logprobs, finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason)])
        if req.include_usage:
            yield CompletionResponse(**head, choices=[], usage=deltas.usage())

    async def _chat(self, request: Request) -> Response:
        req = self._parse(ChatCompletionRequest, await self._read_json(request))
        self._check_generates("/v1/chat/completions")
        lora = self._model(req.model)
        params = _sampling_params(req)
        parser = self._tool_parser(req, params)
        prompt = self._render_chat(req, parser)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await EngineStreams.start(self.engine, self.metrics, request_id, [prompt],
                                            params, lora)
        head = dict(id=request_id, created=int(time.time()),
                    model=lora.lora_name if lora else self.model_name)
        top_n = req.top_logprobs or 0
        if req.stream:
            return sse(self._chat_chunks(req, head, streams, params, top_n, parser))
        out = (await streams.finals())[0]
        choices = []
        for c in out.outputs:
            content, calls = (c.text, []) if parser is None else parser.parse(c.text)
            choices.append(ChatChoice(
                index=c.index, message=ChatMessageOut(content=content, tool_calls=[
                    ToolCallOut(id=t.id, function=FunctionCall(name=t.name, arguments=t.arguments))
                    for t in calls]),
                logprobs=ChatLogprobs.build(c.token_ids, c.logprobs, top_n) if req.logprobs else None,
                finish_reason=_tool_finish(c.finish_reason, bool(calls)), stop_reason=c.stop_reason))
        return _json(ChatCompletionResponse(**head, choices=choices, usage=usage([out])))

    def _tool_parser(self, req: ChatCompletionRequest, params: SamplingParams) -> ToolParser | None:
        """The request's tool-call parser (None without tools or with tool_choice none);
        ``required`` or a named function constrains the output to tool calls."""
        try:
            tools, mode = req.tool_setup()
        except ValueError as e:
            raise bad_value(e) from None
        if mode == "none":
            return None
        parser = get_tool_parser(self.options.tool_call_parser)(tools)
        if mode != "auto":
            try:  # the arguments will follow these schemas: only what the grammar enforces
                for i, tool in enumerate(tools):
                    check_json_schema(tool["function"]["parameters"],
                                      f"tools[{i}].function.parameters")
            except ValueError as e:
                raise bad_value(e) from None
            if params.structured_outputs is not None:
                raise APIError(400, f"tool_choice: {mode!r} forces tool calls; it cannot be "
                               f"combined with {params.structured_outputs.source}",
                               param="tool_choice")
            params.structured_outputs = StructuredOutputsParams(
                structural_tag=parser.structural_tag(mode, req.parallel_tool_calls),
                source="tool_choice")
        return parser

    async def _chat_chunks(self, req: ChatCompletionRequest, head: dict, streams: EngineStreams,
                           params: SamplingParams, top_n: int, parser: ToolParser | None):
        deltas = Deltas(params, 1)
        tool_streams = {}  # choice index -> its ToolStream
        async for i, out in streams.outputs():
            for d in deltas.of(i, out):
                if d.first:
                    yield ChatCompletionChunk(**head, choices=[ChatChunkChoice(
                        index=d.index, delta=DeltaMessage(role="assistant", content=""))])
                logprobs = (ChatLogprobs.build(d.token_ids, d.logprobs, top_n)
                            if req.logprobs else None)
                if parser is None:
                    yield ChatCompletionChunk(**head, choices=[ChatChunkChoice(
                        index=d.index, delta=DeltaMessage(content=d.text), logprobs=logprobs,
                        finish_reason=d.finish_reason, stop_reason=d.stop_reason)])
                    continue
                tools = tool_streams.get(d.index) or tool_streams.setdefault(d.index,
                                                                          parser.stream())
                events = tools.feed(d.text) + (tools.finish() if d.finish_reason else [])
                content = "".join(e.text for e in events if isinstance(e, ContentDelta))
                calls = [DeltaToolCall(index=e.index, id=e.id, type="function" if e.id else None,
                                       function=DeltaFunctionCall(name=e.name,
                                                                  arguments=e.arguments))
                         for e in events if not isinstance(e, ContentDelta)]
                if not (content or calls or logprobs or d.finish_reason):
                    continue
                yield ChatCompletionChunk(**head, choices=[ChatChunkChoice(
                    index=d.index, delta=DeltaMessage(content=content or None,
                                                      tool_calls=calls or None),
                    logprobs=logprobs, stop_reason=d.stop_reason,
                    finish_reason=_tool_finish(d.finish_reason, tools.called))])
        if req.include_usage:
            yield ChatCompletionChunk(**head, choices=[], usage=deltas.usage())

    async def _embeddings(self, request: Request) -> Response:
        req = self._parse(EmbeddingRequest, await self._read_json(request))
        lora = self._model(req.model)
        if self.engine.task != "embed":
            raise APIError(400, f"/v1/embeddings: the model {self.model_name!r} is served for "
                           "generation; start the server with task=embed to serve embeddings "
                           "from it", param="model")
        if lora is not None:
            raise APIError(400, f"model: {lora.lora_name!r} is a LoRA adapter; embeddings come "
                           f"from the served model {self.model_name!r}", param="model")
        params = _pooling_params(req)
        request_id = f"embd-{uuid.uuid4().hex}"
        outs = await self._embed_all(request_id, req.inputs(), params)
        tokens = sum(len(out.prompt_token_ids) for out in outs)
        self.metrics.embedding_inputs.inc(len(outs))
        self.metrics.prompt_tokens.inc(tokens)
        data = [EmbeddingData.build(i, out.outputs.vector, req.encoding_format)
                for i, out in enumerate(outs)]
        return _json(EmbeddingResponse(id=request_id, created=int(time.time()),
                                       model=self.model_name, data=data,
                                       usage=EmbeddingUsage(prompt_tokens=tokens,
                                                            total_tokens=tokens)))

    async def _embed_all(self, request_id: str, inputs: list, params: PoolingParams) -> list:
        """Every input at once, so that they batch together; the first refused one is a
        400 naming it, and the rest are cancelled."""
        ids = [request_id] if len(inputs) == 1 else [f"{request_id}-{i}"
                                                     for i in range(len(inputs))]
        inputs = await self.engine.pretokenize(inputs, [params] * len(inputs))
        tasks = [asyncio.ensure_future(self.engine.embed(p, params, rid))
                 for p, rid in zip(inputs, ids)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException as e:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(e, ValueError):
                index = next(i for i, t in enumerate(tasks) if not t.cancelled()
                             and isinstance(t.exception(), ValueError))
                raise _input_error(tasks[index].exception(),
                                   None if len(inputs) == 1 else index) from None
            raise

    # ---- request helpers ------------------------------------------------------------

    def _check_generates(self, endpoint: str) -> None:
        if self.engine.task == "embed":
            raise APIError(400, f"{endpoint}: the model {self.model_name!r} is an embedding "
                           "model (task=embed); use /v1/embeddings", param="model")

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def _read_json(self, request: Request) -> dict:
        limit = self.options.max_body_bytes
        too_large = APIError(413, f"request body: larger than the limit of {limit} bytes "
                             "(max_body_bytes)", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        depth = self.options.max_json_depth
        too_deep = APIError(400, f"request body: JSON nested deeper than the limit of {depth} "
                            "(max_json_depth)", code="invalid_json")
        try:
            data = json.loads(body, parse_constant=_no_constant)
        except RecursionError:
            raise too_deep from None
        except ValueError as e:  # malformed JSON, NaN/Infinity, bytes that are not UTF-8
            raise APIError(400, f"request body: invalid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body: must be a JSON object")
        if _depth_exceeds(data, depth):
            raise too_deep
        return data

    def _parse(self, model: type[BaseModel], data: dict):
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise bad_schema(e) from None

    def _model(self, name: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's ``model`` names; None: the base model."""
        if name is None or name == self.model_name:
            return None
        lora = self._lora(name)
        if lora is None:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")
        return lora

    def _lora(self, name: str) -> LoRARequest | None:
        return next((x for x in self.engine.list_loras() if x.lora_name == name), None)

    def _render_chat(self, req: ChatCompletionRequest, parser: ToolParser | None = None) -> dict:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "messages: chat needs a tokenizer (the server runs with "
                           "skip_tokenizer_init)", param="messages")
        try:
            messages = [m.for_template() for m in req.messages]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
            if parser is not None:
                with_tools = tokenizer.apply_chat_template(
                    messages, tools=parser.tools, add_generation_prompt=True, tokenize=False)
                if with_tools == text:  # the template ignores tools: describe them ourselves
                    with_tools = tokenizer.apply_chat_template(
                        _with_tool_prompt(messages, parser), add_generation_prompt=True,
                        tokenize=False)
                text = with_tools
        except Exception as e:  # a template that rejects the conversation (roles, order, ...)
            raise APIError(400, f"messages: cannot render the chat template: {e}",
                           param="messages") from None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"messages: not valid Unicode (a lone surrogate at character "
                           f"{e.start} of the rendered conversation)", param="messages") from None
        # The template already holds the special tokens; vLLM tokenizes chat the same way.
        ids = tokenizer.encode(text, add_special_tokens=False)
        return {"prompt": text, "prompt_token_ids": ids}

    def _prompt_text(self, out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else self.engine.tokenizer.decode(
            out.prompt_token_ids)


def deploy(args: dict) -> Application:
    """Ray Serve application builder: ``serve run serve_app:deploy model=... tp=2``.

    Arguments are engine options with vLLM's names (``tp`` is short for
    ``tensor_parallel_size``) and server options (``ServerOptions``); an unknown or
    malformed one is a ``ValueError`` naming it, raised here, before anything starts.
    """
    engine_kwargs, options = parse_args(dict(args or {}))
    if options.host is not None or options.port is not None:
        # Serve's HTTP options belong to Serve, not to an app: this starts Serve with them
        # unless it runs already (a config file's http_options then apply).
        http = {k: v for k, v in (("host", options.host), ("port", options.port)) if v is not None}
        serve.start(http_options=http)
    deployment = dict(ray_actor_options={"num_cpus": options.replica_num_cpus},
                      max_ongoing_requests=options.max_ongoing_requests)
    if options.autoscaling_config is not None:
        deployment["autoscaling_config"] = options.autoscaling_config
    else:
        deployment["num_replicas"] = options.num_replicas
    try:
        server = serve.deployment(LLMServer, **deployment)
    except (TypeError, ValueError) as e:
        raise ValueError(f"autoscaling_config: {e}") from None
    return server.bind(engine_kwargs, options)
