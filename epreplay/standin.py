"""`deep_ep` stand-in: make `import deep_ep` give epreplay's emulated Buffer when DeepEP is absent.

Ways to switch it on:
  * by environment:   EPREPLAY_EMULATE_DEEP_EP=1 alone. Installing epreplay puts
                      `epreplay_standin.pth` in site-packages; `site` runs its one line at every
                      interpreter start-up, and only when the variable is 1/true/yes/on does it
                      import this module (whose import calls `boot()`). So the main process,
                      multiprocessing spawn/forkserver children and subprocesses all get it.
  * a program as is:  `python -m epreplay.standin client.py ARGS...` (also `-m module ARGS...` and
                      `-c CODE ARGS...`, as `python` takes them); it sets the variable for its
                      children too.
  * in code:          `import epreplay.standin; epreplay.standin.install()` (the emulation never imports
                      this module: epreplay.emulate sits below it)
`python -m epreplay.standin --install-pth` copies the .pth into site-packages by hand, for
installs that dropped it (e.g. a tool that does not honour top-level wheel files).
The real package always wins: the finder sits at the *end* of sys.meta_path and only answers
when no other finder can find `deep_ep`. The stand-in module exports Buffer, Config, EventOverlap,
EventHandle, topk_idx_t (torch.int64), V2's ElasticBuffer and EPHandle (epreplay.emulate.v2) and
`EMULATED = True`; `deep_ep.Buffer is epreplay.emulate.Buffer`, so capture hooks patch one class.
The helper modules DeepEP's V1 tests import (deep_ep.utils.envs / .math / .testing) are ours:
epreplay.emulate.standin_envs / _math / _testing.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
from typing import Any

ENV = "EPREPLAY_EMULATE_DEEP_EP"
# DeepEP's test helpers, written by us to the behaviour its V1 tests rely on (module -> ours)
HELPERS = {"deep_ep.utils.envs": "epreplay.emulate.standin_envs", "deep_ep.utils.math": "epreplay.emulate.standin_math",
           "deep_ep.utils.testing": "epreplay.emulate.standin_testing"}
NAMES = ("deep_ep", "deep_ep.buffer", "deep_ep.buffers", "deep_ep.buffers.legacy", "deep_ep.buffers.elastic",
         "deep_ep.utils", "deep_ep.utils.event", *HELPERS)
PTH_NAME = "epreplay_standin.pth"  # shipped next to this module; setup.py puts a copy in site-packages
TRUE = ("1", "true", "yes", "on")  # the .pth line tests the same spellings
VERSION = "1.2.1+epreplay.emulated"  # a DeepEP V1 version the emulation follows, marked as emulated


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: Any) -> Any:
        return None  # default module object

    def exec_module(self, module: Any) -> None:
        from epreplay import emulate

        for name in ("Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "EmulatedDeepEPError",
                     "EmulatedTimeout", "is_emulated"):
            setattr(module, name, getattr(emulate, name))
        from epreplay.emulate import v2 as emulate_v2  # DeepEP V2's names (deep_ep.ElasticBuffer, deep_ep.EPHandle)

        module.ElasticBuffer, module.EPHandle = emulate_v2.ElasticBuffer, emulate_v2.EPHandle
        module.EMULATED = True
        module.__version__ = VERSION
        if module.__name__ in HELPERS:
            helpers = importlib.import_module(HELPERS[module.__name__])
            for name in dir(helpers):
                if not name.startswith("_"):
                    setattr(module, name, getattr(helpers, name))
        if module.__name__ in ("deep_ep", "deep_ep.buffers", "deep_ep.utils"):
            module.__path__ = []  # a package, so `deep_ep.buffers.legacy` style imports resolve


class _Finder(importlib.abc.MetaPathFinder):
    """Answers for deep_ep only when every other finder fails (it sits last on sys.meta_path)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in NAMES:
            return None
        if fullname != "deep_ep" and not _is_standin(sys.modules.get("deep_ep")):
            return None  # the real package's submodules are the real package's business
        return importlib.util.spec_from_loader(fullname, _Loader(), is_package=fullname in (
            "deep_ep", "deep_ep.buffers", "deep_ep.utils"))


