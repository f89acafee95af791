"""Loaded adapters kept in memory, so a weights file is read and built once rather than on every call.

Kept by (family, sha256 of each weights file, model) — a file changed on disk has a new sha256 and is loaded again —
and bounded by the bytes of their parameters and buffers, least recently used out first.

`get` returns a fresh copy of the kept module, never the kept module itself: a module in a stack is moved to its
UNet's device and dtype, and the pooled pipelines sample concurrently, so no two stacks may share one. Copying a
module in memory costs a fraction of reading and building it; the kept module stays where the family's loader put it
(the CPU).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any

from torch import nn

from adapter_studio.family import Family

Key = tuple[str, tuple[tuple[str, str | None], ...], str]


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class AdapterCache:
    """Loaded adapters up to `max_bytes` (0 = keep none)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._kept: OrderedDict[Key, tuple[nn.Module, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, family: Family, paths: dict[str, str | None], sha256: dict[str, str | None], model: str,
            pipe: Any) -> nn.Module:
        """An adapter of `family` from the weights `paths` (by `WeightsFile.key`) whose hashes are `sha256`, for
        `pipe` of `model`: a copy of the kept one, or loaded with the family's loader (the caller holds the build
        lock). Weights without a hash (nothing to tell a changed file by) are loaded every time."""
        if any(path and not sha256.get(key) for key, path in paths.items()):
            return family.load(paths, pipe)
        key: Key = (family.name, tuple(sorted(sha256.items())), model)
        with self._lock:
            hit = self._kept.get(key)
            if hit is not None:
                self._kept.move_to_end(key)
        if hit is not None:
            return copy.deepcopy(hit[0])
        adapter = family.load(paths, pipe)
        size = module_bytes(adapter)
        if size > self.max_bytes:
            return adapter
        with self._lock:
            if key not in self._kept:
                self._kept[key] = (adapter, size)
                self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._kept.popitem(last=False)
                self.bytes -= dropped
        return copy.deepcopy(adapter)
