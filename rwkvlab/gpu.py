"""Adapter, device and every call into a WebGPU implementation: the lab's one GPU runtime module.

Two implementations run the same engine (``Options.runtime``): wgpu-native through the `wgpu`
package and Google's Dawn through `wgpudawn` (the same Python API). This is the only module
that imports either; everything else gets a :class:`GPU` from :func:`gpu_for` / :func:`get_gpu`
and calls the helpers here for what differs between them:

- shader modules without runtime checks (:func:`shader_module`): wgpu-native's private
  ``wgpuDeviceCreateShaderModuleTrusted``; on Dawn the device toggles ``skip_validation`` and
  ``disable_robustness`` (asked for when the device is made, :func:`get_gpu`);
- WGSL ``enable`` lines (:func:`shader_preamble`): Tint wants ``enable subgroups;``, Naga none;
- fast encoding of a dispatch list (:func:`prepare_dispatches` / :func:`encode_prepared`):
  wgpu-native's C functions called directly; Dawn's public methods are already about as fast;
- work beside the calling thread at load (:func:`compute_pipeline`, :func:`beside`): wgpu-native's
  device is thread-safe, so pipelines compile on worker threads and weights upload on another;
  Dawn's is not, so pipelines go through ``create_compute_pipeline_async`` and the rest waits;
- timestamps inside a pass (:func:`write_timestamp`) and the tick length (:func:`timestamp_period`);
- feature names: :attr:`GPU.features` uses one spelling (``subgroup``,
  ``timestamp-query-inside-passes``, ``subgroup-matrix``) whatever the runtime calls them.

wgpu leaks when many devices are created, so each process gets one device per (runtime,
backend, features) choice, cached here.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rwkvlab.options import BACKENDS, RUNTIMES, Options, OptionsError, normalize_tuning, tuning_from_environment

# Options.backend -> the adapter's info["backend_type"] (both runtimes spell them alike)
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
# What Dawn needs on a machine without a GPU (Debian 12's lavapipe is too old for it).
DAWN_FIX = ("Dawn needs a Vulkan driver newer than Mesa 22 on a machine without a GPU (Mesa >= 24's lavapipe; "
            "`make setup` unpacks Debian bookworm-backports' into the virtual environment)")
# Features the native path uses where the adapter has them, in the lab's spelling. Not
# wgpu-native's "cooperative-matrix": wgpu marks it experimental and refuses a device that asks
# for it unless experimental features are enabled, which its C API cannot do (seen on an H100).
# Dawn's subgroup matrices are asked for on the native path where the adapter lists them.
NATIVE_FEATURES = ("shader-f16", "subgroup")
# Features every path asks for where available (per-kernel GPU timing).
COMMON_FEATURES = ("timestamp-query", "timestamp-query-inside-passes", "timestamp-query-inside-encoders")
# The lab's feature names -> each runtime's own (where they differ).
_FEATURE_NAMES = {
    "wgpu-native": {},
    "dawn": {"subgroup": "subgroups",
             "timestamp-query-inside-passes": "chromium-experimental-timestamp-query-inside-passes",
             "subgroup-matrix": "chromium-experimental-subgroup-matrix"},
}
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

# WebGPU's numbers for the flags the lab uses (the spec's bit values; both runtimes take them).
MAP_READ, MAP_WRITE, COPY_SRC, COPY_DST, UNIFORM, STORAGE, QUERY_RESOLVE = 0x1, 0x2, 0x4, 0x8, 0x40, 0x80, 0x200
MAP_MODE_READ, MAP_MODE_WRITE = 0x1, 0x2
COMPUTE_STAGE = 0x4
# Bind group layout entry types (Kernels.layouts), by the lab's binding kinds.
BINDING_TYPES = {"uniform": "uniform", "read": "read-only-storage", "rw": "storage"}


# The Python package each runtime comes in.
PACKAGES = {"wgpu-native": "wgpu", "dawn": "wgpudawn"}


def _api(runtime: str):
    """The runtime's wgpu-py module (imported on first use; Dawn's instance set up once)."""
    if runtime == "wgpu-native":
        import wgpu

        return wgpu
    if runtime == "dawn":
        return _dawn()
    raise OptionsError(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")


@functools.lru_cache(maxsize=None)
def _dawn():
    """wgpudawn with the instance the lab wants, set before its first adapter request:
    ``allow_unsafe_apis`` (timestamps inside passes, subgroup matrices), f16 on NVIDIA's Vulkan
    driver (Dawn blocks it there by default, and with it the f16 subgroup-matrix configs), and
    unquantized timestamps (else they snap to ~65 us)."""
    try:
        import wgpudawn
        from wgpudawn.backends.dawn import extras
    except ImportError as e:
        raise NoAdapterError(f"runtime 'dawn' needs the wgpudawn package ({e}); pip install wgpudawn, "
                             "or use --runtime wgpu-native") from None
    from rwkvlab.vulkan_drivers import dawn_loader_env, loader_env

    extras.set_instance_extras(enable_toggles=["allow_unsafe_apis", "vulkan_enable_f16_on_nvidia"],
                               disable_toggles=["timestamp_quantization"])
    # Dawn's Vulkan instance is made by its first adapter scan, and keeps the drivers it found:
    # the lavapipe `make setup` unpacked for it (where there is one) is added for that scan only,
    # so wgpu-native and subprocesses still see just the system's drivers.
    quiet_mesa_probe()
    with loader_env(dawn_loader_env()), _dawn_stderr():
        try:
            wgpudawn.gpu.enumerate_adapters_sync()
        except RuntimeError:
            pass  # no adapter: said by _pick_adapter, with what to install
    return wgpudawn


# Dawn's own (C++) warnings that every scan or device on a CPU Vulkan driver prints, about
# drivers it refuses or limits it trims; the lab needs none of them. Anything else is passed on.
_DAWN_NOISE = ("Vulkan shaderUniform", "While initializing adapter", "at InitializeImpl",
               "artificially reduced", "XDG_RUNTIME_DIR")


@contextlib.contextmanager
def _dawn_stderr():
    """Dawn's adapter scan and device creation, with its known noise taken out of stderr (it
    writes straight to file descriptor 2, so Python's own redirection cannot catch it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if line.strip() and not line.startswith("Warning: ")
                    and not any(n in line for n in _DAWN_NOISE)]
            # A warning we do not know is kept with its context lines.
            if any(line.startswith("Warning: ") and not any(n in line for n in _DAWN_NOISE) for line in lines):
                kept = [line for line in lines if line.strip()]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def installed_runtimes() -> list[str]:
    """The runtimes whose package imports on this machine (no adapter is asked for)."""
    import importlib.util

    return [r for r in RUNTIMES if importlib.util.find_spec(PACKAGES[r])]


