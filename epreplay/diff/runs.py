"""Open two runs and diff them: loads from the index, token matching from the shards.

`diff_runs(a, b, ...)` is the one entry point (cmd_diff and the TUI call it); the metrics live in
epreplay.diff.metrics, the result types and the verdict in epreplay.diff.compare, token pairing in
epreplay.diff.tokens.

Legend: S steps, L layers, E experts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from epreplay.diff import tokens as diff_tokens
from epreplay.diff.compare import compare_layers, judge, summarize, unmeasured_reasons, worst_first
from epreplay.diff.result import DiffResult, LayerDiff, RunLoads, Threshold
from epreplay.errors import UsageError
from epreplay.format.run import RunDir
from epreplay.format.steps import plan_of_run

MATCH_MODES = ("auto", "position", "tag", "none")

# progress(done, total, what) — cmd_diff draws a rich progress bar with it; None: silent.
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class RunFacts:
    """Static shapes of a run: from its manifest, else from its first shard's header."""

    run_id: str
    release: str
    num_experts: int
    topk: int
    world_size: int


def run_facts(run: RunDir) -> RunFacts:
    """Read the run's shapes; UsageError when the run has neither manifest nor shards."""
    from epreplay.format.shard import open_shard

    manifest = run.read_manifest()
    shards = run.shard_paths()
    if not shards and not run.index_path.exists():
        raise UsageError(f"{run.path}: no shards and no index; nothing to compare "
                         f"(record a run with 'epreplay record' or 'epreplay demo')")
    info = None
    if shards and (manifest is None or not manifest.num_experts or not manifest.topk):
        with open_shard(shards[0]) as scan:
            info = scan.info

    def pick(name: str) -> int:
        value = getattr(manifest, name, 0) if manifest is not None else 0
        return int(value or (getattr(info, name, 0) if info is not None else 0))

    run_id = manifest.run_id if manifest is not None else (info.run_id if info else run.path.name)
    release = manifest.release if manifest is not None else ""
    return RunFacts(run_id, release, pick("num_experts"), pick("topk"), pick("world_size"))


# Per (step, layer, expert) and per (step, layer, rank): the diff needs the step dimension (rank
# imbalance is per step, then averaged), which the aggregate queries of epreplay.index.queries sum away.
DIFF_EXPERT_LOAD = """
SELECT step, layer, expert, tokens::BIGINT AS tokens FROM expert_load
WHERE step >= $lo AND step < $hi"""
DIFF_RANK_SLOTS = """
SELECT step, layer, rank, recv_slots::BIGINT AS slots FROM rank_load
WHERE step >= $lo AND step < $hi"""


def load_run(run: RunDir, facts: RunFacts, *, steps: tuple[int, int] | None,
             layers: frozenset[int] | None, progress: Progress | None = None) -> RunLoads:
    """The run's expert load per (step, layer, expert) over the selected steps and layers.

    From RUN/index.duckdb, built (or brought up to date) first when missing or stale; the run is
    otherwise only read. Falls back to reading the shards when the index module is absent.
    """
    try:
        from epreplay.index.build import ensure_index
    except ImportError:
        return _load_from_shards(run, facts, steps=steps, layers=layers, progress=progress)
    result = ensure_index(run.path, progress=progress is not None)
    if not run.index_path.exists():
        why = getattr(result, "message", "") or result.action
        raise UsageError(f"{run.path}: no index yet ({why}); wait for the other 'epreplay index' "
                         f"to finish, or run 'epreplay index {run.path}'")
    return _load_from_index(run, facts, steps=steps, layers=layers)


