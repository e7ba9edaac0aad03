"""`deep_ep` stand-in: make `import deep_ep` give epreplay's emulated Buffer when DeepEP is absent.

Three ways to switch it on (none is automatic; no .pth file is installed):
  * in code:          `import epreplay.emulate; epreplay.emulate.install_standin()` (or `standin.install()`)
  * a script as is:   `python -m epreplay.standin client.py ARGS...` (runs client.py as __main__)
  * by environment:   EPREPLAY_EMULATE_DEEP_EP=1 *and* a process that imports `epreplay.standin`
                      (importing it calls `boot()`), e.g. a sitecustomize.py on PYTHONPATH that
                      does `import epreplay.standin` — `epreplay record` writes such a file and
                      calls `boot()`, so every process it starts (torchrun workers included) gets it.
The real package always wins: the finder sits at the *end* of sys.meta_path and only answers
when no other finder can find `deep_ep`. The stand-in module exports Buffer, Config, EventOverlap,
EventHandle, topk_idx_t (torch.int64) and `EMULATED = True`; `deep_ep.Buffer is
epreplay.emulate.Buffer`, so capture hooks patch one class.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
from typing import Any

ENV = "EPREPLAY_EMULATE_DEEP_EP"
NAMES = ("deep_ep", "deep_ep.buffer", "deep_ep.buffers", "deep_ep.buffers.legacy", "deep_ep.utils",
         "deep_ep.utils.event")
VERSION = "1.2.1+epreplay.emulated"  # a DeepEP V1 version the emulation follows, marked as emulated


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: Any) -> Any:
        return None  # default module object

    def exec_module(self, module: Any) -> None:
        from epreplay import emulate

        for name in ("Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "EmulatedDeepEPError",
                     "EmulatedTimeout", "is_emulated"):
            setattr(module, name, getattr(emulate, name))
        module.EMULATED = True
        module.__version__ = VERSION
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
    if os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return install()
    return False


def main(argv: list[str] | None = None) -> int:
    """`python -m epreplay.standin script.py ARGS...`: run a script with the stand-in installed."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m epreplay.standin SCRIPT.py [ARGS...]")
        return 0 if args else 2
    install()
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
    return 0


boot()

if __name__ == "__main__":
    sys.exit(main())