def available_runtimes() -> list[str]:
    """The runtimes that are installed and find an adapter here (the panel offers these)."""
    return [r for r in installed_runtimes() if list_adapters(r)]


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
    """A device and what it can do.

    features: what the device was made with, in the lab's spelling (see the module docstring);
    subgroup_matrix_configs: Dawn's subgroup-matrix shapes when the device has them, each a
    dict as Dawn reports it (on an H200: m, n, k, component_type, result_component_type,
    min_subgroup_size, max_subgroup_size; kernels.choose_sgmat_config reads it) (empty otherwise).
    """

    adapter: object
    device: object
    info: AdapterInfo
    features: frozenset[str]
    limits: dict
    runtime: str = "wgpu-native"
    subgroup_matrix_configs: tuple = field(default=(), compare=False)

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


def _enumerate(runtime: str) -> list:
    """The runtime's adapters (Dawn's Null backend, which runs nothing, left out)."""
    quiet_mesa_probe()
    try:
        found = list(_api(runtime).gpu.enumerate_adapters_sync())
    except (RuntimeError, NoAdapterError):
        return []
    return [a for a in found if a.info.get("backend_type") != "Null"]


def list_adapters(runtime: str = RUNTIMES[0]) -> list[AdapterInfo]:
    """Every adapter the runtime can see on this machine (empty when there is none)."""
    return [_info(a) for a in _enumerate(runtime)]