def _load_from_index(run: RunDir, facts: RunFacts, *, steps: tuple[int, int] | None,
                     layers: frozenset[int] | None) -> RunLoads:
    import duckdb

    lo, hi = steps if steps is not None else (-(2**31), 2**31 - 1)
    try:
        con = duckdb.connect(str(run.index_path), read_only=True)
    except duckdb.Error as exc:
        raise UsageError(f"{run.index_path}: cannot open the index read-only "
                         f"({str(exc).splitlines()[0]}); rebuild it with "
                         f"'epreplay index {run.path} --force'") from None
    try:
        # No progress bar: DuckDB draws it on stdout, where `--format json` writes the report.
        con.execute("SET enable_progress_bar = false")
        load = con.execute(DIFF_EXPERT_LOAD, {"lo": lo, "hi": hi}).fetchnumpy()
        ranks = con.execute(DIFF_RANK_SLOTS, {"lo": lo, "hi": hi}).fetchnumpy()
    finally:
        con.close()
    step_N, layer_N = np.asarray(load["step"], np.int64), np.asarray(load["layer"], np.int64)
    expert_N, tokens_N = np.asarray(load["expert"], np.int64), np.asarray(load["tokens"], np.int64)
    rstep_N, rlayer_N = np.asarray(ranks["step"], np.int64), np.asarray(ranks["layer"], np.int64)
    rank_N, slots_N = np.asarray(ranks["rank"], np.int64), np.asarray(ranks["slots"], np.int64)
    if layers is not None:
        keep = np.isin(layer_N, sorted(layers))
        step_N, layer_N, expert_N, tokens_N = step_N[keep], layer_N[keep], expert_N[keep], tokens_N[keep]
        rkeep = np.isin(rlayer_N, sorted(layers))
        rstep_N, rlayer_N, rank_N, slots_N = rstep_N[rkeep], rlayer_N[rkeep], rank_N[rkeep], slots_N[rkeep]
    step_S, layer_L = _present(step_N), _present(layer_N)
    E = max(facts.num_experts, int(expert_N.max()) + 1 if expert_N.size else 0)
    load_SLE = _scatter(step_S, layer_L, step_N, layer_N, expert_N, tokens_N, E)
    R = max(facts.world_size, int(rank_N.max()) + 1 if rank_N.size else 0)
    known = np.isin(rstep_N, step_S) & np.isin(rlayer_N, layer_L)
    rank_SLR = _scatter(step_S, layer_L, rstep_N[known], rlayer_N[known], rank_N[known],
                        slots_N[known], R) if R else None
    return RunLoads(str(run.path), facts.run_id, facts.release, E, facts.topk, facts.world_size,
                    tuple(int(s) for s in step_S), tuple(int(l) for l in layer_L), load_SLE, rank_SLR)


def _present(values_N: np.ndarray) -> np.ndarray:
    """Sorted distinct values of small integers (steps, layers): np.unique without its sort."""
    if values_N.size == 0:
        return values_N[:0]
    lo = int(values_N.min())
    return np.flatnonzero(np.bincount(values_N - lo)) + lo


def _scatter(step_S: np.ndarray, layer_L: np.ndarray, step_N: np.ndarray, layer_N: np.ndarray,
             col_N: np.ndarray, value_N: np.ndarray, width: int) -> np.ndarray:
    """Sum (step, layer, col) -> value rows into a dense [S, L, width] int64 array."""
    S, L = step_S.size, layer_L.size
    flat = (np.searchsorted(step_S, step_N) * L + np.searchsorted(layer_L, layer_N)) * width + col_N
    return np.bincount(flat, weights=value_N, minlength=S * L * width).astype(np.int64).reshape(S, L, width)


