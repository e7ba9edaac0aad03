"""Loading a replay report (RUN/replays/<id>.json) into RUN/index.duckdb: its replays and divergences rows."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from epreplay.format.run import RunDir
from epreplay.index.build import _existing, build_index
from epreplay.index.lock import IndexLocked, WriterLock, connect
from epreplay.index.store import _load_report


def load_replay_report(run: str | os.PathLike[str], report: dict | str | os.PathLike[str], *,
                       wait_s: float = 60.0) -> bool:
    """Load a replay report into RUN/index.duckdb (building the index first when missing).

    Args:
        report: ReplayReport.to_dict() (its "id", "plan", "divergence_list", ...), or the path
            of RUN/replays/<id>.json. Columns it fills: see the replays / divergences tables in
            epreplay/index/schema.sql (divergence_list entries: call, buffer, seq, step, layer,
            op, rank, physical -> phys_rank, kind, token, src_rank, expert, expected, got, detail).
        wait_s: how long to wait for another index writer.
    Returns:
        True when loaded, False when it was already there or the index stayed locked for wait_s
        (the JSON file in RUN/replays is loaded by the next `epreplay index` / ensure_index).
    """
    import duckdb

    rundir = RunDir.open(run)
    if not rundir.index_path.exists():
        try:
            build_index(rundir.path)  # loads RUN/replays/*.json on the way
        except IndexLocked:
            return False
        if isinstance(report, dict):
            state = _existing(rundir)
            if state and str(report.get("id")) in state["replays"]:
                return True
    try:
        with WriterLock(rundir, wait_s=wait_s):
            tmp = rundir.inside(f".index.duckdb.tmp-{os.getpid()}")
            try:
                shutil.copyfile(rundir.index_path, tmp)
                con = connect(tmp)
                try:
                    rid = _load_report(con, rundir, report if isinstance(report, dict) else Path(report))
                    con.execute("CHECKPOINT")
                finally:
                    con.close()
                if rid is None:
                    return False
                os.chmod(tmp, 0o600)
                os.replace(tmp, rundir.index_path)
            finally:
                for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                    if leftover.exists():
                        leftover.unlink()
    except IndexLocked:
        print(f"epreplay: {rundir.index_path} stayed locked for {wait_s:.0f} s; the replay report "
              f"will be loaded by the next 'epreplay index {rundir.path}'", file=sys.stderr)
        return False
    return True


load_replay = load_replay_report  # the name epreplay.replay.driver looks up
