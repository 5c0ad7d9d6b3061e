"""The WGSL sources of the engine, one file per kernel family (read by rwkvlab.kernels).

This folder is installed as the package ``rwkvlab.shaders`` (see pyproject.toml); the file
makes it a regular package so editable installs find it too.
"""
