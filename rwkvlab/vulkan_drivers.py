"""A private Vulkan driver for Dawn, found without importing any GPU library.

Dawn (the ``wgpudawn`` runtime) refuses the lavapipe of Debian 12's Mesa 22.3 ("Vulkan
shaderUniform*ArrayDynamicIndexing required"), so on a machine without a GPU it finds no adapter
at all. Mesa 25's lavapipe (Debian's bookworm-backports) works, but installing it system-wide
would replace the Mesa 22.3 that wgpu-native runs on and that the OpenGL test needs. So
``scripts/setup.sh`` unpacks only that driver into the virtual environment
(``<venv>/mesa-backports/``) and writes an ICD file with an absolute ``library_path``; the Vulkan
loader reads it when told to by ``VK_ADD_DRIVER_FILES`` (or ``VK_DRIVER_FILES``).

The loader reads those variables each time an instance is created, not once per process: set
them while Dawn creates its instance (its first ``request_adapter`` / ``enumerate_adapters``)
and restore them straight after. Dawn keeps the drivers it found; wgpu-native, and every
subprocess, still sees only the system's list (left set, wgpu-native would list both lavapipes
and renumber ``$RWKVLAB_ADAPTER``). Both Mesa versions can be loaded in one process: each
driver is opened by its absolute path.

This module imports neither ``wgpu`` nor ``wgpudawn`` so that the GPU module can ask it before
either creates an instance.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

# Path of an ICD file to use instead of the venv's; set but empty turns the private driver off.
ICD_ENV = "RWKVLAB_DAWN_ICD"
# Where scripts/setup.sh puts the driver and its ICD file, relative to the venv (sys.prefix).
PRIVATE_DIR = "mesa-backports"
ICD_FILE = "lvp_icd.json"


def dawn_driver_files(environ: Mapping[str, str] | None = None, prefix: str | None = None) -> str | None:
    """The private ICD file for Dawn, or None when there is none.

    ``$RWKVLAB_DAWN_ICD`` wins when set (None if it names no file; empty means "none");
    otherwise ``<sys.prefix>/mesa-backports/lvp_icd.json`` if scripts/setup.sh wrote it.
    """
    environ = os.environ if environ is None else environ
    if ICD_ENV in environ:
        chosen = environ[ICD_ENV]
        return str(Path(chosen).absolute()) if chosen and Path(chosen).is_file() else None
    path = Path(sys.prefix if prefix is None else prefix) / PRIVATE_DIR / ICD_FILE
    return str(path) if path.is_file() else None


def dawn_loader_env(environ: Mapping[str, str] | None = None, prefix: str | None = None) -> dict[str, str]:
    """The Vulkan loader variables to set while Dawn creates its instance; {} when no private driver.

    ``VK_ADD_DRIVER_FILES`` adds the driver and keeps the system's (a real GPU stays visible, and
    Dawn prefers it to a CPU adapter). The loader ignores that variable when ``VK_DRIVER_FILES``
    or the older ``VK_ICD_FILENAMES`` is set, so then the driver is appended to that list.
    """
    environ = os.environ if environ is None else environ
    icd = dawn_driver_files(environ, prefix)
    if icd is None:
        return {}
    for name in ("VK_DRIVER_FILES", "VK_ICD_FILENAMES", "VK_ADD_DRIVER_FILES"):
        if environ.get(name):
            files = environ[name].split(os.pathsep)
            return {} if icd in files else {name: os.pathsep.join([*files, icd])}
    return {"VK_ADD_DRIVER_FILES": icd}


@contextlib.contextmanager
def loader_env(variables: Mapping[str, str]) -> Iterator[None]:
    """Set ``variables`` in ``os.environ`` for the block, then restore what was there (or unset)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