def _load_from_shards(run: RunDir, facts: RunFacts, *, steps: tuple[int, int] | None,
                      layers: frozenset[int] | None, progress: Progress | None = None) -> RunLoads:
    """Expert load summed straight from the shards' dispatch records (no index module)."""
    rows: dict[tuple[int, int], np.ndarray] = {}
    num_experts = facts.num_experts
    with diff_tokens.Catalog(run.shard_paths(), steps=steps, layers=layers,
                             plan=plan_of_run(run)) as cat:
        total = len(cat.refs)
        for n, (step, layer, load_E) in enumerate(diff_tokens.iter_loads(cat, num_experts)):
            num_experts = max(num_experts, load_E.size)
            acc = rows.get((step, layer))
            if acc is None or acc.size < load_E.size:
                grown = np.zeros(max(num_experts, load_E.size), np.int64)
                if acc is not None:
                    grown[:acc.size] += acc
                acc = rows[(step, layer)] = grown
            acc[:load_E.size] += load_E
            if progress is not None and (n % 256 == 0 or n + 1 == total):
                progress(n + 1, total, f"loads of {run.path.name}")
    return _dense(run, facts, rows, num_experts)


def _dense(run: RunDir, facts: RunFacts, rows: dict[tuple[int, int], np.ndarray],
           num_experts: int) -> RunLoads:
    """Pack {(step, layer): load_E} into RunLoads' dense [S, L, E] array."""
    step_list = sorted({s for s, _ in rows})
    layer_list = sorted({l for _, l in rows})
    load_SLE = np.zeros((len(step_list), len(layer_list), num_experts), np.int64)
    s_of = {s: i for i, s in enumerate(step_list)}
    l_of = {l: i for i, l in enumerate(layer_list)}
    for (s, l), load in rows.items():
        load_SLE[s_of[s], l_of[l], :load.size] = load
    return RunLoads(str(run.path), facts.run_id, facts.release, num_experts, facts.topk,
                    facts.world_size, tuple(step_list), tuple(layer_list), load_SLE)


def _choose_match(mode: str, cat_a: diff_tokens.Catalog, cat_b: diff_tokens.Catalog,
                  notes: list[str]) -> str:
    """The matching to use ('tag' | 'position' | 'none'), recording why in `notes`."""
    no_routing = [n for n, c in (("A", cat_a), ("B", cat_b)) if not c.has_routing()]
    if no_routing:
        why = f"run {' and '.join(no_routing)} recorded no token routing (capture level 'counts')"
        if mode != "auto":
            raise UsageError(f"--match {mode}: {why}; record at --level routing or use --match none")
        notes.append(f"tokens not matched: {why}")
        return "none"
    if mode in ("tag", "auto"):
        tags_a, tags_b = cat_a.has_tags(), cat_b.has_tags()
        if tags_a and tags_b:
            return "tag"
        if mode == "tag":
            missing = " and ".join(n for n, t in (("A", tags_a), ("B", tags_b)) if not t)
            raise UsageError(f"--match tag: run {missing} recorded no token tags "
                             f"(call epreplay.marks.tag_tokens(ids) before each dispatch), "
                             f"or use --match position")
    why_not = diff_tokens.same_shapes(cat_a, cat_b)
    if mode == "position" or (mode == "auto" and why_not is None):
        if why_not is not None:
            notes.append(f"position matching: {why_not}; only calls present in both are compared")
        return "position"
    notes.append(f"tokens not matched: no token tags in both runs and {why_not}")
    return "none"


