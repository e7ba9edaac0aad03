"""The replay schedule: which recorded collectives are replayed, in which order, and which not.

A collective is named by (buffer, seq) on every rank. It is replayable only when every recorded
rank holds an intact, successful record of it with the same op; anything else is skipped with a
reason (a truncated shard, a damaged record that --allow-partial accepted, a call that raised
or hung in the recording, ranks disagreeing on the op, or a combine whose dispatch was skipped).
Filters (--steps/--layers/--ops) select calls; a selected combine or cached dispatch pulls in
the dispatch whose handle it uses.

Reads only shard headers and footers (open_shard's entry list): no record is decoded here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from epreplay.errors import UsageError
from epreplay.format.records import Kind, Op, Status
from epreplay.format.steps import StepPlan

# Which dispatch op a dependent op's handle comes from.
PARENT_OP = {Op.COMBINE: Op.DISPATCH, Op.CACHED_DISPATCH: Op.DISPATCH, Op.LL_COMBINE: Op.LL_DISPATCH}


@dataclass(frozen=True)
class Call:
    """One collective to replay.

    Attributes:
        index: position in replay order (0-based). buffer, seq: the collective's identity.
        op, step, layer: from the records (rank 0's step/layer).
        tokens_N: T of every virtual rank for this call. offsets_N: each rank's record offset.
        duration_ns: the recorded duration, max over ranks (-1 unknown).
        parent_seq: the seq of the dispatch whose handle this call uses (guessed from order:
            the latest preceding dispatch of the right kind; the record's meta may override).
    """

    index: int
    buffer: int
    seq: int
    op: Op
    step: int
    layer: int
    tokens_N: tuple[int, ...]
    offsets_N: tuple[int, ...]
    duration_ns: int = -1
    parent_seq: int | None = None


@dataclass(frozen=True)
class Skipped:
    """A recorded call not replayed. ranks: the recorded ranks whose record of it is missing,
    damaged, unsuccessful or disagreeing (for a call whose dispatch was skipped: that
    dispatch's ranks). reason: the same in words."""

    buffer: int
    seq: int
    op: str
    step: int
    layer: int
    reason: str
    ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class Schedule:
    calls: list[Call]
    skipped: list[Skipped] = field(default_factory=list)
    filtered: int = 0  # recorded calls not selected by --steps/--layers/--ops
    shard_problems: dict[int, str] = field(default_factory=dict)


def parse_steps(text: str | None) -> tuple[int | None, int | None]:
    """'A:B' (B exclusive), 'A:', ':B' or 'A' -> (lo, hi)."""
    if not text:
        return None, None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return (int(a) if a.strip() else None), (int(b) if b.strip() else None)
        n = int(text)
        return n, n + 1
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected A:B, A: or :B with integers, e.g. 0:4") from None


def parse_int_set(text: str | None, flag: str) -> set[int] | None:
    """'0,2,5-7' -> {0, 2, 5, 6, 7}."""
    if not text:
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.update(range(int(a), int(b) + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected integers and ranges like 0,2,5-7") from None
    return out


def parse_ops(text: str | None) -> set[Op] | None:
    if not text:
        return None
    try:
        return {Op.parse(t) for t in text.split(",") if t.strip()}
    except ValueError as exc:
        raise UsageError(f"--ops: {exc}") from None


def build(shards: dict[int, object], world_size: int, *, steps: tuple[int | None, int | None] = (None, None),
          layers: set[int] | None = None, ops: set[Op] | None = None,
          damaged: dict[int, dict[int, str]] | None = None, step_plan: StepPlan | None = None) -> Schedule:
    """Join every rank's calls by (buffer, seq) and decide what is replayed.

    Args:
        shards: rank -> ShardScan (open_shard) for ranks 0 .. world_size-1.
        world_size: N.
        damaged: rank -> {record offset: what is wrong} (replay.damage.damaged_offsets): records
            that are listed but must not be read; their calls are skipped, naming the damage.
        step_plan: how the run's steps were found (epreplay.format.steps): a run whose steps were found
            in its traffic is filtered and reported by the steps the index shows.
    """
    read = step_plan.read if step_plan is not None else (lambda s, l: (s, l))
    problems = {r: s.problem for r, s in shards.items() if getattr(s, "problem", None)}
    damaged = damaged or {}
    per_rank: dict[int, dict[tuple[int, int], tuple[object, int]]] = {}
    lost: dict[int, dict[tuple[int, int], str]] = {}  # rank -> key -> why its record is unusable
    lost_headers: dict[tuple[int, int], object] = {}  # the footer's copy of a damaged record's header
    for r in range(world_size):
        table = {}
        bad_here = damaged.get(r, {})
        for e in shards[r].entries:
            h = e.header
            if h.kind == Kind.CALL:
                if e.offset in bad_here:
                    lost.setdefault(r, {})[(h.buffer, h.seq)] = bad_here[e.offset]
                    lost_headers.setdefault((h.buffer, h.seq), h)
                    continue
                table[(h.buffer, h.seq)] = (h, e.offset)
        per_rank[r] = table
    keys = set().union(*(t.keys() for t in per_rank.values())) if per_rank else set()
    keys |= lost_headers.keys()  # a call damaged on every rank is still named

    def first_header(key):
        for r in range(world_size):
            if key in per_rank[r]:
                return per_rank[r][key][0]
        return lost_headers[key]

    buffers = {k[0] for k in keys}
    if len(buffers) <= 1:
        order = sorted(keys)
    else:  # several buffers share one replay process group: issue in recorded time order
        order = sorted(keys, key=lambda k: (first_header(k).start_ns, k[0], k[1]))

    calls: list[Call] = []
    skipped: list[Skipped] = []
    skipped_keys: dict[tuple[int, int], tuple[int, ...]] = {}  # key -> its Skipped.ranks
    last_parent: dict[tuple[int, Op], int] = {}
    filtered = 0
    lo, hi = steps
    wanted: list[bool] = []
    for key in order:
        h0 = first_header(key)
        op = Op(h0.op)
        step0, layer0 = read(h0.step, h0.layer)
        missing = [r for r in range(world_size) if key not in per_rank[r]]
        reason, ranks = None, tuple(missing)
        if missing:
            why = []
            for r in missing[:4]:
                s = shards[r]
                why.append(f"rank {r}" + (f" ({lost[r][key]})" if key in lost.get(r, {})
                                          else f" (shard truncated at byte {s.truncated_at})"
                                          if s.truncated_at is not None else " (not recorded)"))
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            damaged_here = any(key in lost.get(r, {}) for r in missing)
            reason = ("missing or damaged on " if damaged_here else "missing on ") + ", ".join(why) + more
        else:
            hs = [per_rank[r][key][0] for r in range(world_size)]
            bad = [(r, h) for r, h in enumerate(hs) if h.status != Status.OK]
            if {h.op for h in hs} != {h0.op}:
                reason = "ranks recorded different ops for this (buffer, seq)"
                ranks = tuple(r for r, h in enumerate(hs) if h.op != h0.op)
            elif bad:
                r, h = bad[0]
                reason = f"recorded as {Status(h.status).name.lower()} on rank {r}"
                ranks = tuple(r for r, _ in bad)
        parent = None
        if op in PARENT_OP:
            parent = last_parent.get((key[0], PARENT_OP[op]))
            if reason is None and (parent is None or (key[0], parent) in skipped_keys):
                reason = (f"its {PARENT_OP[op].label} (seq {parent}) was skipped" if parent is not None
                          else f"no {PARENT_OP[op].label} precedes it in the recording")
                ranks = skipped_keys.get((key[0], parent), ())
        if op in (Op.DISPATCH, Op.LL_DISPATCH):
            last_parent[(key[0], op)] = key[1]
        if reason is not None:
            skipped.append(Skipped(key[0], key[1], op.label, step0, layer0, reason, ranks))
            skipped_keys[key] = ranks
            continue
        hs = [per_rank[r][key][0] for r in range(world_size)]
        sel = ((lo is None or step0 >= lo) and (hi is None or step0 < hi)
               and (layers is None or layer0 in layers) and (ops is None or op in ops))
        wanted.append(sel)
        calls.append(Call(0, key[0], key[1], op, step0, layer0,
                          tuple(int(h.tokens) for h in hs),
                          tuple(int(per_rank[r][key][1]) for r in range(world_size)),
                          max(int(h.duration_ns) for h in hs), parent))
    # Pull in the dispatch a selected dependent call needs.
    by_key = {(c.buffer, c.seq): i for i, c in enumerate(calls)}
    for i, c in enumerate(calls):
        if wanted[i] and c.parent_seq is not None:
            j = by_key.get((c.buffer, c.parent_seq))
            if j is not None:
                wanted[j] = True
    kept = []
    for i, c in enumerate(calls):
        if wanted[i]:
            kept.append(Call(len(kept), c.buffer, c.seq, c.op, c.step, c.layer, c.tokens_N,
                             c.offsets_N, c.duration_ns, c.parent_seq))
        else:
            filtered += 1
    return Schedule(kept, skipped, filtered, problems)


def open_run_shards(paths: dict[int, Path]) -> dict[int, object]:
    from epreplay.format.shard import open_shard

    return {r: open_shard(p) for r, p in paths.items()}
