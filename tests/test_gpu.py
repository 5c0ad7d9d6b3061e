"""Choosing the adapter: what the lab refuses, and how it says so (fake adapters, no GPU work)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from rwkvlab import gpu
from rwkvlab.gpu import NoAdapterError


def fake_adapter(backend_type: str, adapter_type: str, compute: bool = True, device_error: str | None = None):
    limits = {"max-compute-invocations-per-workgroup": 256 if compute else 0,
              "max-storage-buffers-per-shader-stage": 8 if compute else 0}

    def request_device_sync(**_):
        raise RuntimeError(device_error)

    return SimpleNamespace(info={"backend_type": backend_type, "adapter_type": adapter_type, "device": "Fake GPU",
                                 "description": "fake"},
                           limits=limits, features=set(), request_device_sync=request_device_sync)


@pytest.fixture
def adapters(monkeypatch):
    """Replace the runtimes' adapter scan with the list this fixture returns (filled by each test)."""
    found: list = []
    monkeypatch.setattr(gpu, "_enumerate", lambda runtime: list(found))
    return found


def test_only_the_gpu_module_imports_a_webgpu_runtime():
    """One GPU runtime module: everything else reaches wgpu / wgpudawn through rwkvlab.gpu."""
    import re
    from pathlib import Path

    package = Path(gpu.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+(wgpu|wgpudawn)\b", re.MULTILINE)
    importers = sorted(p.name for p in package.rglob("*.py") if pattern.search(p.read_text()))
    assert importers == ["gpu.py"]


def test_vulkan_before_opengl_before_nothing(adapters):
    adapters += [fake_adapter("OpenGL", "DiscreteGPU"), fake_adapter("Vulkan", "CPU")]
    assert gpu._pick_adapter.__wrapped__("auto").info["backend_type"] == "Vulkan"
    assert gpu._pick_adapter.__wrapped__("gl").info["backend_type"] == "OpenGL"


def test_an_opengl_adapter_without_compute_shaders_is_refused_by_name(adapters):
    """Seen on an H200 with Vulkan hidden: the NVIDIA driver's EGL gives an OpenGL 3.3 context,
    which wgpu lists and then cannot make a compute device on."""
    adapters.append(fake_adapter("OpenGL", "Unknown", compute=False))
    with pytest.raises(NoAdapterError) as err:
        gpu._pick_adapter.__wrapped__("auto")
    message = str(err.value)
    assert "can run compute shaders" in message and "Fake GPU (gl, Unknown)" in message
    assert "mesa-vulkan-drivers" in message


def test_a_device_that_cannot_be_made_is_a_one_line_error(adapters, monkeypatch):
    bad = fake_adapter("OpenGL", "Unknown", device_error="Request device failed (3)\n\nCaused by:\n  lost")
    monkeypatch.setattr(gpu, "_pick_adapter", lambda backend, runtime="wgpu-native": bad)
    with pytest.raises(NoAdapterError) as err:
        gpu.get_gpu.__wrapped__("auto", native=False)
    message = str(err.value)
    assert "\n" not in message and "could not be created (Request device failed (3) Caused by: lost)" in message


def test_the_check_asks_for_a_vulkan_driver_when_opengl_cannot_compute(adapters, capsys, monkeypatch):
    """`python -m rwkvlab.gpu --check` (what scripts/setup.sh asks) exits 3 - install a Vulkan
    driver - when the only adapter is an OpenGL context without compute shaders."""
    adapters.append(fake_adapter("OpenGL", "Unknown", compute=False))
    monkeypatch.setattr(gpu, "_pick_adapter", gpu._pick_adapter.__wrapped__)  # no cached choice
    assert gpu.main(["--check"]) == 3
    assert "no usable adapter" in capsys.readouterr().err


# --- the load's staging ring ----------------------------------------------------------------


def _read_back(g, buffer, nbytes: int):
    import numpy as np

    out = g.device.create_buffer(size=nbytes, usage=gpu.MAP_READ | gpu.COPY_DST)
    enc = g.device.create_command_encoder()
    enc.copy_buffer_to_buffer(buffer, 0, out, 0, nbytes)
    g.device.queue.submit([enc.finish()])
    out.map_sync(gpu.MAP_MODE_READ)
    try:
        return np.frombuffer(out.read_mapped(), np.uint8).copy()
    finally:
        out.unmap()


@pytest.mark.parametrize("runtime", ["wgpu-native", "dawn"])
def test_the_staging_ring_puts_every_byte_where_it_was_asked(runtime):
    """Writes smaller than a slot, spanning slots and larger than the whole ring (so slots are
    mapped again after the GPU copied out of them), into two buffers out of order: every byte
    lands at its offset, and bytes never written stay zero."""
    import numpy as np

    g = gpu.get_gpu("auto", runtime=runtime)
    rng = np.random.default_rng(1)
    size = 4096
    dst = [g.device.create_buffer(size=size, usage=gpu.STORAGE | gpu.COPY_DST | gpu.COPY_SRC) for _ in range(2)]
    want = [np.zeros(size, np.uint8) for _ in dst]
    ring = gpu.StagingRing(g, slot_bytes=256, slots=2)
    for b, offset, n in [(0, 0, 40), (1, 1000, 300), (0, 2048, 1200), (1, 8, 4), (0, 100, 96), (1, 2000, 2096)]:
        data = rng.integers(0, 256, n, dtype=np.uint8)
        ring.write(dst[b], offset, data)
        want[b][offset:offset + n] = data
    ring.close()
    for b, w in zip(dst, want):
        np.testing.assert_array_equal(_read_back(g, b, size), w)


def test_the_staging_ring_refuses_unaligned_copies_by_size_and_offset():
    import numpy as np

    g = gpu.get_gpu("auto")
    dst = g.device.create_buffer(size=64, usage=gpu.STORAGE | gpu.COPY_DST)
    ring = gpu.StagingRing(g, slot_bytes=64, slots=1)
    with pytest.raises(ValueError, match="6 bytes at offset 0: WebGPU copies multiples of 4"):
        ring.write(dst, 0, np.zeros(6, np.uint8))
    with pytest.raises(ValueError, match="8 bytes at offset 2"):
        ring.write(dst, 2, np.zeros(8, np.uint8))
    with pytest.raises(ValueError, match="staging slots of 68 bytes x 2: need a multiple of 8"):
        gpu.StagingRing(g, slot_bytes=68, slots=2)
    ring.close()
