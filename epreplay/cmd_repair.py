"""`epreplay repair PATH`: cut damaged shards back to their intact prefix and close them.

For each damaged shard (truncated, or corrupt records behind a footer) the original is kept as
PATH.bak (never overwritten: repair refuses while one exists), the file is truncated after its last
intact record and a footer is written. Healthy shards are not touched. On a run directory every
shard is repaired, and a missing or unreadable manifest.json is rebuilt from the shard headers
(the unreadable one kept as manifest.json.bak).
Exit code: 0 when everything is healthy or repaired, 2 for bad input or a repair refused.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "truncate damaged shards to their intact records and write a footer (keeps PATH.bak)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a shard file (.eprs) or a run directory")


def _describe(report) -> str:
    if report.action == "healthy":
        return f"{report.path}: healthy, nothing changed ({report.records} records)"
    return (f"{report.path}: repaired: kept {report.records} intact records, removed "
            f"{report.lost_bytes:,} damaged bytes, wrote a footer; original kept as {report.backup}"
            + (f" [{report.problem.split('; run ')[0]}]" if report.problem else ""))


def _rebuild_manifest(rundir, shards: list[Path]) -> str | None:
    """Write manifest.json from the shard headers when it is missing or unreadable."""
    from epreplay.errors import ShardError, UsageError
    from epreplay.records import Manifest
    from epreplay.shard import open_shard

    try:
        if rundir.read_manifest() is not None:
            return None
        state = "missing"
    except UsageError:
        state = "unreadable"
    infos = []
    for shard in shards:
        try:
            with open_shard(shard) as scan:
                infos.append((scan.info, len(scan.entries)))
        except ShardError:
            continue
    if not infos:
        return f"{rundir.manifest_path}: {state}, and no readable shard to rebuild it from"
    first = infos[0][0]
    if state == "unreadable":
        backup = rundir.manifest_path.with_name("manifest.json.bak")
        if backup.exists():
            raise UsageError(f"{backup} already exists and is never overwritten; move it away, "
                             f"then run 'epreplay repair {rundir.path}' again")
        rundir.manifest_path.rename(backup)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first.created_ns / 1e9))
    rundir.write_manifest(Manifest(
        run_id=first.run_id, created=created, world_size=first.world_size,
        num_experts=first.num_experts, topk=first.topk, hidden=first.hidden,
        level=first.level.label,
        ranks={str(info.rank): {"records": n} for info, n in infos},
        extra={"rebuilt_by": "epreplay repair", "rebuilt_from_shards": len(infos)}))
    return f"{rundir.manifest_path}: was {state}; rebuilt from {len(infos)} shard header(s)"


def run(args: argparse.Namespace) -> int:
    from epreplay.errors import ShardError, UsageError
    from epreplay.run import RunDir
    from epreplay.shard import repair

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory; give a shard (.eprs) or a run directory")
    if path.is_file():
        print(_describe(repair(path)))
        return 0
    rundir = RunDir.open(path)
    shards = rundir.shard_paths()
    failed = 0
    for shard in shards:
        try:
            print(_describe(repair(shard)))
        except ShardError as exc:  # report and go on: one refused shard must not block the rest
            print(f"epreplay repair: {exc}", file=sys.stderr)
            failed += 1
    note = _rebuild_manifest(rundir, shards)
    if note:
        print(note)
    if not shards:
        print(f"{rundir.shards_dir}: no shards to repair")
    return 2 if failed else 0
