"""Build the compiled capture hook (capture/_hookx.cpp) against the torch of this environment.

    python -m epreplay.capture.hookx_build [--force] [--quiet]

The hook reads tensors through libtorch, so it is built per torch install, not by pip (pip's
isolated build environment has no torch, and a CPU machine must never pull one into it):
scripts/bootstrap.sh runs this after `pip install -e .`; on a GPU image run it once after
installing. It writes `_hookx<ext suffix>` next to the source and records the torch version it was
built for; capture loads it only under that same torch (else the Python hook runs, same records).
Without a C++ compiler it says so and exits 0: capture works without it, only slower.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def target() -> Path:
    return HERE / f"_hookx{sysconfig.get_config_var('EXT_SUFFIX')}"


def command(out: Path) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    libs = library_paths()
    # hidden visibility: the header-inline functions of torch the compiler keeps out of line
    # (TensorImpl::size, dim, is_contiguous, ...) are then this module's own copies, called
    # directly, not through the PLT into libtorch_cpu's copies, whose code is far and cold when
    # the hook runs (an iTLB and i-cache miss each)
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
           "-fno-semantic-interposition", str(HERE / "_hookx.cpp"), "-o", str(out),
           f"-I{sysconfig.get_paths()['include']}",
           f'-DEPREPLAY_TORCH_VERSION="{torch.__version__}"',
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
    cmd += ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    cmd += os.environ.get("EPREPLAY_HOOKX_CFLAGS", "").split()  # e.g. -DHOOKX_PROFILE (_hookx.cpp)
    return cmd


# The hook's thread-locals as initial-exec TLS: a %fs-relative load each, instead of a
# __tls_get_addr call per function that touches one (~0.2 us of a low-latency call's hook time).
# A module loaded by dlopen gets that from glibc's small static-TLS surplus (the hook's few
# hundred bytes); where it is used up the module does not load, so main() checks that it loads
# and builds without this otherwise.
STATIC_TLS = "-ftls-model=initial-exec"


def loads(path: Path) -> bool:
    """Whether the built module at `path` loads next to torch (a fresh interpreter)."""
    code = ("import sys, torch, importlib.machinery as m, importlib.util as u; "
            "l = m.ExtensionFileLoader('epreplay.capture._hookx', sys.argv[1]); "
            "l.create_module(u.spec_from_loader(l.name, l))")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True).returncode == 0


def up_to_date(out: Path) -> bool:
    sources = (HERE / "_hookx.cpp", HERE / "_hosthash.h", Path(__file__))  # this file: the flags
    if not out.exists() or any(out.stat().st_mtime < src.stat().st_mtime for src in sources):
        return False
    try:
        from epreplay.capture import fast_plan

        return fast_plan.load() is not None
    except Exception:  # noqa: BLE001 - a stale or broken build: rebuild
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m epreplay.capture.hookx_build", description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the build is current")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    out = target()
    if not a.force and up_to_date(out):
        if not a.quiet:
            print(f"hookx_build: {out.name} is current")
        return 0
    try:
        cmd = command(out)
    except ImportError as exc:
        print(f"hookx_build: no torch here ({exc}); capture will use the Python hook")
        return 0
    if not shutil.which(cmd[0]):
        print(f"hookx_build: no C++ compiler ({cmd[0]}); capture will use the Python hook")
        return 0
    t0 = time.monotonic()
    tmp = out.with_suffix(".tmp")
    at = cmd.index("-o")
    proc = subprocess.run(cmd[:at + 1] + [str(tmp)] + cmd[at + 2:] + [STATIC_TLS], capture_output=True, text=True)
    if proc.returncode != 0 or not loads(tmp):  # (see STATIC_TLS)
        proc = subprocess.run(cmd[:at + 1] + [str(tmp)] + cmd[at + 2:], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        print(f"hookx_build: the compiled hook did not build; capture will use the Python hook:\n"
              f"{proc.stderr[-2000:]}")
        return 0
    os.replace(tmp, out)
    if not a.quiet:
        print(f"hookx_build: built {out.name} in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