_finder: _Finder | None = None


def _is_standin(module: Any) -> bool:
    return bool(getattr(module, "EMULATED", False)) and getattr(module, "__version__", "") == VERSION


def real_deep_ep_available() -> bool:
    """True if a real `deep_ep` is importable (found by the finders other than ours)."""
    loaded = sys.modules.get("deep_ep")
    if loaded is not None:
        return not _is_standin(loaded)
    for finder in sys.meta_path:
        if finder is _finder or not hasattr(finder, "find_spec"):
            continue
        try:
            if finder.find_spec("deep_ep", None) is not None:
                return True
        except Exception:  # noqa: BLE001 - a broken finder must not break the import system
            continue
    return False


def install() -> bool:
    """Add the stand-in finder (idempotent). True if `import deep_ep` now gives the emulation."""
    global _finder
    if _finder is None:
        _finder = _Finder()
        sys.meta_path.append(_finder)
    return not real_deep_ep_available()


def uninstall() -> None:
    """Remove the finder and forget an imported stand-in (tests)."""
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None
    for name in NAMES:
        if _is_standin(sys.modules.get(name)):
            del sys.modules[name]


def boot() -> bool:
    """Install the stand-in when EPREPLAY_EMULATE_DEEP_EP is 1/true/yes; for sitecustomize files."""
    if os.environ.get(ENV, "").strip().lower() in TRUE:
        return install()
    return False


USAGE = """usage: python -m epreplay.standin SCRIPT.py [ARGS...]
       python -m epreplay.standin -m MODULE [ARGS...]
       python -m epreplay.standin -c CODE [ARGS...]
       python -m epreplay.standin --install-pth [SITE_PACKAGES_DIR]"""


def install_pth(target: str | None = None) -> str:
    """Copy epreplay_standin.pth into site-packages (or `target`); returns the path written.

    Only needed where the install dropped the file: pip (regular and editable) installs it.
    """
    import shutil
    import sysconfig

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH_NAME)
    dst_dir = target or sysconfig.get_paths()["purelib"]
    if not os.path.isdir(dst_dir):
        raise FileNotFoundError(f"{dst_dir}: no such site-packages folder; pass the one "
                                f"`python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'` prints")
    dst = os.path.join(dst_dir, PTH_NAME)
    shutil.copyfile(src, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    """`python -m epreplay.standin (SCRIPT | -m MODULE | -c CODE) ARGS...`, as `python` runs them.

    Installs the stand-in here and sets EPREPLAY_EMULATE_DEEP_EP=1 in os.environ, so the
    children this program starts (multiprocessing spawn, subprocess) get it from the .pth.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        print(USAGE)
        return 0 if args else 2
    if args[0] == "--install-pth":
        print(install_pth(args[1] if len(args) > 1 else None))
        return 0
    if args[0] in ("-m", "-c") and len(args) < 2:
        print(f"epreplay.standin: {args[0]} needs an argument\n{USAGE}", file=sys.stderr)
        return 2
    if args[0] not in ("-m", "-c") and not os.path.isfile(args[0]):
        print(f"epreplay.standin: {args[0]}: no such script; give a .py file, -m MODULE or -c CODE\n{USAGE}",
              file=sys.stderr)
        return 2
    os.environ[ENV] = "1"
    install()
    if args[0] == "-m":
        # sys.path[0] is already the working directory (we were started with -m ourselves)
        sys.argv = [args[1], *args[2:]]  # runpy swaps argv[0] for the module's file, as python -m
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[0] = ""  # as `python -c`: the working directory, looked up at each import
        main_module = sys.modules["__main__"]
        # run in a fresh __main__ namespace, as python -c does; no __file__, so spawn children
        # do not re-import it (functions they run must live in importable modules, as with python -c)
        import types

        code_main = types.ModuleType("__main__")
        sys.modules["__main__"] = code_main
        try:
            exec(compile(args[1], "<string>", "exec"), code_main.__dict__)
        finally:
            sys.modules["__main__"] = main_module
    else:
        sys.argv = args
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as python SCRIPT: the script's folder
        runpy.run_path(args[0], run_name="__main__")
    return 0


boot()

if __name__ == "__main__":
    sys.exit(main())
