#!/usr/bin/env bash
# Bring a fresh machine to a working lab: a local virtual environment with the project
# installed (editable, with the lab and test extras), and a Vulkan driver if wgpu finds no
# Vulkan adapter. Safe to run again: it only reinstalls when pyproject.toml changed.
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

# wgpu needs an adapter, and the lab wants a Vulkan (or Metal / DX12) one: on OpenGL, WebGPU has
# no f16 and no subgroups, so only the portable kernel path runs, slowly, and the test suite's
# GPU-class checks expect lavapipe. `python -m rwkvlab.gpu --check` exits 1 with no adapter at
# all and 3 with only OpenGL (e.g. Mesa's llvmpipe on a desktop or container without a Vulkan
# driver); in both cases install Mesa's Vulkan driver, which brings lavapipe (software Vulkan)
# and the drivers for AMD and Intel GPUs.
check_status=0
"$VENV/bin/python" -m rwkvlab.gpu --check >/dev/null 2>&1 || check_status=$?
if [ "$check_status" -ne 0 ]; then
    case "$check_status" in
        3) why="wgpu finds only an OpenGL adapter (no f16, no subgroups: the slow portable path only)" ;;
        *) why="wgpu finds no WebGPU adapter at all" ;;
    esac
    if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: $why; installing Mesa's Vulkan driver (apt-get install mesa-vulkan-drivers: lavapipe, software Vulkan)" >&2
        sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        $sudo apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
    else
        echo "setup: $why; install a Vulkan driver for this system (Linux: Mesa's mesa-vulkan-drivers)" >&2
    fi
    check_status=0
    "$VENV/bin/python" -m rwkvlab.gpu --check >&2 || check_status=$?
    if [ "$check_status" -eq 1 ]; then
        echo "setup: still no WebGPU adapter; the engine cannot run. Install a Vulkan driver." >&2
        exit 1
    elif [ "$check_status" -ne 0 ]; then
        # VK_DRIVER_FILES / VK_ICD_FILENAMES pointed elsewhere also end here: the lab still works.
        echo "setup: still only OpenGL; the lab runs on it with --path auto (= webgpu), slowly" >&2
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
