"""LoRA adapters, engine side: ``LoRARequest`` (vLLM's), and the registry that decides
which adapters the ranks hold in CPU memory and in their device slots.

The registry is the one source of truth: ranks load or drop an adapter only when it
broadcasts ``load_lora`` / ``unload_lora``, and fill a device slot only when a step
message says so (``ExecuteModelRequest.lora_slots``). A request's adapter travels once,
as ``NewRequest.lora_id``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from workers.lora import check_adapter


@dataclass(frozen=True)
class LoRARequest:
    """An adapter a request runs with: ``LoRARequest("sql", 1, "/path/to/adapter")``.
    ``lora_int_id`` (>= 1) identifies it to the engine; a PEFT folder at ``lora_path``."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_name: must be a non-empty string")
        if type(self.lora_int_id) is not int or not 1 <= self.lora_int_id < 2**31:
            raise ValueError(f"lora_int_id: {self.lora_int_id!r} must be an int in 1..2^31-1 "
                             "(0 is the base model)")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path: must be a non-empty string")

    name = property(lambda self: self.lora_name)
    path = property(lambda self: self.lora_path)
    adapter_id = property(lambda self: self.lora_int_id)


class LoRAInUseError(ValueError):
    """An adapter that unfinished requests still use cannot be removed (HTTP 409)."""


@dataclass
class _Adapter:
    name: str
    path: str
    prefix_key: int  # seeds the prefix-cache hashes of its requests


class LoRARegistry:
    """Adapters known to the engine core, which of them the ranks hold in CPU memory
    (``max_cpu_loras``, least recently used dropped first) and which sit in the
    ``max_loras`` device slots (least recently used, among those no running request
    needs, replaced first)."""

    def __init__(self, *, max_loras: int, max_lora_rank: int, max_cpu_loras: int, hf_config,
                 call_all: Callable[..., list]):
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.hf_config = hf_config
        self._call_all = call_all
        self.adapters: dict[int, _Adapter] = {}
        self._resident: OrderedDict[int, None] = OrderedDict()  # on the ranks' CPU, LRU first
        self.slots: list[int | None] = [None] * max_loras  # device slot -> adapter id
        self._slot_use: OrderedDict[int, None] = OrderedDict()  # slot indices, LRU first
        self.unfilled = False  # a failed step's fills count as not made: assign again
        self._num_added = 0

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self.adapters

    def prefix_key(self, lora_id: int) -> int:
        return self.adapters[lora_id].prefix_key

    def add(self, name: str, lora_id: int, path: str) -> bool:
        """Validates and registers an adapter (``ValueError`` naming the module, limit or
        file, before any rank changes); loads it on the ranks while their CPU cache has
        room. False if it was already registered, identically."""
        LoRARequest(name, lora_id, path)  # field checks
        known = self.adapters.get(lora_id)
        if known is not None:
            if (known.name, known.path) == (name, path):
                return False
            raise ValueError(f"lora_int_id: {lora_id} is already registered as adapter "
                             f"{known.name!r}; remove it first or pick another id")
        if any(a.name == name for a in self.adapters.values()):
            raise ValueError(f"lora_name: an adapter named {name!r} is already registered")
        check_adapter(path, self.hf_config, self.max_lora_rank, name=name)
        self._num_added += 1
        self.adapters[lora_id] = _Adapter(name, path, hash(("lora", lora_id, self._num_added)))
        if len(self._resident) < self.max_cpu_loras:
            self._load(lora_id)
        return True

    def remove(self, lora_id: int) -> bool:
        """Forgets an adapter on the ranks and here; the caller checks it is unused."""
        if lora_id not in self.adapters:
            return False
        if lora_id in self._resident:
            self._call_all("unload_lora", lora_id)
            del self._resident[lora_id]
        for slot, held in enumerate(self.slots):
            if held == lora_id:
                self.slots[slot] = None
                self._slot_use.pop(slot, None)
        del self.adapters[lora_id]
        return True

    def list(self) -> list[list]:
        return [[a.name, lora_id, a.path] for lora_id, a in self.adapters.items()]

    def assign_slots(self, needed: Iterable[int]) -> list[tuple[int, int]]:
        """Puts every adapter in ``needed`` (those of the running requests: at most
        ``max_loras`` of them, which the scheduler guarantees) in a device slot; returns
        the ``(slot, lora_id)`` fills the next step must make on the ranks."""
        needed = {i for i in needed if i}
        assert len(needed) <= self.max_loras, (needed, self.max_loras)
        fills = []
        self.unfilled = False
        for lora_id in sorted(needed):
            if lora_id in self.slots:
                slot = self.slots.index(lora_id)
            else:
                slot = self._free_slot(needed)
                self._make_resident(lora_id, replacing=self.slots[slot])
                self.slots[slot] = lora_id
                fills.append((slot, lora_id))
            self._slot_use.pop(slot, None)
            self._slot_use[slot] = None
            self._resident.move_to_end(lora_id)
        return fills

    def forget_fills(self, fills: Iterable[tuple[int, int]]) -> None:
        """Slots a failed step was to fill count as empty (the next step fills them again)."""
        for slot, lora_id in fills:
            if self.slots[slot] == lora_id:
                self.slots[slot] = None
                self.unfilled = True

    def _free_slot(self, needed: set[int]) -> int:
        for slot, held in enumerate(self.slots):
            if held is None:
                return slot
        for slot in self._slot_use:  # least recently used first
            if self.slots[slot] not in needed:
                return slot
        raise AssertionError("no LoRA slot free: the scheduler admitted too many adapters")

    def _make_resident(self, lora_id: int, replacing: int | None) -> None:
        if lora_id in self._resident:
            return
        if len(self._resident) >= self.max_cpu_loras:
            in_slots = set(self.slots) - {replacing}
            victim = next((i for i in self._resident if i not in in_slots), None)
            assert victim is not None, "max_cpu_loras < max_loras"
            self._call_all("unload_lora", victim)
            del self._resident[victim]
        self._load(lora_id)

    def _load(self, lora_id: int) -> None:
        adapter = self.adapters[lora_id]
        self._call_all("load_lora", lora_id, adapter.path)
        self._resident[lora_id] = None