def available_backends(runtime: str = RUNTIMES[0]) -> list[str]:
    """Options.backend values this machine can run (always including ``auto`` if any)."""
    found = sorted({a.backend for a in list_adapters(runtime)})
    return (["auto"] + found) if found else []


# Where each chosen adapter stood in its runtime's scan (for _unused_twin).
_SCAN_INDEX: dict[int, int] = {}


@functools.lru_cache(maxsize=None)
def _pick_adapter(backend: str, runtime: str = RUNTIMES[0]):
    """The adapter ``backend`` names (the best one for ``auto``) on ``runtime``; one choice per
    process, so resolving options and making the device always agree."""
    if backend not in BACKENDS:
        raise OptionsError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if runtime not in RUNTIMES:
        raise OptionsError(f"unknown runtime {runtime!r}; available: {', '.join(RUNTIMES)}")
    scanned = _enumerate(runtime)
    chosen = _choose_adapter(backend, runtime, scanned)
    _SCAN_INDEX[id(chosen)] = next((i for i, a in enumerate(scanned) if a is chosen), 0)
    return chosen


def _choose_adapter(backend: str, runtime: str, adapters: list):
    if runtime == "dawn" and not adapters:
        raise NoAdapterError(f"runtime 'dawn' finds no adapter on this machine; {DAWN_FIX}; "
                             "or use --runtime wgpu-native")
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
        have = available_backends(runtime)
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

    ``path="auto"`` becomes ``native`` where the adapter that ``options.runtime`` and
    ``options.backend`` pick has f16 or subgroups and ``webgpu`` otherwise; an empty tuning takes
    ``$RWKVLAB_TUNING`` where set; everything else is kept. A runtime, backend or path asked
    for explicitly that this machine cannot run raises (:class:`NoAdapterError` /
    :class:`OptionsError`) with the flag to change and what to install. The engine, bench,
    profile, panel worker and sweeps all resolve through here, and records hold the result.
    """
    options = tuning_from_environment(options or Options())
    adapter = _pick_adapter(options.backend, options.runtime)
    native = has_native_features(_lab_features(options.runtime, adapter.features))
    if options.path == "auto":
        return options.with_(path="native" if native else "webgpu")
    if options.path == "native" and not native:
        label = _info(adapter).label
        raise OptionsError(
            f"path 'native' needs one of {', '.join(NATIVE_FEATURES)}; adapter {label} has none of them; "
            f"available paths: webgpu. Use --path webgpu or --path auto (Options(path='webgpu'|'auto')), "
            f"or {VULKAN_FIX}")
    return options


def _lab_features(runtime: str, features) -> frozenset[str]:
    """An adapter's or device's features in the lab's spelling."""
    own = {theirs: ours for ours, theirs in _FEATURE_NAMES[runtime].items()}
    return frozenset(own.get(str(f), str(f)) for f in features)


def gpu_for(options: Options) -> "GPU":
    """The device resolved ``options`` run on (:func:`resolve_options` first)."""
    native = options.path == "native"
    unchecked = native and "trusted=0" not in normalize_tuning(options.tuning).split(",")
    return get_gpu(options.backend, native=native, runtime=options.runtime, unchecked=unchecked)


