"""rwkvlab: a performance lab for an RWKV-7 engine in Python and WGSL on wgpu.

Import cost matters (the history tools run without a GPU), so the engine is imported lazily:
`rwkvlab.load(path)` pulls in wgpu only when called.
"""
from __future__ import annotations

from rwkvlab.options import Options

__all__ = ["Options", "load"]
__version__ = "0.1.0"


def load(path, options: Options | None = None, progress: bool = True):
    """Load a GGUF file (or a preset name such as ``"tiny"``) onto the GPU; returns an Engine."""
    from rwkvlab.engine import load as _load

    return _load(path, options, progress=progress)
