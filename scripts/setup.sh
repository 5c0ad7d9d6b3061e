#!/usr/bin/env bash
# Bring a fresh machine to a working lab: a local virtual environment with the project
# installed (editable, with the lab and test extras), a Vulkan driver if wgpu finds no
# Vulkan adapter, and a private Mesa lavapipe in the venv if Dawn finds no adapter (Debian 12).
# Safe to run again: it only reinstalls when pyproject.toml changed.
#
# Environment: VENV (default .venv), PYTHON (default python3), DEBIAN_MIRROR (where Dawn's
# lavapipe comes from; default http://deb.debian.org/debian).
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

# Dawn (--runtime dawn, through wgpudawn) refuses older lavapipes: on Debian 12, Mesa 22.3's says
# "shaderUniform*ArrayDynamicIndexing required" and Dawn finds no adapter at all. Mesa 25's lavapipe
# from bookworm-backports works, but installing it would replace the system Mesa that wgpu-native
# runs on and the OpenGL test needs. So only that one driver is unpacked into the venv
# ($VENV/mesa-backports/), with an ICD file naming it by absolute path: rwkvlab.vulkan_drivers
# finds it, and rwkvlab.gpu hands it to the Vulkan loader while Dawn makes its instance. apt runs
# on a private source list and cache (no root, nothing added to /etc/apt). The driver links
# against libraries mesa-vulkan-drivers 22.3 already brought (LLVM 15, libdrm, xcb); any missing
# are installed from the system's own release, never upgrading or removing a package.
dawn_check() { "$VENV/bin/python" -m rwkvlab.gpu --check --runtime dawn >/dev/null 2>&1; }