@functools.lru_cache(maxsize=None)
def get_gpu(backend: str = "auto", native: bool = False, runtime: str = RUNTIMES[0],
            unchecked: bool | None = None) -> GPU:
    """The process's device for this runtime and backend; ``native`` also enables f16 and
    subgroups (and Dawn's subgroup matrices). ``unchecked`` (default: ``native``) drops the
    runtime's bounds checks where that is a device setting (Dawn's ``skip_validation`` and
    ``disable_robustness``; wgpu-native does it per shader module, :func:`shader_module`)."""
    adapter = _pick_adapter(backend, runtime)
    if runtime == "dawn":
        adapter = _unused_twin(adapter)
    unchecked = native if unchecked is None else unchecked
    have = _lab_features(runtime, adapter.features)
    wanted = COMMON_FEATURES + (NATIVE_FEATURES + ("subgroup-matrix",) if native else ())
    features = [f for f in wanted if f in have]
    names = [_FEATURE_NAMES[runtime].get(f, f) for f in features]
    limits = {k: adapter.limits[k] for k in _LIMITS if k in adapter.limits}
    try:
        if runtime == "dawn":
            from wgpudawn.backends.dawn import extras

            toggles = ["skip_validation", "disable_robustness"] if unchecked else []
            with _dawn_stderr():
                device = extras.request_device_sync(adapter, required_features=names, required_limits=limits,
                                                    enable_toggles=toggles)
        else:
            device = adapter.request_device_sync(required_features=names, required_limits=limits)
    except Exception as err:  # wgpu raises RuntimeError with several lines of causes
        raise NoAdapterError(f"the device of {_info(adapter).label} could not be created "
                             f"({' '.join(str(err).split())}); {VULKAN_FIX}") from None
    configs = _subgroup_matrix_configs(adapter) if "subgroup-matrix" in features else ()
    return GPU(adapter, device, _info(adapter), frozenset(features), limits, runtime, configs)


def _unused_twin(adapter):
    """A Dawn adapter makes one device only ("adapter is consumed"): the same adapter again,
    fresh from a new scan (found by its place in the list), for each device after the first."""
    fresh = _enumerate("dawn")
    index = _SCAN_INDEX.get(id(adapter), -1)
    if 0 <= index < len(fresh) and fresh[index].info == adapter.info:
        return fresh[index]
    return next((a for a in fresh if a.info == adapter.info), adapter)


def _subgroup_matrix_configs(adapter) -> tuple:
    """Dawn's subgroup-matrix shapes of an adapter, as plain dicts (m, n, k, component_type,
    result_component_type), from its adapter properties."""
    from wgpudawn.backends.dawn import extras

    configs = extras.get_adapter_properties(adapter).get("subgroup_matrix_configs") or ()
    return tuple(dict(c) for c in configs)


# ----------------------------------------------------------------------------------------------
# What differs between the runtimes, for the kernels, benches and profiler


