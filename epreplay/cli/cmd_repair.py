"""`epreplay repair PATH`: cut damaged shards back to their intact prefix and close them.

For each damaged shard (truncated, or corrupt records behind a footer) the original is kept as
PATH.bak (never overwritten: repair refuses while one exists), the file is truncated after its last
intact record and a footer is written. Healthy shards are not touched. On a run directory every
shard is repaired, and a manifest.json that is missing, unreadable or misdescribes the shards
(world size 0 after an interrupted capture, a rank it does not list) is rebuilt from the shard
headers (the old one kept as manifest.json.bak, never overwritten: repair refuses while one exists).
Exit code: 0 when everything is healthy or repaired, 2 for bad input or a repair refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
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


def _rebuild_manifest(rundir) -> str | None:
    """Rebuild manifest.json from the shard headers when it is missing, unreadable, or
    misdescribes the shards (world size 0 after an interrupted capture, another world size or
    run id, a rank with a shard but no entry: format.census.disagreement). What the old one holds
    and the shards do not (command, versions, closing facts) is kept, and the old file too, as
    manifest.json.bak (never overwritten). Returns a note, or None when nothing was to do."""
    from epreplay.errors import UsageError
    from epreplay.format.census import described, disagreement, read_shards

    path = rundir.manifest_path
    found, _ = read_shards(rundir)  # unreadable shards were reported by the shard repair
    try:
        old = rundir.read_manifest()
        why = "missing" if old is None else disagreement(old, [f.info for f in found])
    except UsageError:
        old, why = None, "unreadable"
    if why is None:
        return None
    state = f"said {why}" if old is not None else f"was {why}"
    if not found:
        return f"{path}: {state}, and no readable shard to rebuild it from"
    writing = [f.path for f in found if f.writing]
    if writing:
        return (f"{path}: {state}; not rebuilt while a running process still writes {writing[0]}: "
                f"its ranks complete it when they close; if they were killed, run "
                f"'epreplay repair {rundir.path}' again once they are gone")
    manifest = described(old, found)
    manifest = replace(manifest, extra={**manifest.extra, "rebuilt_by": "epreplay repair",
                                        "rebuilt_because": why,
                                        "rebuilt_from_shards": len(found)})
    note = f"{path}: {state}; rebuilt from {len(found)} shard header(s)"
    if path.exists():
        backup = path.with_name(path.name + ".bak")
        try:
            with open(backup, "xb") as dst:  # "x": never overwritten, as shard_repair's backups
                dst.write(path.read_bytes())
        except FileExistsError:
            raise UsageError(f"{backup} already exists and is never overwritten; move it away, "
                             f"then run 'epreplay repair {rundir.path}' again") from None
        os.chmod(backup, 0o600)
        note += f"; the old one kept as {backup}"
    rundir.write_manifest(manifest)  # atomic: there is a manifest.json at every moment
    return note


def run(args: argparse.Namespace) -> int:
    from epreplay.errors import ShardError, UsageError
    from epreplay.format.run import RunDir
    from epreplay.format.shard import repair

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
    note = _rebuild_manifest(rundir)
    if note:
        print(note)
    if not shards:
        print(f"{rundir.shards_dir}: no shards to repair")
    return 2 if failed else 0
