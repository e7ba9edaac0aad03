"""Writing the index tables: shard results merged with numpy, inserted through Arrow; replay reports.

Used by epreplay.index.build (which owns the lock, the plan and the atomic replace); the schema is
epreplay/index/schema.sql. Nothing here goes through executemany: every insert is an Arrow table.

Legend: P (step, layer) pairs, R ranks, E experts, X = E / R local experts.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from epreplay.errors import UsageError
from epreplay.format.run import RunDir

INDEX_VERSION = 3  # 2: shards.mtime_ns / stamp_crc; 3: clock table, aligned_calls (older: rebuilt)
# dense (step-layer) x rank x expert block assembled at once when merging shard results (64 MiB
# of int32 counts: 1024 pairs of a 64-rank, 256-expert run)
DENSE_CELLS = 1 << 24
BLOCK_PAIRS = 256  # (step, layer) pairs per block at most (see _blocks)


OPS = ("layout", "dispatch", "cached_dispatch", "combine", "ll_dispatch", "ll_combine")  # Op 1..6
STATUSES = ("ok", "error", "hung")  # Status 0..2


def _arrow(cols: dict[str, np.ndarray]):
    import pyarrow as pa

    out = {}
    for name, a in cols.items():
        if name == "op":
            out[name] = pa.DictionaryArray.from_arrays(pa.array(a - 1, pa.int8()), pa.array(OPS))
        elif name == "status":
            out[name] = pa.DictionaryArray.from_arrays(pa.array(a, pa.int8()), pa.array(STATUSES))
        elif a.dtype == object:
            out[name] = pa.array(list(a), pa.string())
        elif a.ndim == 2:  # one list per row (expert_load_rank.tokens)
            out[name] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).ravel()), a.shape[1])
        else:
            out[name] = pa.array(a)
    return pa.table(out)


def _insert(con, table: str, cols: dict[str, np.ndarray]) -> int:
    """Bulk insert numpy columns (named as the table's, in its order) through Arrow."""
    n = len(next(iter(cols.values())))
    if n == 0:
        return 0
    con.register("batch", _arrow(cols))
    con.execute(f"INSERT INTO {table} SELECT * FROM batch")
    con.unregister("batch")
    return n


class _Inserter:
    """`_insert` on a background thread, in submission order: DuckDB releases the GIL while it
    inserts, so the next (step, layer) block's numpy merge runs on the other core meanwhile
    (the table phase was serial: about half numpy, half DuckDB). While it is open nothing else
    may use `con`; leaving the block waits for every insert and re-raises the first failure."""

    def __init__(self, con) -> None:
        import queue
        import threading

        self.con, self.error = con, None
        self.q: "queue.Queue" = queue.Queue(maxsize=2)  # bounds the blocks held in memory
        self.thread = threading.Thread(target=self._run, name="epreplay-index-insert", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is None:
                try:
                    _insert(self.con, *job)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the submitting thread
                    self.error = exc

    def __call__(self, table: str, cols: dict[str, np.ndarray]) -> int:
        if self.error is not None:
            raise self.error
        n = len(next(iter(cols.values())))
        if n:
            self.q.put((table, cols))
        return n

    def __enter__(self) -> "_Inserter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


# per aggregate table: its key columns (after step, layer) and summed value columns
_AGG_TABLES = {
    "expert_load": (("expert",), ("tokens",)),
    "expert_load_rank": (("src_rank",), ("tokens",)),  # tokens: a list per row, summed element-wise
    "traffic": (("src_rank", "dst_rank"), ("tokens", "bytes")),
    "rank_load": (("rank",), ("sent_tokens", "recv_tokens", "recv_slots", "recv_bytes")),
}


def _emit(con, results: list, facts: dict, merge: bool, put=None) -> dict[str, int]:
    """Insert the shard results' aggregates, (step, layer) block by block, in key order.

    With `merge`, rows of (step, layer) pairs already in the index are summed with them.
    put: an open _Inserter on `con` (the blocks' inserts overlap the next block's merge)."""
    R, E = facts["world_size"], facts["num_experts"]
    X = max(E // max(R, 1), 1)
    parts = [r for r in results if r.load_PE is not None and len(r.sl_P2)]
    added = {t: 0 for t in _AGG_TABLES}
    if not parts:
        return added
    key = lambda sl: (sl[:, 0].astype(np.int64) << 20) + sl[:, 1] + 1  # noqa: E731
    keys = np.unique(np.concatenate([key(r.sl_P2) for r in parts]))
    sl_all = np.stack([keys >> 20, (keys & ((1 << 20) - 1)) - 1], axis=1)
    pos = [np.searchsorted(keys, key(r.sl_P2)) for r in parts]
    overlap = None
    if merge:
        have = con.execute("SELECT DISTINCT step, layer FROM rank_load").fetchnumpy()
        if len(have["step"]):
            have_k = key(np.stack([have["step"], have["layer"]], axis=1).astype(np.int64))
            hit = np.isin(keys, have_k)
            if hit.any():
                overlap = sl_all[hit]
    target = {t: (f"d_{t}" if overlap is not None else t) for t in _AGG_TABLES}
    if overlap is not None:
        for t in _AGG_TABLES:
            con.execute(f"CREATE TEMP TABLE d_{t} AS SELECT * FROM {t} LIMIT 0")
    with (_Inserter(con) if put is None else contextlib.nullcontext(put)) as put:
        _blocks(put, parts, pos, sl_all, keys, R, E, X, target, added)
    if overlap is not None:
        _merge(con, overlap)
    return added


def _blocks(put, parts: list, pos: list, sl_all: np.ndarray, keys: np.ndarray, R: int, E: int, X: int,
            target: dict, added: dict) -> None:
    """_emit's dense merge, block by block, each block's rows handed to `put`."""
    # blocks of BLOCK_PAIRS at most: small enough that inserting one overlaps merging the next
    block = max(1, min(BLOCK_PAIRS, DENSE_CELLS // max(R * E, 1)))
    for a in range(0, len(keys), block):
        b = min(a + block, len(keys))
        n = b - a
        load_PRE = np.zeros((n, R, E), np.int32)
        sent_PRR = np.zeros((n, R, R), np.int64)
        bytes_PRR = np.zeros((n, R, R), np.int64)
        recv_PE = np.zeros((n, E), np.int64)
        for r, p in zip(parts, pos):  # p ascending: this block's pairs are a slice of it
            i0, i1 = np.searchsorted(p, (a, b))
            if i0 == i1:
                continue
            q = p[i0:i1] - a
            if q[-1] - q[0] == i1 - i0 - 1:  # consecutive pairs (the usual case): slices, no gather
                q = slice(int(q[0]), int(q[-1]) + 1)
            load_PRE[q, r.rank] += r.load_PE[i0:i1]
            sent_PRR[q, r.rank] += r.sent_PR[i0:i1]
            bytes_PRR[q, r.rank] += r.bytes_PR[i0:i1]
            if r.recv_PE is not None:
                recv_PE[q] += r.recv_PE[i0:i1]
        step_n, layer_n = sl_all[a:b, 0].astype(np.int32), sl_all[a:b, 1].astype(np.int16)
        # expert_load_rank: one list row per (p, src) that routed anything, in (step, layer, src) order
        (pi, ri), rows = _cells(load_PRE.any(axis=2))
        added["expert_load_rank"] += put(target["expert_load_rank"], {
            "step": step_n[pi], "layer": layer_n[pi], "src_rank": ri.astype(np.int16),
            "tokens": rows(load_PRE.reshape(n, R, E), (n * R, E))})
        load_PE = load_PRE.sum(1, dtype=np.int64) + recv_PE
        (pi, ei), cells = _cells(load_PE)
        added["expert_load"] += put(target["expert_load"], {
            "step": step_n[pi], "layer": layer_n[pi], "expert": ei.astype(np.int16),
            "tokens": cells(load_PE).astype(np.int32)})
        (pi, si, di), cells = _cells(sent_PRR)
        added["traffic"] += put(target["traffic"], {
            "step": step_n[pi], "layer": layer_n[pi], "src_rank": si.astype(np.int16),
            "dst_rank": di.astype(np.int16), "tokens": cells(sent_PRR).astype(np.int32),
            "bytes": cells(bytes_PRR)})
        slots_PR = load_PE[:, :R * X].reshape(n, R, X).sum(2)
        pi = np.repeat(np.arange(n), R)
        added["rank_load"] += put(target["rank_load"], {
            "step": step_n[pi], "layer": layer_n[pi], "rank": np.tile(np.arange(R, dtype=np.int16), n),
            "sent_tokens": sent_PRR.sum(2).ravel().astype(np.int32),
            "recv_tokens": sent_PRR.sum(1).ravel().astype(np.int32),
            "recv_slots": slots_PR.ravel().astype(np.int32), "recv_bytes": bytes_PRR.sum(1).ravel()})


def _cells(mask: np.ndarray):
    """(coordinates of mask's nonzero cells in C order, take) where take(a, flat_shape) gives
    those cells of an array shaped like mask (a's trailing dims kept; flat_shape: a with mask's
    dims flattened into one). Every cell nonzero (dense traffic and load at scale, the usual
    case): coordinates from repeat/tile and `take` a reshape, no scan and no gather."""
    shape = mask.shape
    if mask.all():
        coords, inner = [], int(np.prod(shape))
        for d in shape:
            inner //= d
            coords.append(np.tile(np.repeat(np.arange(d), inner), mask.size // (d * inner)))
        return tuple(coords), lambda a, flat=None: a.reshape(flat or (mask.size,) + a.shape[mask.ndim:])
    coords = np.nonzero(mask)
    return coords, lambda a, flat=None: a[coords]


def _merge(con, overlap: np.ndarray) -> None:
    """Sum the delta tables d_<t> into <t>, rewriting only the rows of the overlapping pairs."""
    con.register("ov_pairs", _arrow({"step": overlap[:, 0].astype(np.int32),
                                     "layer": overlap[:, 1].astype(np.int16)}))
    con.execute("CREATE TEMP TABLE ov AS SELECT * FROM ov_pairs")
    con.unregister("ov_pairs")
    for t, (keys, vals) in _AGG_TABLES.items():
        k = ", ".join(("step", "layer") + keys)
        if t == "expert_load_rank":  # element-wise sum of the lists of equal keys
            con.execute(f"""CREATE TEMP TABLE m_{t} AS SELECT {k}, list(v ORDER BY i) AS tokens FROM (
                SELECT {k}, i, sum(v) AS v FROM (
                    SELECT {k}, unnest(tokens) AS v, generate_subscripts(tokens, 1) AS i FROM (
                        SELECT * FROM {t} SEMI JOIN ov USING (step, layer) UNION ALL SELECT * FROM d_{t}))
                GROUP BY {k}, i) GROUP BY {k}""")
            con.execute(f"DELETE FROM {t} USING ov WHERE {t}.step = ov.step AND {t}.layer = ov.layer")
            con.execute(f"INSERT INTO {t} SELECT * FROM m_{t} ORDER BY {k}")
            con.execute(f"DROP TABLE m_{t}; DROP TABLE d_{t}")
            continue
        sums = ", ".join(f"sum({v}) AS {v}" for v in vals)
        con.execute(f"""CREATE TEMP TABLE m_{t} AS SELECT {k}, {sums} FROM (
            SELECT * FROM {t} SEMI JOIN ov USING (step, layer) UNION ALL SELECT * FROM d_{t})
            GROUP BY {k}""")
        con.execute(f"DELETE FROM {t} USING ov WHERE {t}.step = ov.step AND {t}.layer = ov.layer")
        con.execute(f"INSERT INTO {t} SELECT * FROM m_{t} ORDER BY {k}")
        con.execute(f"DROP TABLE m_{t}; DROP TABLE d_{t}")
    con.execute("DROP TABLE ov")


def _ingest(con, run: RunDir, facts: dict, results: list, shard_paths: list[Path], merge: bool) -> dict[str, int]:
    """Insert everything the workers found; returns rows added per table."""
    from epreplay import __version__

    cols = [r.calls for r in results if r.calls and len(r.calls["rank"])]
    added: dict[str, int] = {"calls": 0, "events": 0}
    with _Inserter(con) as put:  # calls and events insert while the aggregates are merged
        if cols:
            calls = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
            order = np.lexsort((calls["seq"], calls["buffer"], calls["rank"], calls["layer"], calls["step"]))
            added["calls"] = put("calls", {k: v[order] for k, v in calls.items()})
        ev = [(r.rank, *e) for r in results for e in r.events]
        if ev:
            added["events"] = put("events", {
                "rank": np.array([e[0] for e in ev], np.int16),
                "shard_offset": np.array([e[1] for e in ev], np.uint64),
                "start_ns": np.array([e[2] for e in ev], np.int64), "reason": np.array([e[3] for e in ev], object),
                "detail": np.array([e[4] for e in ev], object)})
        if not merge:  # a merge queries and rewrites tables: it runs after these inserts
            added.update(_emit(con, results, facts, merge, put))
    if merge:
        added.update(_emit(con, results, facts, merge))
    manifest = facts["manifest"]
    ranks_facts = manifest.ranks if manifest is not None else {}
    touched = [r.rank for r in results]
    if touched:
        con.execute(f"DELETE FROM shards WHERE rank IN ({', '.join(map(str, touched))})")
        counts = dict(con.execute(
            "SELECT rank, count(*) FROM calls GROUP BY rank").fetchall())
        ev_counts = dict(con.execute("SELECT rank, count(*) FROM events GROUP BY rank").fetchall())
        rows = []
        for r in results:
            dropped = max(r.dropped, int((ranks_facts.get(str(r.rank)) or {}).get("dropped") or 0))
            rows.append((r.rank, f"shards/{Path(r.path).name}", r.size, r.records, counts.get(r.rank, 0),
                         ev_counts.get(r.rank, 0), r.complete, r.writer_active, r.truncated_at,
                         r.size - r.truncated_at if r.truncated_at is not None else 0, dropped,
                         r.problem, r.indexed_end,
                         # a stamp of other bytes than those scanned (written to meanwhile) must
                         # never match: mtime 0 makes the next open re-read the shard
                         r.stamp.mtime_ns if r.stamp.size == r.size else 0, r.stamp.crc))
        names = ["rank", "path", "bytes", "records", "calls", "events", "complete", "writer_active",
                 "truncated_at", "lost_bytes", "dropped", "problem", "indexed_end", "mtime_ns", "stamp_crc"]
        dtypes = [np.int16, object, np.uint64, np.uint32, np.uint32, np.uint32, bool, bool, object,
                  np.uint64, np.uint32, object, np.uint64, np.int64, np.uint64]
        _insert_rows(con, "shards", names, dtypes, rows)
    present = {run.rank_of(p) for p in shard_paths}
    missing = sorted(set(range(facts["world_size"])) - present)
    dropped = con.execute("SELECT coalesce(sum(dropped), 0) FROM shards").fetchone()[0]
    con.execute("DELETE FROM runs")
    con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP, ?, ?)", [
        facts["run_id"], facts["created"], facts["release"], facts["world_size"], facts["num_experts"],
        facts["topk"], facts["hidden"], facts["level"], facts["x_dtype"], len(shard_paths),
        ",".join(map(str, missing)), int(dropped), INDEX_VERSION, __version__])
    return added


def _insert_rows(con, table: str, names: list[str], dtypes: list, rows: list[tuple]) -> None:
    """A few rows (shards, replays) through Arrow as well: column by column."""
    import pyarrow as pa

    cols = {}
    for i, (name, dt) in enumerate(zip(names, dtypes)):
        vals = [row[i] for row in rows]
        if dt is object:
            cols[name] = pa.array(vals if any(isinstance(v, str) for v in vals) or not any(
                v is not None for v in vals) else [None if v is None else int(v) for v in vals],
                pa.string() if any(isinstance(v, str) for v in vals) or not any(v is not None for v in vals)
                else pa.uint64())
        else:
            cols[name] = pa.array(np.array(vals, dt))
    con.register("rows_batch", pa.table(cols))
    con.execute(f"INSERT INTO {table} SELECT * FROM rows_batch")
    con.unregister("rows_batch")


def _loaded_replays(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT replay FROM replays").fetchall()}


_DIV_COLS = [("replay", object), ("call", np.uint32), ("buffer", np.uint16), ("seq", np.uint32),
             ("step", np.int32), ("layer", np.int16), ("op", object), ("rank", np.int16),
             ("phys_rank", np.int16), ("kind", object), ("token", np.int32), ("src_rank", np.int16),
             ("expert", np.int16), ("expected", object), ("got", object), ("detail", object)]


def _load_report(con, run: RunDir, report: dict | Path) -> str | None:
    """Insert one replay report (replay/report.py's to_dict(), or its JSON file); returns its id,
    None when it was loaded already. Raises UsageError for a report that is not one."""
    rel = ""
    if not isinstance(report, dict):
        path = Path(report)
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable replay report ({exc}); move it out of "
                             f"{run.replays_dir}") from None
        rel = f"{run.replays_dir.name}/{path.name}"
    try:
        rid = str(report["id"])
        if rid in _loaded_replays(con):
            return None
        plan = report.get("plan") or {}
        rel = rel or f"{run.replays_dir.name}/{rid}.json"
        con.execute("INSERT INTO replays VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            rid, report.get("run_id", ""), report.get("created", ""), report.get("backend", ""),
            report.get("device", ""), report.get("payload", ""), int(plan.get("virtual_ranks") or 0),
            int(plan.get("physical_ranks") or 0), int(report.get("calls") or 0),
            int(report.get("scheduled") or 0), int(report.get("divergences") or 0),
            report.get("stopped"), float(report.get("wall_s") or 0.0),
            int(report.get("exit_code", 1 if report.get("divergences") else 0)),
            report.get("verdict", ""), rel])
        divs = report.get("divergence_list") or []
        if divs:
            get = {"replay": lambda d: rid, "phys_rank": lambda d: d.get("physical", -1)}
            rows = [tuple(get[c](d) if c in get else d.get(c, -1 if dt is not object else "")
                          for c, dt in _DIV_COLS) for d in divs]
            _insert_rows(con, "divergences", [c for c, _ in _DIV_COLS], [dt for _, dt in _DIV_COLS], rows)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"replay report {rel or '?'}: malformed ({exc})") from None
    return rid
