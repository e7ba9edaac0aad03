"""The index's `clock` table: each rank's clock offset (epreplay.format.clock), re-estimated from the
`calls` table whenever the index is built or updated (the estimate uses every collective so far).

    refresh(con, manifest)   # I/O on an open index connection; returns the ClockEstimate
"""
from __future__ import annotations

import numpy as np

from epreplay.format.clock import SYNC_OPS, ClockEstimate, estimate
from epreplay.format.records import Manifest

# op_t's codes are 0-based in Op order (index/schema.sql), so Op value = enum_code + 1.
CALL_ENDS = f"""
SELECT rank, buffer, seq, enum_code(op)::INTEGER + 1 AS op, start_ns, duration_ns FROM calls
WHERE status = 'ok' AND duration_ns >= 0 AND enum_code(op) + 1 IN ({", ".join(map(str, SYNC_OPS))})"""


def nodes_of(manifest: Manifest | None, ranks: list[int]) -> tuple[dict[int, int], dict[int, str]]:
    """(rank -> node, rank -> host) from the manifest's ranks entries. Recordings made before
    nodes were recorded name only hosts: then each distinct host is a node (in host order)."""
    entries = {int(r): f for r, f in (manifest.ranks.items() if manifest is not None else ())}
    host_of = {r: str(entries.get(r, {}).get("host") or "") for r in ranks}
    node_of = {r: int(entries.get(r, {}).get("node", -1)) for r in ranks}
    if all(n < 0 for n in node_of.values()):
        hosts = sorted({h for h in host_of.values() if h})
        node_of = {r: hosts.index(host_of[r]) if host_of[r] in hosts else -1 for r in ranks}
    return node_of, host_of


def refresh(con, manifest: Manifest | None) -> ClockEstimate:
    """Re-estimate every rank's offset from the indexed calls and rewrite the clock table."""
    import pyarrow as pa

    d = con.execute(CALL_ENDS).fetchnumpy()
    ranks = [int(r) for r, in con.execute("SELECT DISTINCT rank FROM calls ORDER BY rank").fetchall()]
    node_of, host_of = nodes_of(manifest, ranks)
    est = estimate(*(np.asarray(d[k]) for k in ("rank", "buffer", "seq", "op", "start_ns", "duration_ns")),
                   node_of=node_of)
    calls = dict(zip(est.rank_R.tolist(), est.calls_R.tolist()))
    pos = {int(r): i for i, r in enumerate(est.rank_R)}
    offset = [int(est.offset_R[pos[r]]) if r in pos else 0 for r in ranks]
    own = [int(est.rank_offset_R[pos[r]]) if r in pos else 0 for r in ranks]
    table = pa.table({"rank": pa.array(ranks, pa.int16()), "node": pa.array([node_of[r] for r in ranks], pa.int16()),
                      "host": pa.array([host_of[r] for r in ranks], pa.string()),
                      "offset_ns": pa.array(offset, pa.int64()), "rank_offset_ns": pa.array(own, pa.int64()),
                      "calls": pa.array([int(calls.get(r, 0)) for r in ranks], pa.uint32())})
    con.execute("DELETE FROM clock")
    con.register("clock_batch", table)
    con.execute("INSERT INTO clock SELECT * FROM clock_batch")
    con.unregister("clock_batch")
    return est