def shader_module(gpu: GPU, label: str, code: str, trusted: bool):
    """A compiled WGSL module. ``trusted`` drops the runtime's bounds checks: no index clamping
    in inner loops and no loop-bounding counter, which can keep the driver from unrolling the
    loops whose register arrays (wkv's state row, gemm's accumulators) must stay in registers.
    On wgpu-native that is its private ``wgpuDeviceCreateShaderModuleTrusted``; on Dawn the
    device already has ``disable_robustness`` (:func:`get_gpu`), so the module is a plain one.
    Our kernels index in range by construction; the tests run both paths, so an out-of-range
    index shows as wrong output."""
    if not trusted or gpu.runtime != "wgpu-native":
        return gpu.device.create_shader_module(label=label, code=code)
    from wgpu.backends.wgpu_native import _api
    from wgpu.backends.wgpu_native._ffi import ffi, lib

    no_checks = 0  # WGPUShaderRuntimeChecks_None
    source = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(code))
    source[0].chain.next = ffi.NULL
    source[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
    desc = _api.new_struct_p("WGPUShaderModuleDescriptor *",
                             nextInChain=ffi.cast("WGPUChainedStruct *", source),
                             label=_api.to_c_string_view(label))
    # libf (not lib) turns the device's validation errors into exceptions, as wgpu-py does.
    handle = _api.libf.wgpuDeviceCreateShaderModuleTrusted(gpu.device._internal, desc, no_checks)
    if handle == ffi.NULL:
        raise RuntimeError(f"wgpu-native returned no shader module for {label}")
    return _api.GPUShaderModule(label, handle, gpu.device)


def shader_preamble(gpu: GPU, *extensions: str) -> str:
    """The WGSL ``enable`` lines a module using ``extensions`` (``subgroups``, ``f16``,
    ``subgroup_matrix``) needs on this runtime: Tint requires them, Naga (wgpu-native 29)
    rejects ``enable subgroups;`` and needs none."""
    if gpu.runtime != "dawn":
        return ""
    names = {"subgroups": "subgroups", "f16": "f16",
             "subgroup_matrix": "chromium_experimental_subgroup_matrix"}
    return "".join(f"enable {names[e]};\n" for e in extensions)


# ----------------------------------------------------------------------------------------------
# Work beside the calling thread: at load, pipelines compile while the weights upload


def threads_share_device(gpu: GPU) -> bool:
    """Whether several threads may call the device at once. wgpu-native's device and queue are
    thread-safe (wgpu-core locks inside; wgpu-py captures errors per thread), and cffi releases
    the GIL during each C call, so pipelines compile on worker threads while another thread
    writes buffers. Dawn's device is not, unless made with its ``implicit-device-synchronization``
    feature, which puts every call behind one lock (nothing would overlap); there pipelines use
    WebGPU's own ``create_compute_pipeline_async`` (Dawn compiles on its worker threads, as a
    browser does) and everything else stays on the calling thread."""
    return gpu.runtime == "wgpu-native"


# Pipelines compiling at once on wgpu-native: the driver compiles each on the thread that asks.
COMPILE_THREADS = max(2, min(8, os.cpu_count() or 2))
# Load work beside the calling thread (compute_pipeline, beside). Off, every pipeline compiles
# when asked for and other work runs when its result is asked for, all on the calling thread:
# to compare, or to rule the threads out (tests compare both ways).
BESIDE = True


class Pending:
    """Work started by :func:`compute_pipeline` or :func:`beside`. :meth:`result` waits for it
    and returns its value or raises what it raised (to every caller, like a Future).
    ``submitted``, ``started`` and ``ready`` are ``time.perf_counter()`` readings: when it was
    asked for, when a thread began it (None where the runtime does it out of sight: Dawn's
    pipelines) and when it finished (work on a thread notes that itself; otherwise it is when
    :meth:`result` first saw it done); ``cpu_seconds`` is the CPU time its thread spent on it
    (waiting for a lock costs none). Waited for from one thread."""

    def __init__(self, wait: Callable[[], object] | None, deferred: bool = False) -> None:
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.ready: float | None = None
        self.cpu_seconds: float | None = None
        self._wait = wait
        self._deferred = deferred  # `wait` is the work itself, run by the first result()
        self._value: object = None
        self._error: BaseException | None = None

    def result(self):
        if self._wait is not None:
            wait, self._wait = self._wait, None
            if self._deferred:
                self.started = time.perf_counter()
            try:
                self._value = wait()
            except BaseException as e:
                self._error = e
            if self.ready is None:
                self.ready = time.perf_counter()
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def failed(self) -> bool:
        """Whether it was waited for and raised."""
        return self._wait is None and self._error is not None

    def discard(self) -> None:
        """Let go of the work: deferred work never runs; work on a thread is waited for (it must
        not outlive what it writes to), its result or error dropped."""
        if self._deferred:
            self._wait = None
            return
        with contextlib.suppress(BaseException):
            self.result()


def _on_thread(submit: Callable, fn: Callable[[], object]) -> Pending:
    pending = Pending(None)

    def job():
        pending.started, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn()
        finally:
            pending.ready, pending.cpu_seconds = time.perf_counter(), time.thread_time() - cpu

    pending._wait = submit(job).result
    return pending


def _now(job: Callable[[], object]) -> Future:
    """`job` run on the calling thread, as a finished Future (the submit of BESIDE = False)."""
    future: Future = Future()
    try:
        future.set_result(job())
    except Exception as e:
        future.set_exception(e)
    return future


@functools.lru_cache(maxsize=None)
def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"rwkvlab-{name}")


