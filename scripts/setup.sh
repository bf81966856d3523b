#!/usr/bin/env bash
# Set up rsp-interp on a Debian machine with Python >= 3.11: Chromium (plotly PNG export),
# a virtualenv in .venv and the package with its dev + notebook extras.
#
# CPU installs pin the CPU build of torch (constraints/cpu.txt) so pip never pulls a multi-GB
# CUDA wheel. GPU users: install your CUDA torch into .venv first and run with RSP_INTERP_GPU=1,
# which skips the CPU pin.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    for py in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$py" ] || continue
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return
        fi
    done
    echo "error: need Python >= 3.11 (Debian: apt-get install -y python3 python3-venv)" >&2
    exit 1
}

apt_install() {
    local runner=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then runner=(sudo); else
            echo "warning: cannot install $* (not root, no sudo); install them yourself" >&2
            return 0
        fi
    fi
    "${runner[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq "$@" >/dev/null
}

PY=$(pick_python)
if ! command -v chromium >/dev/null 2>&1; then
    echo "installing Chromium for plotly's PNG export ..."
    apt_install chromium
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
        apt_install python3-venv
        "$PY" -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --upgrade pip
constraint=(-c constraints/cpu.txt)
[ "${RSP_INTERP_GPU:-0}" = 1 ] && constraint=()
.venv/bin/python -m pip install -q "${constraint[@]}" -e ".[dev,notebooks]"
echo "rsp-interp is installed in .venv ($(.venv/bin/python --version))"