# Install the packages of $1's Depends that are missing, from the system's release (root or sudo).
install_missing_deps() {
    local deb=$1 sudo="" deps plan new
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    if [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; then
        echo "setup: installing them needs root; run as root: apt-get install --no-upgrade <the packages that hold them>" >&2
        return 1
    fi
    # "libfoo (>= 1), libbar | libbaz" -> libfoo libbar (the first of each alternative)
    deps=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/[[:space:]]//g' | grep -v '^$')
    $sudo apt-get update -qq >/dev/null || return 1
    # shellcheck disable=SC2086
    plan=$(LC_ALL=C $sudo apt-get install -s --no-upgrade $deps 2>&1) || { echo "$plan" >&2; return 1; }
    if echo "$plan" | grep -Eq '^(Inst [^ ]+ \[|Remv )'; then
        echo "setup: refusing: installing them would upgrade or remove installed packages:" >&2
        echo "$plan" | grep -E '^(Inst [^ ]+ \[|Remv )' >&2
        return 1
    fi
    new=$(echo "$plan" | awk '/^Inst / {print $2}' | tr '\n' ' ')
    if [ -z "$new" ]; then
        echo "setup: every package it depends on is installed already" >&2
        return 1
    fi
    echo "setup: installing ${new}from the system's release" >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-upgrade $deps >/dev/null
}

# Unpack Mesa's lavapipe from Debian's bookworm-backports into $1 with an ICD file naming it.
fetch_backports_lavapipe() (
    dest=$1
    mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    fail() { echo "setup: $*; Dawn (--runtime dawn) will find no adapter here, wgpu-native (the default) is not affected" >&2; exit 1; }
    work=$(mktemp -d "$dest.tmp.XXXXXX") || fail "cannot write to $(dirname "$dest")"
    trap 'rm -rf "$work"' EXIT
    apt_dir=$work/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$work/root"
    echo "deb [signed-by=$keyring] $mirror bookworm-backports main" >"$apt_dir/sources.list"
    apt_opts=(-qq -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/none"
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    # As root, apt downloads as the user _apt, who cannot write into the venv.
    [ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)
    # apt-get update exits 0 when a source cannot be fetched: look for the index itself.
    apt-get "${apt_opts[@]}" update >/dev/null 2>&1
    compgen -G "$apt_dir/lists/*bookworm-backports_main_binary-*_Packages*" >/dev/null \
        || fail "cannot read bookworm-backports from $mirror (network? DEBIAN_MIRROR names another mirror)"
    (cd "$work" && apt-get "${apt_opts[@]}" download mesa-vulkan-drivers >/dev/null 2>&1) \
        || fail "cannot download mesa-vulkan-drivers from bookworm-backports ($mirror)"
    deb=$(echo "$work"/mesa-vulkan-drivers_*.deb)
    version=$(dpkg-deb -f "$deb" Version)
    # Only lavapipe: the package's other drivers (radeon, intel, ...) are 50 MB Dawn never opens here.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/root" --wildcards \
        '*/libvulkan_lvp.so' '*/icd.d/lvp_icd.json' '*/doc/mesa-vulkan-drivers/copyright' \
        || fail "mesa-vulkan-drivers $version has no lavapipe (libvulkan_lvp.so, lvp_icd.json)"
    lib=$(cd "$work" && find root -name libvulkan_lvp.so -type f)
    missing=$(ldd "$work/$lib" | awk '/not found/ {print $1}' | tr '\n' ' ')
    if [ -n "$missing" ]; then
        echo "setup: Mesa $version's lavapipe needs libraries this system lacks: $missing" >&2
        install_missing_deps "$deb" || fail "its libraries are missing ($missing)"
        missing=$(ldd "$work/$lib" | awk '/not found/ {print $1}' | tr '\n' ' ')
        [ -z "$missing" ] || fail "Mesa $version's lavapipe still lacks $missing"
    fi
    # Debian's Depends ask for a newer libdrm than bookworm's; what matters is that every symbol binds.
    undefined=$(LC_ALL=C ldd -r "$work/$lib" 2>&1 | grep 'undefined symbol' | head -3 || true)
    [ -z "$undefined" ] || fail "Mesa $version's lavapipe does not link with this system's libraries: $undefined"
    icd_in=$work/root/usr/share/vulkan/icd.d/lvp_icd.json
    "$VENV/bin/python" - "$icd_in" "$dest/$lib" "$work/lvp_icd.json" <<'PY' || fail "cannot write the ICD file"
import json, sys
icd = json.load(open(sys.argv[1]))
icd["ICD"]["library_path"] = sys.argv[2]  # absolute: the loader opens it by this path
with open(sys.argv[3], "w") as f:
    json.dump(icd, f, indent=4)
PY
    echo "mesa-vulkan-drivers $version (bookworm-backports), lavapipe only; written by scripts/setup.sh" >"$work/VERSION"
    rm -rf "$apt_dir" "$deb"
    rm -rf "$dest" && mv "$work" "$dest" || fail "cannot move $work to $dest"
    chmod 755 "$dest"
    trap - EXIT
    echo "setup: Mesa $version's lavapipe unpacked into $dest (the system's Mesa is untouched)" >&2
)

if ! dawn_check; then
    mesa_dir="$(cd "$VENV" && pwd)/mesa-backports"
    codename=$( . /etc/os-release 2>/dev/null && echo "${ID:-}-${VERSION_CODENAME:-}" ) || codename=""
    if ! "$VENV/bin/python" -c "import wgpudawn" >/dev/null 2>&1; then
        echo "setup: wgpudawn is not installed in $VENV; --runtime dawn is unavailable (wgpu-native, the default, is not affected)" >&2
    elif "$VENV/bin/python" - "$mesa_dir/lvp_icd.json" 2>/dev/null <<'PY'; then
import json, os, sys  # is there an ICD file whose driver is where it says (the venv may have moved)?
sys.exit(not os.path.isfile(json.load(open(sys.argv[1]))["ICD"]["library_path"]))
PY
        echo "setup: Dawn finds no adapter, even with the lavapipe in $mesa_dir (remove that folder to fetch it again):" >&2
        "$VENV/bin/python" -m rwkvlab.gpu --check --runtime dawn >&2 || true
    elif [ "$(uname -s)" = Linux ] && [ "$codename" = debian-bookworm ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: Dawn finds no adapter (Debian 12's lavapipe, Mesa 22.3, is too old for it); fetching Mesa's lavapipe from bookworm-backports into $mesa_dir" >&2
        if fetch_backports_lavapipe "$mesa_dir" && ! dawn_check; then
            echo "setup: Dawn still finds no adapter with $mesa_dir:" >&2
            "$VENV/bin/python" -m rwkvlab.gpu --check --runtime dawn >&2 || true
        fi
    else
        echo "setup: Dawn (--runtime dawn) finds no adapter; it needs a newer Vulkan driver than this system's (Mesa 25's lavapipe works); wgpu-native, the default, is not affected" >&2
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
