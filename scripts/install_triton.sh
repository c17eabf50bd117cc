#!/usr/bin/env bash
# Installs the anchors of bench/sidebyside.py into a virtual environment of their own,
# .venv-triton in the repository root: NVIDIA Triton Inference Server (the `tritonserver` binary
# that the nvidia-pytriton wheel ships, with its Python backend) and perf_analyzer (shipped in
# tritonclient 2.41.1's wheel). No GPU is needed: both run on the CPU here.
#
#     scripts/install_triton.sh          # idempotent; run it again to repair a half install
#
# Needs python3.11 (the Python backend's stub is built for one Python version; 3.11 is natron's)
# and apt-get for libb64, which perf_analyzer links against. Runs as root or with sudo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITON_VENV:-$ROOT/.venv-triton}"
PYTHON="${TRITON_PYTHON:-python3.11}"
STUB_PYTHON="3.11"

if ! command -v "$PYTHON" >/dev/null; then
    echo "install_triton.sh: $PYTHON not found; Triton's Python backend stub here is built for Python $STUB_PYTHON" >&2
    exit 2
fi

# perf_analyzer's one shared library that neither wheel carries.
if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq libb64-0d
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# tritonclient is pinned: the 2.41.1 wheel carries the perf_analyzer binary (into bin/), and the
# pin holds nvidia-pytriton at a release built with that Triton. nvidia-cuda-runtime-cu12 brings
# libcudart.so.12, which perf_analyzer loads even when no GPU is used.
"$VENV/bin/python" -m pip install --quiet \
    nvidia-pytriton "tritonclient[http]==2.41.1" onnxruntime numpy nvidia-cuda-runtime-cu12

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SERVER="$SITE/pytriton/tritonserver"

# tritonserver looks for backend <name> in <backend-directory>/<name>/, and the Python backend
# looks for its stub next to libtriton_python.so: the wheel keeps them in separate folders.
BACKENDS="$VENV/triton-backends"
mkdir -p "$BACKENDS/python"
cp -f "$SERVER/backends/python/libtriton_python.so" "$SERVER/backends/python/triton_python_backend_utils.py" \
    "$BACKENDS/python/"
cp -f "$SERVER/python_backend_stubs/$STUB_PYTHON/triton_python_backend_stub" "$BACKENDS/python/"
chmod +x "$BACKENDS/python/triton_python_backend_stub"

for binary in "$SERVER/bin/tritonserver" "$VENV/bin/perf_analyzer"; do
    [ -x "$binary" ] || { echo "install_triton.sh: $binary is missing after the install" >&2; exit 1; }
done
echo "tritonserver:   $SERVER/bin/tritonserver"
echo "backends:       $BACKENDS"
echo "perf_analyzer:  $VENV/bin/perf_analyzer"
