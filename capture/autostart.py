"""Zero-code-change capture: a sitecustomize.py that installs the hooks in every Python process.

`epreplay record` (and `env_for`) write RUN/.capture/site/sitecustomize.py and put that folder
first on PYTHONPATH. Python imports sitecustomize at startup in every process that inherits the
environment — the command itself, torchrun's workers, multiprocessing's spawn/forkserver
children — and it calls `boot()`, which
  * runs the sitecustomize.py that ours shadows, if any (so a site's own customisation stays);
  * boots the deep_ep stand-in (epreplay.standin) when EPREPLAY_EMULATE_DEEP_EP asks for it;
  * patches Buffer / ElasticBuffer classes already imported, and adds an import hook that patches
    `deep_ep`, `epreplay.emulate`, `epreplay.emulate.v2` (and the deep_ep stand-in) the moment
    they are imported.
boot() imports neither torch nor deep_ep: a process that never touches DeepEP pays a few
milliseconds at startup and nothing else. The recorder itself starts at the first Buffer.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from epreplay.capture.config import ENV_DIR
from epreplay.format.run import DIR_MODE, RunDir

STANDIN_ENV = "EPREPLAY_EMULATE_DEEP_EP"  # epreplay.standin: `import deep_ep` -> the emulation
# Modules whose `Buffer` class is patched as soon as they are imported.
WATCHED = ("deep_ep", "deep_ep.buffer", "deep_ep.buffers.legacy", "deep_ep.buffers.elastic", "epreplay.emulate",
           "epreplay.emulate.v2")
PATCHED_NAMES = ("Buffer", "ElasticBuffer")  # DeepEP V1 and V2

SITE_SOURCE = '''\
# Written by epreplay capture: installs DeepEP capture hooks in every Python process that
# inherits this PYTHONPATH entry (see epreplay.capture.autostart). Safe to delete after the run.
try:
    import epreplay.capture.autostart as _epreplay_autostart
    _epreplay_autostart.boot(__file__)
except Exception as _epreplay_exc:  # never stop a process from starting
    import sys as _sys
    print(f"epreplay capture: not installed in this process: {_epreplay_exc}", file=_sys.stderr)
'''


def write_site(run: RunDir) -> Path:
    """Write RUN/.capture/site/sitecustomize.py; returns the folder to put first on PYTHONPATH."""
    from epreplay.capture.manifest import capture_dir

    site = capture_dir(run) / "site"
    site.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    target = site / "sitecustomize.py"
    if not target.exists() or target.read_text() != SITE_SOURCE:
        tmp = site / f".sitecustomize.tmp{os.getpid()}"
        tmp.write_text(SITE_SOURCE)
        os.replace(tmp, target)
    return site


def _chain(site_file: str) -> None:
    """Run the next sitecustomize on sys.path (the one ours shadows), under another name."""
    ours = os.path.dirname(os.path.abspath(site_file))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != ours]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["_epreplay_shadowed_sitecustomize"] = module
    spec.loader.exec_module(module)


def _patch_module(module: Any) -> None:
    for name in PATCHED_NAMES:
        cls = getattr(module, name, None)
        if isinstance(cls, type):
            from epreplay.capture import hooks

            hooks.patch_class(cls)


class _PatchingLoader(importlib.abc.Loader):
    """Delegates to the real loader, then patches the module's Buffer class."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        try:
            _patch_module(module)
        except Exception as exc:  # noqa: BLE001
            print(f"epreplay capture: could not hook {module.__name__}.Buffer: {exc}", file=sys.stderr)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the watched modules through the other finders and wraps their loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_finder: _Finder | None = None


def install_import_hook() -> None:
    """Patch watched modules already imported, and the others when they are imported."""
    global _finder
    for name in WATCHED:
        module = sys.modules.get(name)
        if module is not None:
            _patch_module(module)
    if _finder is None:
        _finder = _Finder()
        sys.meta_path.insert(0, _finder)


def boot(site_file: str | None = None) -> None:
    """Called by the generated sitecustomize.py at interpreter startup."""
    if site_file:
        try:
            _chain(site_file)
        except Exception as exc:  # noqa: BLE001
            print(f"epreplay capture: the site's own sitecustomize failed: {exc}", file=sys.stderr)
    if os.environ.get(STANDIN_ENV):
        import epreplay.standin  # noqa: F401 - importing it boots the deep_ep stand-in if asked
    if os.environ.get(ENV_DIR):
        install_import_hook()