def compute_pipeline(gpu: GPU, *, label: str, layout, module, entry_point: str, constants: dict) -> Pending:
    """A compute pipeline, compiling beside the caller: on a worker thread on wgpu-native
    (COMPILE_THREADS at once), through WebGPU's ``create_compute_pipeline_async`` on Dawn; here
    and now with BESIDE off. :meth:`Pending.result` raises the runtime's error for a pipeline
    that does not build."""
    compute = {"module": module, "entry_point": entry_point, "constants": constants}
    if not BESIDE or threads_share_device(gpu):
        submit = _pool("compile", COMPILE_THREADS).submit if BESIDE else _now
        return _on_thread(submit, lambda: gpu.device.create_compute_pipeline(label=label, layout=layout,
                                                                               compute=compute))
    return Pending(gpu.device.create_compute_pipeline_async(label=label, layout=layout, compute=compute).sync_wait)


def beside(gpu: GPU, fn: Callable[[], object]) -> Pending:
    """Run ``fn`` (work that calls the device, such as writing the weights) on a thread of its
    own where the runtime allows several threads (:func:`threads_share_device`); elsewhere on
    the calling thread, when its result is first asked for."""
    if BESIDE and threads_share_device(gpu):
        return _on_thread(_pool("beside", 4).submit, fn)
    return Pending(fn, deferred=True)


