"""Adapter and device: the one place that decides which GPU the lab runs on.

wgpu leaks when many devices are created, so each process gets one device per (backend,
features) choice, cached here. Everything GPU-related asks this module for its device.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
import tempfile
from dataclasses import dataclass

from rwkvlab.options import BACKENDS, Options, OptionsError, tuning_from_environment

# Options.backend -> wgpu's adapter.info["backend_type"]
_BACKEND_TYPES = {"vulkan": "Vulkan", "metal": "Metal", "dx12": "D3D12", "gl": "OpenGL"}
_BACKEND_NAMES = {v: k for k, v in _BACKEND_TYPES.items()}
_ADAPTER_RANK = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
# Which adapter a process runs on when a host has several GPUs: its number in the order
# list_adapters() (and `python -m rwkvlab.gpu`) gives them, 0 first. One Dask worker per GPU
# starts with its own value (rwkvlab.cluster); unset, the best adapter of the backend is used.
ADAPTER_ENV = "RWKVLAB_ADAPTER"
# What to install when only OpenGL (or nothing) is found; said by setup.sh and every error.
VULKAN_FIX = ("install a Vulkan driver (Debian/Ubuntu without a GPU: apt-get install mesa-vulkan-drivers; "
              "`make setup` does it)")
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


def quiet_mesa_probe() -> None:
    """Give Mesa's EGL platform the runtime folder it wants, once per process.

    Every adapter scan that reaches Mesa's OpenGL driver prints "XDG_RUNTIME_DIR is invalid or
    not set" when that variable is unset (containers, CI, OpenGL-only machines), on every
    command. A private, empty folder is all it asks for; child processes inherit it.
    """
    if not os.environ.get("XDG_RUNTIME_DIR"):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="rwkvlab-xdg-")


def list_adapters() -> list[AdapterInfo]:
    """Every adapter wgpu can see on this machine (empty when there is none)."""
    import wgpu

    quiet_mesa_probe()
    try:
        return [_info(a) for a in wgpu.gpu.enumerate_adapters_sync()]
    except RuntimeError:
        return []


def available_backends() -> list[str]:
    """Options.backend values this machine can run (always including ``auto`` if any)."""
    found = sorted({a.backend for a in list_adapters()})
    return (["auto"] + found) if found else []


@functools.lru_cache(maxsize=None)
def _pick_adapter(backend: str):
    """The adapter ``backend`` names (the best one for ``auto``); one choice per process, so
    resolving options and making the device always agree."""
    import wgpu

    quiet_mesa_probe()
    if backend not in BACKENDS:
        raise OptionsError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    adapters = list(wgpu.gpu.enumerate_adapters_sync())
    if os.environ.get(ADAPTER_ENV, "").strip():
        return _numbered_adapter(adapters, os.environ[ADAPTER_ENV].strip(), backend)
    if backend != "auto":
        wanted = _BACKEND_TYPES[backend]
        adapters = [a for a in adapters if a.info["backend_type"] == wanted]
    unable = [a for a in adapters if not can_compute(a.limits)]
    adapters = [a for a in adapters if can_compute(a.limits)]
    if unable and not adapters:
        # e.g. an OpenGL 3.3 context (the NVIDIA driver's EGL without GLES 3.1): wgpu lists the
        # adapter, then fails to make a device ("doesn't support ... COMPUTE_SHADER").
        names = ", ".join(_info(a).label for a in unable)
        raise NoAdapterError(f"no adapter for backend {backend!r} can run compute shaders ({names}: WebGPU on "
                             f"OpenGL needs OpenGL 4.3 / ES 3.1); {VULKAN_FIX}")
    if not adapters:
        have = available_backends()
        if not have:
            raise NoAdapterError(f"no WebGPU adapter on this machine; {VULKAN_FIX}")
        hint = " (Metal is Apple's GPU API: wgpu uses it on macOS only)" if backend == "metal" else ""
        raise NoAdapterError(f"backend {backend!r} is not available on this machine ({platform.system()}){hint}; "
                             f"available: {', '.join(have)}; pick one with --backend (Options.backend)"
                             + (f", or {VULKAN_FIX}" if backend == "vulkan" else ""))
    # Vulkan / Metal / DX12 before OpenGL, then real GPUs before software ones: WebGPU on
    # OpenGL is wgpu's downlevel backend (no f16, no subgroups), and a machine
    # whose GPU is reachable through GL alone is rare next to one that has a software Vulkan.
    return min(
        adapters,
        key=lambda a: (a.info["backend_type"] == "OpenGL", _ADAPTER_RANK.get(a.info["adapter_type"], 4)),
    )


def _numbered_adapter(adapters: list, text: str, backend: str):
    """The adapter ``$RWKVLAB_ADAPTER`` names, checked against the backend asked for."""
    labels = "; ".join(f"{i}: {_info(a).label}" for i, a in enumerate(adapters)) or "none"
    try:
        index = int(text)
    except ValueError:
        raise OptionsError(f"${ADAPTER_ENV}={text!r}: expected an adapter's number; this machine has {labels}") from None
    if not 0 <= index < len(adapters):
        raise NoAdapterError(f"${ADAPTER_ENV}={index}: no such adapter; this machine has {labels}")
    adapter = adapters[index]
    if backend != "auto" and adapter.info["backend_type"] != _BACKEND_TYPES[backend]:
        raise OptionsError(f"${ADAPTER_ENV}={index} is {_info(adapter).label}, not a {backend} adapter; "
                           f"use --backend auto or another number ({labels})")
    if not can_compute(adapter.limits):
        raise NoAdapterError(f"${ADAPTER_ENV}={index} is {_info(adapter).label}, which cannot run compute shaders "
                             f"(WebGPU on OpenGL needs OpenGL 4.3 / ES 3.1); pick another number ({labels})")
    return adapter


def can_compute(limits) -> bool:
    """Whether an adapter with these limits runs compute shaders with storage buffers at all."""
    try:
        return (int(limits.get("max-compute-invocations-per-workgroup", 0)) > 0
                and int(limits.get("max-storage-buffers-per-shader-stage", 0)) > 0)
    except (TypeError, ValueError):
        return False


def has_native_features(features) -> bool:
    """Whether an adapter with these features can take the ``native`` kernel path."""
    return bool(set(features) & set(NATIVE_FEATURES))


def resolve_options(options: Options | None = None) -> Options:
    """The options as they will run on this machine: the one place defaults meet the adapter.

    ``path="auto"`` becomes ``native`` where the adapter that ``options.backend`` picks has f16
    or subgroups and ``webgpu`` otherwise; an empty tuning takes ``$RWKVLAB_TUNING`` where set;
    everything else is kept. A backend or path asked for
    explicitly that this machine cannot run raises (:class:`NoAdapterError` /
    :class:`OptionsError`) with the flag to change and what to install. The engine, bench,
    profile, panel worker and sweeps all resolve through here, and records hold the result.
    """
    options = tuning_from_environment(options or Options())
    adapter = _pick_adapter(options.backend)
    native = has_native_features(adapter.features)
    if options.path == "auto":
        return options.with_(path="native" if native else "webgpu")
    if options.path == "native" and not native:
        label = _info(adapter).label
        raise OptionsError(
            f"path 'native' needs one of {', '.join(NATIVE_FEATURES)}; adapter {label} has none of them; "
            f"available paths: webgpu. Use --path webgpu or --path auto (Options(path='webgpu'|'auto')), "
            f"or {VULKAN_FIX}")
    return options


@functools.lru_cache(maxsize=None)
def get_gpu(backend: str = "auto", native: bool = False) -> GPU:
    """The process's device for this backend; ``native`` also enables f16 and subgroups."""
    adapter = _pick_adapter(backend)
    wanted = COMMON_FEATURES + (NATIVE_FEATURES if native else ())
    features = [f for f in wanted if f in adapter.features]
    limits = {k: adapter.limits[k] for k in _LIMITS if k in adapter.limits}
    try:
        device = adapter.request_device_sync(required_features=features, required_limits=limits)
    except Exception as err:  # wgpu raises RuntimeError with several lines of causes
        raise NoAdapterError(f"the device of {_info(adapter).label} could not be created "
                             f"({' '.join(str(err).split())}); {VULKAN_FIX}") from None
    return GPU(adapter, device, _info(adapter), frozenset(features), limits)


