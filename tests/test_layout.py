"""The package layout: every module imports, imports point one way, the core stays free of the UI.

Layers, lowest first (a group may import its own modules and the groups listed for it):
    base     epreplay/__init__, errors, marks, launch
    format   the on-disk format (records, shards, run folder, fingerprints)
    emulate  the DeepEP emulation            index  the DuckDB index and its queries
    diff     comparing two runs (over the index)
    standin  the `deep_ep` stand-in (over emulate)
    capture, replay (peers: neither imports the other)
    merge    merging the parts of a multi-node run (over capture's manifest)
    demo, tui (peers)
    cli      the console script and its command shells, then __main__
Imports are read from the source (ast: module-level and function-level `import`/`from`, and
`importlib.import_module("epreplay...")` / `__import__` with a literal name), so a lazy import
inside a function counts too.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"epreplay": REPO / "epreplay", "epreplay.capture": REPO / "capture",
         "epreplay.replay": REPO / "replay", "epreplay.tui": REPO / "tui"}
BASE = {"errors", "marks", "launch", "__init__", "__main__"}
CORE = ("format", "emulate", "index", "diff")
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "format": {"base"},
    "emulate": {"base", "format"},
    "index": {"base", "format"},
    "diff": {"base", "format", "index"},
    "standin": {"base", "emulate"},
    "capture": {"base", "format", "emulate", "index", "diff", "standin"},
    "replay": {"base", "format", "emulate", "index", "diff", "standin"},
    "merge": {"base", "format", "index", "capture"},
    "demo": {"base", "format", "emulate", "index", "diff", "standin", "capture", "replay"},
    "tui": {"base", "format", "emulate", "index", "diff", "capture", "replay"},
    "cli": {"base", "format", "emulate", "index", "diff", "standin", "capture", "replay", "merge", "demo", "tui"},
    "__main__": {"cli"},
}
# third-party packages a group must not import (not even lazily)
FORBIDDEN = {**{g: {"textual"} for g in CORE}, "format": {"textual", "duckdb", "torch", "triton"},
             "index": {"textual", "torch"}, "diff": {"textual", "torch"}}
# the format's tensor-side modules (fingerprints of torch tensors, the FP8 cast): torch allowed
TENSOR_MODULES = {f"epreplay.format.{m}" for m in (
    "fingerprint", "fingerprint_cpu", "fingerprint_gpu", "fingerprint_kernels", "fp8")}


def _modules() -> dict[str, Path]:
    """Every module of the installed layout -> its source file (package-dir mapping of pyproject)."""
    out = {}
    for pkg, root in ROOTS.items():
        for f in sorted(root.rglob("*.py")):
            parts = [p for p in f.relative_to(root).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def group(module: str) -> str:
    """The layer group of a dotted module name under epreplay."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if parts[1] == "__main__":
        return "__main__"
    return "base" if parts[1] in BASE else parts[1]


def _target(name: str) -> str:
    """`from epreplay import X`: the module epreplay.X when it is one, else the package itself."""
    return name if name in MODULES else name.rpartition(".")[0]


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, top-level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(_target(f"{node.module}.{a.name}"), node.lineno) for a in node.names
                      if node.module.startswith("epreplay")]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            found.append((node.args[0].value, node.lineno))
    return found


def test_allowed_layers_have_no_cycle():
    seen: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(g: str, path: tuple[str, ...]) -> None:
        assert seen.get(g) != 1, f"cycle in ALLOWED: {' -> '.join(path + (g,))}"
        if seen.get(g) == 2:
            return
        seen[g] = 1
        for h in ALLOWED[g]:
            visit(h, path + (g,))
        seen[g] = 2

    for g in ALLOWED:
        visit(g, ())


def test_every_group_is_known():
    assert {group(m) for m in MODULES} <= set(ALLOWED), sorted({group(m) for m in MODULES} - set(ALLOWED))


def test_imports_point_one_way():
    bad = []
    for module, path in MODULES.items():
        g = group(module)
        for name, line in imports_of(path):
            if name.split(".")[0] != "epreplay":
                continue
            h = group(name)
            if h != g and h not in ALLOWED[g]:
                bad.append(f"{path.relative_to(REPO)}:{line}: {g} imports {name} ({h})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_core_imports_no_ui_and_format_no_duckdb_nor_torch():
    bad = []
    for module, path in MODULES.items():
        forbidden = FORBIDDEN.get(group(module), set()) - ({"torch", "triton"} if module in TENSOR_MODULES else set())
        for name, line in imports_of(path):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(REPO)}:{line}: {group(module)} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_module_over_400_lines_and_a_short_top_level():
    long = [f"{p.relative_to(REPO)}: {n}" for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long
    top = sorted(p.name for p in ROOTS["epreplay"].glob("*.py"))
    assert len(top) <= 12, top


def test_every_package_says_what_it_may_import():
    for pkg in (*(f"epreplay.{g}" for g in ("format", "emulate", "index", "diff", "demo", "cli")),):
        doc = ast.get_docstring(ast.parse(MODULES[pkg].read_text())) or ""
        assert "May import" in doc, pkg


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    if module.endswith("__main__"):
        pytest.skip("runs the CLI on import")
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in ("triton", "deep_ep"):  # GPU-only modules, as elsewhere in the suite
            pytest.skip(f"{module} needs {exc.name}")
        raise


def test_module_names_in_strings_resolve():
    """Every string naming an epreplay module (subprocess `-m` targets, command tables, hook and
    stand-in targets, import_module calls) names one that exists, or an attribute of one."""
    import importlib.util
    import re

    bad = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"epreplay(\.\w+)+", node.value)):
                continue
            name = node.value
            if name in MODULES or name.rpartition(".")[2].startswith("_") or name.endswith(".tcss"):
                continue  # C extensions may be unbuilt; epreplay.tcss is the TUI's style sheet
            parent, _, attr = name.rpartition(".")
            if importlib.util.find_spec(name) is None and not (parent in MODULES and hasattr(
                    importlib.import_module(parent), attr)):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {name!r}")
    assert not bad, bad


def test_public_entry_points():
    import epreplay.emulate
    from epreplay.cli import main  # the console script's target (pyproject: epreplay.cli:main)

    assert epreplay.emulate.Buffer.__name__ == "Buffer" and callable(main)
    assert importlib.import_module("epreplay.capture").__name__ == "epreplay.capture"
    assert (REPO / "epreplay" / "standin.py").is_file() and (REPO / "epreplay" / "epreplay_standin.pth").is_file()
