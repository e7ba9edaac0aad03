"""How a run's calls are grouped into model steps: marked, counted, found in the traffic, or not.

DeepEP calls carry no step. The recorder takes it from the job's marks (capture.step(),
mark_step()), else from `--layers-per-step N`, else it leaves every call in step 0 and numbers
MoE layer calls 0, 1, 2, ... (a layout, or a dispatch with no layout ahead of it, opens the next
one; see capture/recorder.py `_attribute`). For such a run the steps are derived here, from what
every record header holds, and the recorded data stay as they were:

    layer call u   the calls the recorder attributed to (step 0, layer u); its call pattern is
                   the (buffer, op) sequence of its calls, its T the token count of the call that
                   opened it, per rank.
    evidence       a model runs the same layers in every step, each layer of a step on the same
                   tokens: a rank's T only changes where a step begins (prefill -> decode, a new
                   batch), and when the layers' call patterns differ (a normal layer among
                   low-latency ones, cached dispatches in some layers) the pattern repeats once
                   per step.
    period L       the largest number of layer calls per step that every change of T (and, for
                   a pattern that does not repeat, every change of pattern) falls on a multiple
                   of, and that the repeating pattern divides. No change and no repeat: the
                   traffic does not show where a step ends (identical layers on fixed batches
                   look the same as one long step), and the plan says "none".

Then step = u // L and layer = u % L (`apply`). The index, `diff` and the summaries of `record`,
`stats` and `inspect` use the same plan (`plan_of_run`).

Legend: U layer calls, R ranks, N records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from epreplay.format.records import Kind, Op

MARKED, COUNTED, DETECTED, NONE = "marked", "layers-per-step", "detected", "none"
_OPENS = (int(Op.LAYOUT), int(Op.DISPATCH), int(Op.LL_DISPATCH))  # as the recorder counts layers


@dataclass(frozen=True)
class StepPlan:
    """How steps were found.

    Attributes:
        method: "marked" (as recorded: the job's marks, or one step per CUDA-graph replay),
            "layers-per-step" (record --layers-per-step N),
            "detected" (found in the traffic: period L) or "none" (all calls in step 0).
        layers_per_step: L for "layers-per-step" and "detected"; 0 otherwise.
        detail: why, in words (what the detection saw, or why it found nothing).
        layer_calls: U, the MoE layer calls per rank the detection looked at (0: not known).
    """

    method: str
    layers_per_step: int = 0
    detail: str = ""
    layer_calls: int = 0

    @property
    def derived(self) -> bool:
        """Whether readers must map the recorded (step 0, layer u) to (u // L, u % L)."""
        return self.method == DETECTED and self.layers_per_step > 0

    def read(self, step: int, layer: int) -> tuple[int, int]:
        """One record's (step, layer) as the plan reads them (`apply` for one record)."""
        if not self.derived or layer < 0:
            return step, layer
        return step + layer // self.layers_per_step, layer % self.layers_per_step

    def describe(self) -> str:
        """One line for summaries: 'steps: detected, 4 layers per step (...)'."""
        if self.method == MARKED:
            return f"steps: as recorded ({self.detail or 'marked by the job: capture.step / mark_step'})"
        if self.method == COUNTED:
            return f"steps: --layers-per-step {self.layers_per_step}"
        if self.method == DETECTED:
            count = (f", {-(-self.layer_calls // self.layers_per_step)} step(s)"
                     if self.layer_calls else "")
            return f"steps: detected, {self.layers_per_step} layer(s) per step{count} ({self.detail})"
        return (f"steps: none found ({self.detail}); every call is step 0; mark steps with "
                f"capture.step() or record with --layers-per-step N")


def apply(plan: StepPlan, step_N: np.ndarray, layer_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step_N, layer_N) as the plan reads them: recorded layer call u -> (u // L, u % L).

    Args:
        step_N / layer_N: [N] recorded step and layer of N records (any integer dtype).
    Returns new arrays of the same dtypes; the inputs when the plan maps nothing. Records with
    layer -1 (unknown: events) keep their values.
    """
    if not plan.derived:
        return step_N, layer_N
    L = plan.layers_per_step
    u_N = layer_N.astype(np.int64)
    known = u_N >= 0
    step = np.where(known, step_N.astype(np.int64) + u_N // L, step_N).astype(step_N.dtype)
    layer = np.where(known, u_N % L, u_N).astype(layer_N.dtype)
    return step, layer


def layer_calls(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What one rank's header array says about its layer calls.

    Args:
        h: [N] records of one rank (epreplay.format.reader.HEADER_DTYPE fields kind, op, buffer,
            seq, layer, tokens), any order.
    Returns:
        (pattern_U, T_U): [U] uint64 hash of each layer call's (buffer, op) sequence (0: none of
        its calls survived) and [U] int64 token count of the call that opened it (-1: unknown).
    """
    c = h[(h["kind"] == int(Kind.CALL)) & (h["layer"].astype(np.int64) >= 0)]
    if not len(c):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    u_N = c["layer"].astype(np.int64)
    U = int(u_N.max()) + 1
    # (buffer, seq) order inside each layer call; a shard written in call order is sorted already
    # (checked in one pass: the sort is most of the cost)
    bs_N = (c["buffer"].astype(np.int64) << 40) + c["seq"].astype(np.int64)
    du, dbs = np.diff(u_N), np.diff(bs_N)
    if not ((du > 0) | ((du == 0) & (dbs > 0))).all():
        order = np.lexsort((bs_N, u_N))
        c, u_N = c[order], u_N[order]
    first = np.r_[0, np.flatnonzero(np.diff(u_N)) + 1]  # [V] first record of each layer call seen
    pos_N = np.arange(len(c)) - np.repeat(first, np.diff(np.r_[first, len(c)]))
    code_N = (c["buffer"].astype(np.uint64) << np.uint64(8)) | c["op"].astype(np.uint64)
    with np.errstate(over="ignore"):  # a hash: wrapping is intended
        mix_N = _mix(code_N * np.uint64(0x9E3779B97F4A7C15) + pos_N.astype(np.uint64))
    pattern_U = np.zeros(U, np.uint64)
    pattern_U[u_N[first]] = np.add.reduceat(mix_N, first) | np.uint64(1)  # never 0 when seen
    T_U = np.full(U, -1, np.int64)
    opens = np.isin(c["op"], _OPENS)
    u_open, at = np.unique(u_N[opens], return_index=True)  # the first opening call of each
    T_U[u_open] = c["tokens"][opens][at].astype(np.int64)
    return pattern_U, T_U


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def detect(patterns: Sequence[np.ndarray], tokens: Sequence[np.ndarray]) -> StepPlan:
    """Find the step period of an unmarked run from its layer calls (module docstring).

    Args:
        patterns: per rank, [U_r] call-pattern hashes of its layer calls (layer_calls).
        tokens: per rank, [U_r] T of its layer calls (-1 unknown).
    Returns a "detected" plan with L, or a "none" plan saying why.
    """
    U = max((len(p) for p in patterns), default=0)
    if U < 2:
        return StepPlan(NONE, 0, f"{U} MoE layer call(s) per rank", U)
    pattern_U = next(p for p in patterns if len(p) == U)
    p = _period(pattern_U)
    if p is not None and 2 * p > U:
        p = None  # a pattern seen once is no repeat
    changes = set()
    for T_U in tokens:
        both = (T_U[1:] >= 0) & (T_U[:-1] >= 0)
        changes.update((np.flatnonzero(both & (T_U[1:] != T_U[:-1])) + 1).tolist())
    why_T = "token counts change only after whole groups of {L} MoE layer calls"
    if p is None:  # the pattern does not repeat: its changes are step boundaries too
        known = (pattern_U[1:] != 0) & (pattern_U[:-1] != 0)
        changes.update((np.flatnonzero(known & (pattern_U[1:] != pattern_U[:-1])) + 1).tolist())
        why_T = "token counts and call patterns change only after whole groups of {L} MoE layer calls"
    if not changes:
        if p is None or p == 1:
            return StepPlan(NONE, 0, f"all {U} MoE layer calls have the same call pattern and token "
                                     f"counts, so nothing shows where a step ends", U)
        return StepPlan(DETECTED, p, f"the call pattern of the first {p} MoE layer calls repeats", U)
    g = math.gcd(*changes)
    if p is not None and p > 1:
        fits = [m for m in range(p, g + 1, p) if g % m == 0]
        if not fits:
            return StepPlan(NONE, 0, f"the call pattern repeats every {p} MoE layer calls but token "
                                     f"counts change at layer call {min(changes)}", U)
        return StepPlan(DETECTED, fits[-1], f"token counts change only after whole groups of "
                                            f"{fits[-1]} MoE layer calls, and the call pattern "
                                            f"repeats every {p}", U)
    return StepPlan(DETECTED, g, why_T.format(L=g), U)


def _period(x_U: np.ndarray) -> int | None:
    """Smallest p < U with x[u] == x[u - p] for every u >= p (a last block may be partial), or
    None; KMP's failure function, O(U)."""
    seq = x_U.tolist()
    U = len(seq)
    fail = [0] * U
    k = 0
    for i in range(1, U):
        while k and seq[i] != seq[k]:
            k = fail[k - 1]
        if seq[i] == seq[k]:
            k += 1
        fail[i] = k
    p = U - fail[-1] if U else 0
    return p if 0 < p < U else None


def plan_for(manifest: Any, headers: Sequence[np.ndarray]) -> StepPlan:
    """The plan of a run from its manifest (may be None) and every rank's header array.

    Marks win: a rank that says it saw step marks, or any recorded step other than 0 (the
    recorder numbers steps only from marks or --layers-per-step)."""
    extra = getattr(manifest, "extra", None) or {}
    lps = int(extra.get("layers_per_step") or 0)
    ranks = getattr(manifest, "ranks", None) or {}
    if any(int(f.get("steps_marked") or 0) for f in ranks.values()):
        return StepPlan(MARKED)
    if any(len(h) and int(h["step"][h["kind"] == int(Kind.CALL)].max(initial=0)) > 0 for h in headers):
        if lps:
            return StepPlan(COUNTED, lps)
        if ranks and all("steps_marked" in f for f in ranks.values()):
            # no rank saw a mark: the steps are CUDA-graph replays (capture/graph_ring.py)
            return StepPlan(MARKED, 0, "one step per CUDA-graph replay")
        return StepPlan(MARKED)
    if lps:
        return StepPlan(COUNTED, lps)
    found = [layer_calls(h) for h in headers]
    return detect([f[0] for f in found], [f[1] for f in found])


def plan_of_run(run: Any, shard_paths: Sequence[Path] | None = None) -> StepPlan:
    """plan_for over a run directory's manifest and shards (headers only: footers, or a scan;
    none are read when the manifest already says steps were marked or counted)."""
    from epreplay.errors import ShardError
    from epreplay.format.shard import open_shard

    manifest = run.read_manifest()
    quick = plan_for(manifest, [])
    if quick.method in (MARKED, COUNTED):
        return quick
    headers = []
    for path in shard_paths if shard_paths is not None else run.shard_paths():
        try:
            with open_shard(path) as scan:
                headers.append(scan.header_array())
        except (ShardError, OSError):
            continue  # a shard that cannot be read says nothing about steps; others still do
    return plan_for(manifest, headers)