def environment(gpu: GPU) -> dict[str, str]:
    """Where a run ran, for its record (like asv's machine.json): the adapter, its driver, the
    WebGPU implementation's versions, Python and the OS."""
    import wgpu

    try:
        from wgpu.backends.wgpu_native import lib_version_info
        native = ".".join(map(str, lib_version_info))
    except ImportError:
        native = "unknown"
    return {"gpu": gpu.info.name, "backend": gpu.info.backend, "adapter_type": gpu.info.adapter_type,
            "driver": gpu.info.description, "wgpu": wgpu.__version__, "wgpu_native": native,
            "python": platform.python_version(), "os": platform.platform(), "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkvlab.gpu [--check]``: list the adapters and what ``auto`` would pick."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m rwkvlab.gpu",
        description="List the WebGPU adapters wgpu finds and the options the defaults resolve to.")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when there is no adapter, 3 when there is only OpenGL (scripts/setup.sh "
                    "then installs a Vulkan driver)")
    args = ap.parse_args(argv)
    adapters = list_adapters()
    for a in adapters:
        print(a.label, "-", a.description)
    if not adapters:
        print(f"no WebGPU adapter found; {VULKAN_FIX}", file=sys.stderr)
        return 1
    only_gl = all(a.backend == "gl" for a in adapters)
    try:
        resolved = resolve_options()
    except (NoAdapterError, OptionsError) as err:  # e.g. an OpenGL context without compute shaders
        print(f"no usable adapter: {err}", file=sys.stderr)
        return 3 if only_gl else 1
    print(f"defaults: backend=auto -> {_info(_pick_adapter('auto')).label}, path=auto -> {resolved.path}")
    if args.check and only_gl:
        print("only an OpenGL adapter: WebGPU on OpenGL has no f16 and no subgroups, so the lab "
              f"runs the portable path only, slowly; {VULKAN_FIX}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
