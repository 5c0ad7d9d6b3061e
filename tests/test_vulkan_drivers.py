"""The private Vulkan driver for Dawn is found, overridden and handed to the loader without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvlab.vulkan_drivers import ICD_ENV, dawn_driver_files, dawn_loader_env, loader_env


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A venv folder where scripts/setup.sh has written the private driver's ICD file."""
    icd = tmp_path / "mesa-backports" / "lvp_icd.json"
    icd.parent.mkdir()
    icd.write_text('{"file_format_version": "1.0.0", "ICD": {"library_path": "/x/libvulkan_lvp.so"}}')
    return tmp_path


def test_found_in_the_venv(venv: Path):
    assert dawn_driver_files({}, prefix=str(venv)) == str(venv / "mesa-backports" / "lvp_icd.json")


def test_missing_is_none(tmp_path: Path):
    assert dawn_driver_files({}, prefix=str(tmp_path)) is None
    assert dawn_loader_env({}, prefix=str(tmp_path)) == {}


def test_default_prefix_is_sys_prefix(monkeypatch, venv: Path):
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.delenv(ICD_ENV, raising=False)
    assert dawn_driver_files() == str(venv / "mesa-backports" / "lvp_icd.json")


def test_env_override_wins(venv: Path, tmp_path: Path):
    other = tmp_path / "elsewhere.json"
    other.write_text("{}")
    assert dawn_driver_files({ICD_ENV: str(other)}, prefix=str(venv)) == str(other)
    # Naming a file that is not there, or nothing, turns the driver off instead of falling back.
    assert dawn_driver_files({ICD_ENV: str(tmp_path / "gone.json")}, prefix=str(venv)) is None
    assert dawn_driver_files({ICD_ENV: ""}, prefix=str(venv)) is None


def test_loader_env_adds_or_appends(venv: Path):
    icd = str(venv / "mesa-backports" / "lvp_icd.json")
    assert dawn_loader_env({}, prefix=str(venv)) == {"VK_ADD_DRIVER_FILES": icd}
    # The loader ignores VK_ADD_DRIVER_FILES when a replacing list is set: append to that one.
    assert dawn_loader_env({"VK_DRIVER_FILES": "/a.json"}, prefix=str(venv)) == {
        "VK_DRIVER_FILES": "/a.json" + os.pathsep + icd}
    assert dawn_loader_env({"VK_ICD_FILENAMES": "/a.json"}, prefix=str(venv)) == {
        "VK_ICD_FILENAMES": "/a.json" + os.pathsep + icd}
    assert dawn_loader_env({"VK_ADD_DRIVER_FILES": "/b.json"}, prefix=str(venv)) == {
        "VK_ADD_DRIVER_FILES": "/b.json" + os.pathsep + icd}
    assert dawn_loader_env({"VK_DRIVER_FILES": icd}, prefix=str(venv)) == {}


def test_loader_env_restores(monkeypatch):
    monkeypatch.setenv("VK_DRIVER_FILES", "/before.json")
    monkeypatch.delenv("VK_ADD_DRIVER_FILES", raising=False)
    with loader_env({"VK_DRIVER_FILES": "/during.json", "VK_ADD_DRIVER_FILES": "/x.json"}):
        assert os.environ["VK_DRIVER_FILES"] == "/during.json"
        assert os.environ["VK_ADD_DRIVER_FILES"] == "/x.json"
    assert os.environ["VK_DRIVER_FILES"] == "/before.json"
    assert "VK_ADD_DRIVER_FILES" not in os.environ


def test_imports_no_gpu_library():
    code = ("import sys, rwkvlab.vulkan_drivers; "
            "sys.exit(bool({'wgpu', 'wgpudawn'} & set(sys.modules)))")
    subprocess.run([sys.executable, "-c", code], check=True)