class StagingRing:
    """Host bytes into device buffers through a few reusable staging buffers (the load's weights).

    ``queue.write_buffer`` makes a fresh staging buffer for every call and frees it once the
    GPU has copied from it: on Dawn that ran a 2.9B Q8_0 upload from memory at 2.9 GB/s, this
    ring at 9 GB/s (wgpu-native: 7.5 and 8.4; H200, docs/perf-notes.md). ``slots`` buffers of
    ``slot_bytes`` (MAP_WRITE | COPY_SRC) are made once and cycled: :meth:`write` copies data
    into the mapped slot, and a full slot is unmapped, its copies encoded and submitted, and
    the next slot mapped (waiting, if need be, for the GPU to have copied out of it).
    :meth:`flush` submits what is packed; :meth:`close` flushes and lets the slots go. Sizes
    and offsets are multiples of 4 (WebGPU's copy alignment); each piece starts 8-byte aligned
    in its slot (a mapped range's offset must be). The copy into a slot is NumPy's, which lets
    go of the GIL (wgpu-py's write_mapped copies holding it, stalling the threads that prepare
    the next slices) where the runtime hands out the mapped range itself. One thread at a time."""

    def __init__(self, gpu: GPU, slot_bytes: int = 16 << 20, slots: int = 3) -> None:
        if slot_bytes % 8 or slots < 1:
            raise ValueError(f"staging slots of {slot_bytes} bytes x {slots}: need a multiple of 8 and at least one")
        self._device = gpu.device
        self.slot_bytes = slot_bytes
        self._slots = [gpu.device.create_buffer(label=f"staging:{i}", size=slot_bytes,
                                                usage=MAP_WRITE | COPY_SRC, mapped_at_creation=True)
                       for i in range(slots)]
        self._mapped = [True] * slots
        self._slot = 0  # the slot being packed
        self._used = 0  # bytes packed into it
        self._copies: list[tuple] = []  # (slot offset, destination, destination offset, bytes)

    def write(self, buffer, offset: int, data) -> None:
        """Copy ``data`` (a contiguous array or bytes) to ``buffer`` at byte ``offset``."""
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        if offset % 4 or src.nbytes % 4:
            raise ValueError(f"staging copy of {src.nbytes} bytes at offset {offset}: WebGPU copies "
                             "multiples of 4 bytes at offsets that are multiples of 4")
        done = 0
        while done < src.nbytes:
            if self._used >= self.slot_bytes:
                self.flush()
            n = min(src.nbytes - done, self.slot_bytes - self._used)
            slot = self._slots[self._slot]
            if not self._mapped[self._slot]:
                slot.map_sync(MAP_MODE_WRITE)
                self._mapped[self._slot] = True
            mapped_range = getattr(slot, "_experimental_get_mapped_range", None)
            if mapped_range is not None:  # both runtimes' wgpu-py have it (0.32); a view valid until unmap
                np.copyto(np.frombuffer(mapped_range(self._used, n), np.uint8), src[done:done + n])
            else:
                slot.write_mapped(src[done:done + n], self._used)
            self._copies.append((self._used, buffer, offset + done, n))
            self._used += -(-n // 8) * 8
            done += n

    def flush(self) -> None:
        """Submit the copies packed so far and move to the next slot."""
        if not self._copies:
            return
        slot = self._slots[self._slot]
        slot.unmap()
        self._mapped[self._slot] = False
        enc = self._device.create_command_encoder()
        for src_offset, buffer, offset, n in self._copies:
            enc.copy_buffer_to_buffer(slot, src_offset, buffer, offset, n)
        self._device.queue.submit([enc.finish()])
        self._copies.clear()
        self._slot = (self._slot + 1) % len(self._slots)
        self._used = 0

    def close(self) -> None:
        """Flush, then let the slots go (the runtime frees each once the GPU has copied from it)."""
        self.flush()
        for slot, mapped in zip(self._slots, self._mapped):
            if mapped:
                slot.unmap()
        self._slots.clear()


# Encode wgpu-native dispatch lists through its C functions (tests switch it off to compare).
FAST_ENCODE = True


@dataclass(frozen=True)
class PreparedDispatches:
    """A dispatch list ready to encode (:func:`prepare_dispatches`): the (pipeline, bind group,
    x, y, z) objects, and on wgpu-native also their raw C handles."""

    objects: tuple
    handles: tuple | None


def _is_wgpu_native(obj) -> bool:
    return type(obj).__module__.startswith("wgpu.backends.wgpu_native")


def prepare_dispatches(items) -> PreparedDispatches:
    """``items``: (pipeline, bind group, (x, y, z)) triples, prepared once for
    :func:`encode_prepared`. On wgpu-native the raw C handles are taken here, so encoding a step
    skips wgpu-py's per-call wrapping (~2 us per dispatch instead of ~4 us: its set_bind_group
    allocates a cffi array for dynamic offsets on every call). Dawn's public methods already
    encode in about 1 us (dawn-notes.md), so it keeps the objects only."""
    objects = tuple((pipe, bg, *wg) for pipe, bg, wg in items)
    handles = None
    if objects and _is_wgpu_native(objects[0][0]):
        handles = tuple((pipe._internal, bg._internal, x, y, z) for pipe, bg, x, y, z in objects)
    return PreparedDispatches(objects, handles)


def encode_prepared(compute_pass, prepared: PreparedDispatches) -> None:
    """Record prepared dispatches into an open compute pass (the pipeline is set only when it
    changes). The wgpu-native calls and their arguments are exactly what wgpu-py's methods pass
    on; tests/test_engine.py compares both ways."""
    if FAST_ENCODE and prepared.handles is not None and _is_wgpu_native(compute_pass):
        from wgpu.backends.wgpu_native._ffi import ffi, lib

        set_pipeline = lib.wgpuComputePassEncoderSetPipeline
        set_bind_group = lib.wgpuComputePassEncoderSetBindGroup
        dispatch = lib.wgpuComputePassEncoderDispatchWorkgroups
        handle, null, current = compute_pass._internal, ffi.NULL, None
        for pipeline, bind_group, x, y, z in prepared.handles:
            if pipeline != current:
                set_pipeline(handle, pipeline)
                current = pipeline
            set_bind_group(handle, 0, bind_group, 0, null)
            dispatch(handle, x, y, z)
        return
    current = None
    for pipeline, bind_group, x, y, z in prepared.objects:
        if pipeline is not current:
            compute_pass.set_pipeline(pipeline)
            current = pipeline
        compute_pass.set_bind_group(0, bind_group)
        compute_pass.dispatch_workgroups(x, y, z)


def write_timestamp(gpu: GPU, compute_pass, query_set, index: int) -> None:
    """A timestamp between two dispatches of a pass (needs ``timestamp-query-inside-passes``)."""
    if gpu.runtime == "dawn":
        from wgpudawn.backends.dawn.extras import write_timestamp as write
    else:
        from wgpu.backends.wgpu_native.extras import write_timestamp as write
    write(compute_pass, query_set, index)


def timestamp_period(gpu: GPU) -> float:
    """Nanoseconds per timestamp tick: both runtimes convert timestamps to nanoseconds (wgpu
    since v25, Dawn by default), but wgpu-native still reports the queue's period; 1.0 where
    it cannot be asked."""
    if gpu.runtime != "wgpu-native":
        return 1.0
    try:
        from wgpu.backends.wgpu_native._ffi import lib

        return float(lib.wgpuQueueGetTimestampPeriod(gpu.device.queue._internal))
    except Exception:  # an older wgpu-native: ticks are nanoseconds there
        return 1.0


def environment(gpu: GPU) -> dict[str, str]:
    """Where a run ran, for its record (like asv's machine.json): the adapter, its driver, the
    WebGPU implementation and its versions, Python and the OS."""
    from importlib.metadata import PackageNotFoundError, version

    package = PACKAGES[gpu.runtime]
    try:
        package_version = version(package)
    except PackageNotFoundError:
        package_version = "unknown"
    env = {"gpu": gpu.info.name, "backend": gpu.info.backend, "adapter_type": gpu.info.adapter_type,
           "driver": gpu.info.description, "runtime": gpu.runtime, package: package_version}
    if gpu.runtime == "wgpu-native":
        try:
            from wgpu.backends.wgpu_native import lib_version_info
            env["wgpu_native"] = ".".join(map(str, lib_version_info))
        except ImportError:
            env["wgpu_native"] = "unknown"
    return {**env, "python": platform.python_version(), "os": platform.platform(), "machine": platform.machine()}


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkvlab.gpu [--check]``: list the adapters and what ``auto`` would pick."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m rwkvlab.gpu",
        description="List the WebGPU adapters wgpu finds and the options the defaults resolve to.")
    ap.add_argument("--runtime", default=RUNTIMES[0], choices=RUNTIMES,
                    help=f"the WebGPU implementation to ask (default: {RUNTIMES[0]})")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when there is no adapter, 3 when there is only OpenGL (scripts/setup.sh "
                    "then installs a Vulkan driver)")
    args = ap.parse_args(argv)
    adapters = list_adapters(args.runtime)
    for a in adapters:
        print(a.label, "-", a.description)
    if not adapters:
        fix = DAWN_FIX if args.runtime == "dawn" else VULKAN_FIX
        print(f"no WebGPU adapter found by {args.runtime}; {fix}", file=sys.stderr)
        return 1
    only_gl = all(a.backend == "gl" for a in adapters)
    try:
        resolved = resolve_options(Options(runtime=args.runtime))
    except (NoAdapterError, OptionsError) as err:  # e.g. an OpenGL context without compute shaders
        print(f"no usable adapter: {err}", file=sys.stderr)
        return 3 if only_gl else 1
    print(f"defaults: runtime={args.runtime}, backend=auto -> {_info(_pick_adapter('auto', args.runtime)).label}, "
          f"path=auto -> {resolved.path}")
    if args.check and only_gl:
        print("only an OpenGL adapter: WebGPU on OpenGL has no f16 and no subgroups, so the lab "
              f"runs the portable path only, slowly; {VULKAN_FIX}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
