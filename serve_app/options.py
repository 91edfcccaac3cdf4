"""Application-builder arguments: ``serve run serve_app:deploy key=value ...`` hands
them over as strings, a Serve config YAML as typed values. Each is converted to the
type of the engine or server field it names; anything else is a ``ValueError``."""

from __future__ import annotations

import json
import os
import types
import typing
from dataclasses import dataclass

from spmd import EngineConfig
from spmd.config import DEFAULT_MODEL, resolve_model

_ALIASES = {"tp": "tensor_parallel_size"}


@dataclass(frozen=True)
class ServerOptions:
    """What the HTTP layer and the Serve deployment need; the engine gets the rest."""

    served_model_name: str | None = None  # None: the model argument as given
    # set: every route but /health needs "Authorization: Bearer <api_key>"
    api_key: str | None = None
    metrics_public: bool = False  # with api_key set: /metrics without the key too
    max_body_bytes: int = 1 << 20
    max_json_depth: int = 32  # nesting of the request body's JSON
    num_replicas: int | str = 1  # an int, or "auto" (Serve's default autoscaling)
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = 1024  # per replica; Serve's default of 5 would starve the batch
    replica_num_cpus: float = 0.5  # Ray logical CPUs of the replica (its rank actors ask their own)
    host: str | None = None  # Serve's http_options; None: Serve's default (127.0.0.1)
    port: int | None = None  # None: 8000
    # LoRA adapters loaded at start, (name, path) each; given, they imply enable_lora=True
    lora_modules: tuple[tuple[str, str], ...] = ()
    # How the model writes tool calls: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen,
    # SmolLM-style chat models) or llama3_json ({"name": ..., "parameters": ...}).
    tool_call_parser: str = "hermes"

    def __post_init__(self):
        _check(self.max_body_bytes >= 1, "max_body_bytes", "must be >= 1")
        _check(self.max_json_depth >= 2, "max_json_depth", "must be >= 2")
        _check(self.num_replicas == "auto"
               or (type(self.num_replicas) is int and self.num_replicas >= 1),
               "num_replicas", f"must be an int >= 1 or 'auto', got {self.num_replicas!r}")
        _check(self.autoscaling_config is None or self.num_replicas in (1, "auto"), "num_replicas",
               "leave it out when autoscaling_config is given")
        _check(self.max_ongoing_requests >= 1, "max_ongoing_requests", "must be >= 1")
        _check(self.replica_num_cpus >= 0, "replica_num_cpus", "must be >= 0")
        _check(self.port is None or 0 < self.port < 65536, "port", "must be in 1..65535")
        _check(self.api_key is None or len(self.api_key) > 0, "api_key", "must not be empty")
        from serve_app.tool_parsers import get_tool_parser

        get_tool_parser(self.tool_call_parser)  # a ValueError naming tool_call_parser
        names = [name for name, _ in self.lora_modules]
        _check(all(names), "lora_modules", "an adapter name must not be empty")
        twice = sorted({n for n in names if names.count(n) > 1})
        _check(not twice, "lora_modules", f"adapter name(s) {twice} given more than once")
        _check(self.served_model_name not in names, "lora_modules",
               f"adapter name {self.served_model_name!r} is the served model's name")


