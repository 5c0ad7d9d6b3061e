"""Adapter and device: the one place that decides which GPU the lab runs on.

wgpu leaks when many devices are created, so each process gets one device per (backend,
features) choice, cached here. Everything GPU-related asks this module for its device.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

from rwkvlab.options import BACKENDS, OptionsError

# Options.backend -> wgpu's adapter.info["backend_type"]
_BACKEND_TYPES = {"vulkan": "Vulkan", "metal": "Metal", "dx12": "D3D12", "gl": "OpenGL"}
_BACKEND_NAMES = {v: k for k, v in _BACKEND_TYPES.items()}
_ADAPTER_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
# Features the native path uses where the adapter has them. Not "cooperative-matrix": wgpu
# marks it experimental and refuses a device that asks for it unless experimental features are
# enabled (seen on an H100's Vulkan adapter: "EXPERIMENTAL_COOPERATIVE_MATRIX ... experimental
# features are not enabled"); no kernel uses it yet.
NATIVE_FEATURES = ("shader-f16", "subgroup")
# Features every path asks for where available (per-kernel GPU timing).
COMMON_FEATURES = ("timestamp-query", "timestamp-query-inside-passes", "timestamp-query-inside-encoders")
# Limits requested at the adapter's own maximum (asking for more than it has raises).
_LIMITS = (
    "max-storage-buffer-binding-size",
    "max-buffer-size",
    "max-storage-buffers-per-shader-stage",
    "max-compute-workgroup-storage-size",
    "max-compute-invocations-per-workgroup",
    "max-compute-workgroup-size-x",
    "max-compute-workgroups-per-dimension",
)


class NoAdapterError(RuntimeError):
    """No WebGPU adapter matches the request; the message lists what exists."""


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter is, in the words the lab shows and records."""

    name: str
    backend: str  # Options.backend spelling: vulkan, metal, dx12, gl
    adapter_type: str  # DiscreteGPU, IntegratedGPU, CPU, ...
    description: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.backend}, {self.adapter_type})"


@dataclass(frozen=True)
class GPU:
    """A device and what it can do."""

    adapter: object
    device: object
    info: AdapterInfo
    features: frozenset[str]
    limits: dict

    def has(self, feature: str) -> bool:
        return feature in self.features


def _info(adapter) -> AdapterInfo:
    i = adapter.info
    backend = _BACKEND_NAMES.get(i["backend_type"], i["backend_type"].lower())
    return AdapterInfo(
        name=i.get("device") or i.get("vendor") or "unknown",
        backend=backend,
        adapter_type=i.get("adapter_type", "Unknown"),
        description=i.get("description", ""),
    )


def list_adapters() -> list[AdapterInfo]:
    """Every adapter wgpu can see on this machine (empty when there is none)."""
    import wgpu

    try:
        return [_info(a) for a in wgpu.gpu.enumerate_adapters_sync()]
    except RuntimeError:
        return []


def available_backends() -> list[str]:
    """Options.backend values this machine can run (always including ``auto`` if any)."""
    found = sorted({a.backend for a in list_adapters()})
    return (["auto"] + found) if found else []


def _pick_adapter(backend: str):
    import wgpu

    if backend not in BACKENDS:
        raise OptionsError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    adapters = list(wgpu.gpu.enumerate_adapters_sync())
    if backend != "auto":
        wanted = _BACKEND_TYPES[backend]
        adapters = [a for a in adapters if a.info["backend_type"] == wanted]
    if not adapters:
        have = ", ".join(available_backends()) or "none (install a Vulkan driver, e.g. mesa-vulkan-drivers)"
        raise NoAdapterError(f"no WebGPU adapter for backend {backend!r} on this machine; available: {have}")
    # Prefer real GPUs, and among equals anything over OpenGL (no f16, no subgroups there).
    return min(
        adapters,
        key=lambda a: (_ADAPTER_RANK.get(a.info["adapter_type"], 4), a.info["backend_type"] == "OpenGL"),
    )


@functools.lru_cache(maxsize=None)
def get_gpu(backend: str = "auto", native: bool = False) -> GPU:
    """The process's device for this backend; ``native`` also enables f16 and subgroups."""
    adapter = _pick_adapter(backend)
    wanted = COMMON_FEATURES + (NATIVE_FEATURES if native else ())
    features = [f for f in wanted if f in adapter.features]
    limits = {k: adapter.limits[k] for k in _LIMITS if k in adapter.limits}
    device = adapter.request_device_sync(required_features=features, required_limits=limits)
    return GPU(adapter, device, _info(adapter), frozenset(features), limits)


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkvlab.gpu [--check]``: list adapters; exit 1 when there is none."""
    adapters = list_adapters()
    for a in adapters:
        print(a.label, "-", a.description)
    if not adapters:
        print("no WebGPU adapter found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
