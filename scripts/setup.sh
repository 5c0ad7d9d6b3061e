#!/usr/bin/env bash
# Bring a fresh machine to a working lab: a local virtual environment with the project
# installed (editable, with the lab and test extras), and a Vulkan driver if wgpu finds no
# adapter. Safe to run again: it only reinstalls when pyproject.toml changed.
#
# Environment: VENV (default .venv), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.rwkvlab-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing rwkvlab and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[lab,test]'
    touch "$stamp"
fi

# wgpu needs some adapter. On a machine without a GPU that is Mesa's lavapipe (software
# Vulkan); install it when nothing is found and apt-get is available.
if ! "$VENV/bin/python" -m rwkvlab.gpu --check >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "setup: no WebGPU adapter found; installing Mesa's lavapipe (mesa-vulkan-drivers)" >&2
        sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
    fi
    if ! "$VENV/bin/python" -m rwkvlab.gpu --check; then
        echo "setup: still no WebGPU adapter; GPU tests will fail. Install a Vulkan driver." >&2
        exit 1
    fi
fi

# The browser test (tests/test_browser.py) drives Debian's Chromium through Playwright, whose
# Python package is only the driver: the browser comes from apt, never from `playwright install`.
if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian's chromium for the browser test" >&2
        sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    else
        echo "setup: /usr/bin/chromium is missing and there is no apt-get; tests/test_browser.py will fail" >&2
    fi
fi