def diff_runs(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str], *,
              layers: frozenset[int] | None = None, steps: tuple[int, int] | None = None,
              top_n: int = 8, match: str = "auto", thresholds: Sequence[Threshold] = (),
              progress: Progress | None = None) -> DiffResult:
    """Compare two runs; see epreplay.diff.compare for the metrics and the verdict.

    Raises:
        UsageError: a run is missing or empty, or an option is invalid. (A threshold on a
            metric this diff could not measure is a failure of the diff, not an error.)
    """
    if match not in MATCH_MODES:
        raise UsageError(f"--match {match!r}: choose one of {', '.join(MATCH_MODES)}")
    if top_n < 1:
        raise UsageError(f"--top {top_n}: the hot-expert set needs N >= 1")
    run_a, run_b = RunDir.open(path_a), RunDir.open(path_b)
    facts_a, facts_b = run_facts(run_a), run_facts(run_b)
    loads_a = load_run(run_a, facts_a, steps=steps, layers=layers, progress=progress)
    loads_b = load_run(run_b, facts_b, steps=steps, layers=layers, progress=progress)
    for run, loads in ((run_a, loads_a), (run_b, loads_b)):
        if not loads.layers:
            sel = "" if steps is None and layers is None else " in the selected steps/layers"
            raise UsageError(f"{run.path}: no dispatch calls{sel}; nothing to compare")
    notes: list[str] = []
    same = same_recording(run_a, run_b, facts_a, facts_b)
    if same:
        notes.append(same)
    rows = compare_layers(loads_a, loads_b, top_n=top_n)
    used, tokens_a = "none", None
    shapes_differ = []
    if facts_a.num_experts != facts_b.num_experts:
        shapes_differ.append(f"experts {facts_a.num_experts} vs {facts_b.num_experts}")
    if facts_a.topk != facts_b.topk:
        shapes_differ.append(f"top-k {facts_a.topk} vs {facts_b.topk}")
    if shapes_differ:
        notes.append(f"distribution level only: {', '.join(shapes_differ)}")
    elif match == "none":
        notes.append("tokens not matched (--match none)")
    else:
        used, rows, tokens_a = _match_tokens(run_a, run_b, rows, match, steps, layers, notes, progress)
    summary = summarize(rows, tokens_a=tokens_a)
    return DiffResult(loads_a, loads_b, worst_first(rows), used, top_n, tuple(notes), summary,
                      tuple(thresholds), judge(summary, thresholds, rows),
                      unmeasured_reasons(summary, rows))


def same_recording(run_a: RunDir, run_b: RunDir, facts_a: RunFacts, facts_b: RunFacts) -> str | None:
    """A note when A and B are one run (or copies of one recording), else None: such a diff
    shows "no change" whatever the code did, which a reader must not take for a result."""
    if os.path.samefile(run_a.path, run_b.path):
        return (f"A and B are the same run ({run_a.path}): it is compared with itself, so every "
                f"metric shows no change")
    if facts_a.run_id and facts_a.run_id == facts_b.run_id:
        return (f"A and B are copies of one recording (run id {facts_a.run_id}): every metric "
                f"compares it with itself")
    return None


def _match_tokens(run_a: RunDir, run_b: RunDir, rows: list[LayerDiff], match: str,
                  steps: tuple[int, int] | None, layers: frozenset[int] | None,
                  notes: list[str], progress: Progress | None
                  ) -> tuple[str, list[LayerDiff], int | None]:
    """Add token agreement to each layer row; returns (mode used, rows, A's token count)."""
    from dataclasses import replace

    # steps found in a run's traffic (epreplay.format.steps): its records are read as the index reads them
    with diff_tokens.Catalog(run_a.shard_paths(), steps=steps, layers=layers,
                             plan=plan_of_run(run_a)) as cat_a, \
            diff_tokens.Catalog(run_b.shard_paths(), steps=steps, layers=layers,
                                plan=plan_of_run(run_b)) as cat_b:
        used = _choose_match(match, cat_a, cat_b, notes)
        if used == "none":
            return used, rows, None
        fn = diff_tokens.match_by_tag if used == "tag" else diff_tokens.match_by_position
        out, tokens_a = [], 0
        for n, row in enumerate(rows):
            lm = fn(cat_a, cat_b, row.layer)
            tokens_a += lm.agreement.tokens + lm.unmatched_a
            out.append(replace(row, tokens=lm.agreement, unmatched_a=lm.unmatched_a,
                               unmatched_b=lm.unmatched_b))
            if progress is not None:
                progress(n + 1, len(rows), f"matching tokens by {used}")
        unmatched = sum(r.unmatched_a for r in out)
        if unmatched:
            notes.append(f"{unmatched} of A's {tokens_a} tokens found no partner in B")
        return used, out, tokens_a