def parse_args(args: dict) -> tuple[dict, ServerOptions]:
    """Splits builder args into engine keyword arguments and ``ServerOptions``."""
    engine_fields = _engine_fields()
    server_fields = typing.get_type_hints(ServerOptions)
    engine_kwargs: dict = {"model": DEFAULT_MODEL}
    server_kwargs: dict = {}
    for key, value in args.items():
        name = _ALIASES.get(key, key)
        if name in engine_fields:
            engine_kwargs[name] = _convert(key, value, engine_fields[name])
        elif name == "num_replicas":
            server_kwargs[name] = value if value == "auto" else _convert(key, value, int)
        elif name == "lora_modules":
            server_kwargs[name] = parse_lora_modules(value)
        elif name in server_fields:
            server_kwargs[name] = _convert(key, value, server_fields[name])
        else:
            known = sorted({*engine_fields, *server_fields, *_ALIASES})
            raise ValueError(f"{key}: unknown argument; known: {', '.join(known)}")
    if server_kwargs.get("served_model_name") is None:
        server_kwargs["served_model_name"] = engine_kwargs["model"]
    if server_kwargs.get("lora_modules"):
        if engine_kwargs.get("enable_lora") is False:
            raise ValueError("enable_lora: must not be false when lora_modules are given")
        engine_kwargs["enable_lora"] = True
    config = EngineConfig.from_kwargs(**engine_kwargs)  # bad values fail now, not in the replica
    engine_kwargs["device"] = config.device.device  # "auto" resolved here, where the GPUs show
    model_path = resolve_model(engine_kwargs["model"])
    if not os.path.exists(model_path):
        raise ValueError(f"model: path {model_path!r} does not exist")
    options = ServerOptions(**server_kwargs)
    _check_lora_modules(options.lora_modules, model_path, config.lora.max_lora_rank)
    return engine_kwargs, options


def _check_lora_modules(modules, model_path: str, max_lora_rank: int) -> None:
    """The deploy-time adapters, checked against the model as the engine will check them."""
    if not modules:
        return
    from workers.lora import check_adapter
    from workers.model_loader import load_hf_config

    hf_config = load_hf_config(model_path)
    for name, path in modules:
        if not os.path.exists(path):
            raise ValueError(f"lora_modules: path {path!r} of adapter {name!r} does not exist")
        try:
            check_adapter(path, hf_config, max_lora_rank, name=name)
        except ValueError as e:
            raise ValueError(f"lora_modules: adapter {name!r}: {e}") from None


def parse_lora_modules(value) -> tuple[tuple[str, str], ...]:
    """``"name=path,name2=path2"`` (CLI), or from YAML a list of ``{name, path}`` (or of
    ``"name=path"``) or a mapping name → path; JSON text of those too."""
    if value is None or value == "":
        return ()
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"lora_modules: invalid JSON ({e})") from None
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, dict):
        value = [{"name": k, "path": v} for k, v in value.items()]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"lora_modules: expected name=path pairs, got {value!r}")
    modules = []
    for item in value:
        if isinstance(item, str) and "=" in item:
            item = dict(zip(("name", "path"), (x.strip() for x in item.split("=", 1))))
        if not (isinstance(item, dict) and set(item) == {"name", "path"}
                and all(isinstance(v, str) for v in item.values())):
            raise ValueError(f"lora_modules: {item!r} is not name=path (or {{name, path}})")
        modules.append((item["name"], item["path"]))
    return tuple(modules)


def _engine_fields() -> dict[str, type]:
    hints = {}
    for part in typing.get_type_hints(EngineConfig).values():
        hints.update(typing.get_type_hints(part))
    return hints


def _convert(name: str, value, hint):
    """``value`` (a CLI string, or a typed YAML value) as ``hint``'s type."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise ValueError(f"{name}: must not be empty")
    for kind in options:
        if kind is type(None):
            continue
        try:
            return _as(kind, value)
        except (TypeError, ValueError):
            pass
    wanted = " or ".join(k.__name__ for k in options if k is not type(None))
    raise ValueError(f"{name}: expected {wanted}, got {value!r}")


def _as(kind: type, value):
    if kind is bool:
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind in (int, float):
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise TypeError(value)
        return kind(value) if isinstance(value, (str, int, float)) else _fail(value)
    if kind is str:
        return value if isinstance(value, str) else _fail(value)
    if typing.get_origin(kind) is tuple:  # warmup_shapes from YAML: a list of triples
        return value if isinstance(value, (list, tuple)) else _fail(value)
    if kind is dict:
        value = json.loads(value) if isinstance(value, str) else value
        return value if isinstance(value, dict) else _fail(value)
    raise TypeError(f"unsupported option type {kind}")


def _fail(value):
    raise TypeError(value)


def _check(ok: bool, name: str, limit: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {limit}")

