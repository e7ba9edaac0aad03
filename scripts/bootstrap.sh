#!/usr/bin/env bash
# Set up .venv for epreplay on a fresh clone: Python and pip, nothing else prepared.
#
# torch is installed first and on its own: on CPU machines `torch==2.13.0` resolves to a local
# CPU wheel, while an unpinned `torch` (what pip would pick to satisfy our loose range) pulls the
# newest CUDA build and several GB of nvidia-* packages. A torch that already imports is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${EPREPLAY_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing torch (CPU build 2.13.0 where available)"
  pip install "torch==2.13.0" || pip install torch
fi
echo "bootstrap: installing epreplay and its test extras"
pip install -e ".[test]"
# setup.py's build_py puts epreplay_standin.pth (EPREPLAY_EMULATE_DEEP_EP=1 -> `import deep_ep` gives
# the emulation in every process) into site-packages; older/odd setuptools may drop it, so check.
if ! "$VENV/bin/python" -c 'import os, sysconfig, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["purelib"], "epreplay_standin.pth")))'; then
  echo "bootstrap: the install left out epreplay_standin.pth; copying it into site-packages"
  "$VENV/bin/python" -m epreplay.standin --install-pth
fi
# The compiled capture hook is built against this environment's torch (pip's isolated build has
# none); without a C++ compiler capture uses the Python hook (same records, slower).
"$VENV/bin/python" -m epreplay.capture.hookx_build --quiet
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
