"""`epreplay inspect PATH`: a shard's or a run's header, record counts per op, and health.

Health of a shard, worst first:
  corrupt    records listed by a valid footer whose bytes fail their CRC (--quick skips the check)
  truncated  no valid footer and the scan stopped at byte N: N..end is lost (a crash mid-write)
  unclosed   no footer, every record intact, no writer alive (killed between records)
  writing    a live capture process still holds the shard (its last record may be in flight)
  complete   valid footer, every record intact
  unreadable a name like a shard's that is no shard file: a directory, FIFO, device, or a symlink
             leaving the run (listed by name, never opened)
Exit code: 0 when every shard is complete, writing or unclosed, 1 when any is truncated/corrupt/unreadable
or a rank below the manifest's world size has no shard, 2 for bad input (missing path, not a shard, not a run).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

HELP = "show a shard's or a run's header, record counts per op and health"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a shard file (.eprs) or a run directory")
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="output format (default: text)")
    parser.add_argument("--quick", action="store_true",
                        help="skip CRC-checking every record of complete shards (reads headers only)")
    parser.add_argument("--list", action="store_true",
                        help="also list records: offset, kind, op, buffer/seq, step, layer, tokens, bytes")
    parser.add_argument("--limit", type=int, default=50, metavar="N",
                        help="records listed per shard with --list (0: all; default 50)")
    parser.add_argument("--record", type=int, metavar="OFFSET",
                        help="dump one record of a shard file (byte offset from --list): header, "
                             "meta, and each array's dtype, shape, range and first values")


def shard_summary(path: Path, *, verify: bool = True) -> dict:
    """A JSON-able summary of one shard. Raises ShardError when `path` is not a shard."""
    import numpy as np

    from epreplay.errors import ShardError
    from epreplay.format.records import Kind, Op, RecordHeader
    from epreplay.format.shard import Entry, open_shard

    with open_shard(path) as scan:
        corrupt = scan.verify() if (verify and scan.complete) else []
        heads = scan.header_array()  # vectorised: no Python object per record
        calls = heads[heads["kind"] == int(Kind.CALL)]
        ops: Counter[str] = Counter()
        for code, n in zip(*np.unique(calls["op"], return_counts=True)):
            ops[Op(int(code)).label if int(code) in Op._value2member_map_ else f"op{code}"] += int(n)
        reasons: Counter[str] = Counter()
        dropped = 0
        bad_offsets = {off for off, _ in corrupt}
        for row in heads[heads["kind"] == int(Kind.EVENT)]:  # recorder events: few and small
            if int(row["offset"]) in bad_offsets:
                continue
            try:
                meta = scan.read(Entry(int(row["offset"]), RecordHeader.from_bytes(row.tobytes()[8:]))).meta
            except ShardError:
                continue
            reasons[str(meta.get("reason", "?"))] += 1
            if isinstance(meta.get("dropped"), int):
                dropped = max(dropped, meta["dropped"])  # events carry the running total
        if corrupt:
            health = "corrupt"
        elif scan.truncated_at is not None:
            health = "truncated"
        elif scan.complete:
            health = "complete"
        else:
            health = "writing" if scan.writer_active else "unclosed"
        info = scan.info
        return {
            "path": str(path), "size": scan.size, "health": health,
            "info": {"run_id": info.run_id, "rank": info.rank, "world_size": info.world_size,
                     "num_experts": info.num_experts, "topk": info.topk, "hidden": info.hidden,
                     "level": info.level.label, "created_ns": info.created_ns,
                     "version": info.version},
            "records": len(heads), "calls": len(calls), "events": len(heads) - len(calls),
            "event_reasons": dict(reasons), "dropped": dropped,
            "ops": {op.label: ops.get(op.label, 0) for op in Op} | {k: v for k, v in ops.items()
                                                                     if k.startswith("op")},
            "tokens": int(calls["tokens"].sum(dtype=np.int64)),
            "compressed_bytes": int(heads["comp_len"].sum(dtype=np.int64)),
            "raw_bytes": int(heads["raw_len"].sum(dtype=np.int64)),
            "steps": [int(calls["step"].min()), int(calls["step"].max())] if len(calls) else None,
            "layers": [int(calls["layer"].min()), int(calls["layer"].max())] if len(calls) else None,
            "complete": scan.complete, "truncated_at": scan.truncated_at,
            "lost_bytes": scan.lost_bytes, "problem": scan.problem,
            "writer_active": scan.writer_active,
            "corrupt": [{"offset": off, "problem": why} for off, why in corrupt],
            "verified": bool(verify and scan.complete),
        }


def _manifest_problem(manifest, summaries: list[dict]) -> str | None:
    """How the manifest misdescribes the shards summarised (e.g. world size 0 after a capture
    stopped before any rank closed), or None."""
    from epreplay.format.records import Level, ShardInfo
    from epreplay.format.census import disagreement

    if manifest is None or any(s["health"] == "writing" for s in summaries):
        return None  # a capture still running: its ranks complete the manifest when they close
    headers = [ShardInfo(**{**s["info"], "level": Level.parse(s["info"]["level"])})
               for s in summaries if "info" in s]
    return disagreement(manifest, headers)


def record_rows(path: Path, limit: int) -> list[dict]:
    """One dict per record (header fields only, nothing decompressed); `limit` 0 for all."""
    from epreplay.format.records import Kind, Op
    from epreplay.format.shard import open_shard

    with open_shard(path) as scan:
        entries = scan.entries if limit <= 0 else scan.entries[:limit]
        rows = []
        for e in entries:
            h = e.header
            op = "-" if h.kind == Kind.EVENT else (Op(h.op).label if h.op in Op._value2member_map_ else f"op{h.op}")
            rows.append({"offset": e.offset, "kind": Kind(h.kind).name.lower(), "op": op,
                         "status": h.status.name.lower(), "buffer": h.buffer, "seq": h.seq,
                         "step": h.step, "layer": h.layer, "tokens": h.tokens,
                         "comp_len": h.comp_len, "raw_len": h.raw_len,
                         "start_ns": h.start_ns, "duration_ns": h.duration_ns})
        return rows


def record_dump(path: Path, offset: int) -> dict:
    """One record decoded: header, meta and a summary of every array (JSON-able)."""
    import numpy as np

    from epreplay.format.codec import logical_dtype
    from epreplay.format.records import Kind, Op
    from epreplay.format.shard import open_shard

    with open_shard(path) as scan:
        rec = scan.read_at(offset)
    arrays = {}
    for name, a in rec.arrays.items():
        numeric = a.size and a.dtype.kind in "biuf" and not logical_dtype(rec.meta, name)
        arrays[name] = {
            "dtype": logical_dtype(rec.meta, name) or str(a.dtype), "shape": list(a.shape),
            "min": np.min(a).item() if numeric else None, "max": np.max(a).item() if numeric else None,
            "head": a.reshape(-1)[:8].tolist()}
    h = rec.header
    op = h.op_enum.label if h.kind == Kind.CALL and h.op in Op._value2member_map_ else h.op
    return {"offset": offset, "header": {"kind": h.kind.name.lower(), "op": op, "level": h.level.label,
                                         "status": h.status.name.lower(), "buffer": h.buffer, "seq": h.seq,
                                         "step": h.step, "layer": h.layer, "tokens": h.tokens,
                                         "start_ns": h.start_ns, "duration_ns": h.duration_ns},
            "meta": rec.meta, "arrays": arrays}


def _health_line(s: dict) -> str:
    if s["health"] == "unreadable":
        return f"UNREADABLE: {s['problem']}"
    if s["health"] == "corrupt":
        first = s["corrupt"][0]
        return (f"CORRUPT: {len(s['corrupt'])} record(s) fail their CRC, first at byte "
                f"{first['offset']} ({first['problem']}); run 'epreplay repair {s['path']}'")
    if s["health"] == "truncated":
        return (f"TRUNCATED at byte {s['truncated_at']}: {s['lost_bytes']} bytes lost, "
                f"{s['records']} records intact; run 'epreplay repair {s['path']}'")
    if s["health"] == "writing":
        return f"being written by a live process ({s['records']} records so far)"
    if s["health"] == "unclosed":
        return (f"unclosed: no footer (the writer stopped between records), all {s['records']} "
                f"records intact; 'epreplay repair {s['path']}' adds the footer")
    return "complete" + ("" if s["verified"] else " (footer valid; records not CRC-checked: --quick)")


def _print_shard(s: dict) -> None:
    print(f"shard {s['path']}  ({s['size']:,} bytes)")
    if "info" not in s:
        print(f"  health   {_health_line(s)}")
        return
    i = s["info"]
    print(f"  run {i['run_id']}  rank {i['rank']}/{i['world_size']}  E={i['num_experts']} "
          f"K={i['topk']} H={i['hidden']}  level={i['level']}  format v{i['version']}")
    ratio = s["raw_bytes"] / s["compressed_bytes"] if s["compressed_bytes"] else 0.0
    print(f"  records  {s['records']} ({s['calls']} calls, {s['events']} events)  tokens {s['tokens']:,}"
          f"  data {s['compressed_bytes']:,} B compressed ({ratio:.1f}x)")
    if s["steps"]:
        print(f"  steps    {s['steps'][0]}..{s['steps'][1]}  layers {s['layers'][0]}..{s['layers'][1]}")
    counts = "  ".join(f"{op} {n}" for op, n in s["ops"].items() if n)
    print(f"  per op   {counts or '-'}")
    if s["event_reasons"]:
        reasons = "  ".join(f"{r} {n}" for r, n in sorted(s["event_reasons"].items()))
        print(f"  events   {reasons}" + (f"  (capture dropped {s['dropped']} calls)" if s["dropped"] else ""))
    print(f"  health   {_health_line(s)}")


def _print_records(rows: list[dict], total: int) -> None:
    print(f"  {'offset':>10} {'kind':<5} {'op':<15} {'status':<6} {'buf':>3} {'seq':>6} {'step':>5} "
          f"{'layer':>5} {'tokens':>6} {'bytes':>8}")
    for r in rows:
        print(f"  {r['offset']:>10} {r['kind']:<5} {r['op']:<15} {r['status']:<6} {r['buffer']:>3} "
              f"{r['seq']:>6} {r['step']:>5} {r['layer']:>5} {r['tokens']:>6} {r['comp_len']:>8}")
    if len(rows) < total:
        print(f"  ... {total - len(rows)} more (--limit 0 lists all)")


def run(args: argparse.Namespace) -> int:  # a broken pipe (`| head`) is handled in epreplay.cli
    from epreplay.errors import ShardError, UsageError
    from epreplay.format.run import RunDir

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory; give a shard (.eprs) or a run directory")
    if args.record is not None:
        if not path.is_file():
            raise UsageError(f"--record needs one shard file, not the directory {path}")
        dump = record_dump(path, args.record)
        if args.format == "json":
            print(json.dumps(dump, indent=2, default=str))
            return 0
        print(f"record at byte {args.record} of {path}")
        print("  header " + "  ".join(f"{k}={v}" for k, v in dump["header"].items()))
        print(f"  meta   {json.dumps(dump['meta'], default=str)}")
        for name, a in dump["arrays"].items():
            rng = f"  range {a['min']}..{a['max']}" if a["min"] is not None else ""
            print(f"  {name:<26} {a['dtype']:<14} {str(a['shape']):<14}{rng}  head {a['head']}")
        return 0
    run_info = None
    if path.is_dir():
        rundir = RunDir.open(path)
        manifest = rundir.read_manifest()
        shards, problems = rundir.shard_listing()
        # listed, never opened (a FIFO would block, a link leaving the run is not the run's)
        summaries = [{"path": msg.split(": ", 1)[0], "size": 0, "health": "unreadable",
                      "problem": msg, "records": 0} for msg in problems]
        for shard in shards:
            try:
                summaries.append(shard_summary(shard, verify=not args.quick))
            except ShardError as exc:  # one bad file must not hide the others
                summaries.append({"path": str(shard), "size": shard.stat().st_size,
                                  "health": "unreadable", "problem": str(exc), "records": 0})
        run_info = {"path": str(path), "run_id": manifest.run_id if manifest else None,
                    "world_size": manifest.world_size if manifest else None,
                    "level": manifest.level if manifest else None,
                    "release": manifest.release if manifest else None,
                    "manifest": manifest is not None, "shards": len(summaries),
                    "missing_ranks": rundir.missing_ranks(manifest.world_size if manifest else None),
                    "records": sum(s["records"] for s in summaries),
                    "interrupted": bool(manifest and manifest.extra.get("interrupted")),
                    "manifest_problem": _manifest_problem(manifest, summaries),
                    "steps": _steps(rundir, shards)}
    else:
        summaries = [shard_summary(path, verify=not args.quick)]
    bad = [s for s in summaries if s["health"] in ("truncated", "corrupt", "unreadable")]
    missing = run_info["missing_ranks"] if run_info is not None else []
    if args.list:
        for s in summaries:
            if s["health"] != "unreadable":
                s["record_list"] = record_rows(Path(s["path"]), args.limit)
    if args.format == "json":
        print(json.dumps({"run": run_info, "shards": summaries, "healthy": not bad and not missing},
                         indent=2))
        return 1 if bad or missing else 0
    if run_info is not None:
        print(f"run {run_info['path']}  id {run_info['run_id'] or '? (no manifest.json)'}  "
              f"world {run_info['world_size']}  level {run_info['level']}  "
              f"{run_info['shards']} shards, {run_info['records']} records"
              + ("  (interrupted)" if run_info["interrupted"] else ""))
        if run_info["steps"]:
            print(f"  {run_info['steps']['text']}")
        if run_info["manifest_problem"]:
            print(f"  manifest.json says {run_info['manifest_problem']}; "
                  f"'epreplay repair {path}' rebuilds it from the shards")
        if not summaries:
            print("  no shards yet (shards/ is empty)")
    for s in summaries:
        _print_shard(s)
        if "record_list" in s:
            _print_records(s["record_list"], s["records"])
    if run_info is not None and summaries:
        health = Counter(s["health"] for s in summaries)
        print("health: " + ", ".join(f"{n} {h}" for h, n in sorted(health.items()))
              + (f"; {no_shard(missing)}" if missing else ""))
        if missing and manifest is not None and int(manifest.extra.get("nnodes") or 1) > 1 \
                and "merged" not in manifest.extra:
            print(f"  a node's part of a {manifest.extra['nnodes']}-node run: join the parts with "
                  f"'epreplay merge PART... --out RUN'")
    return 1 if bad or missing else 0


def _steps(rundir, shards: list[Path]) -> dict | None:
    """How the run's steps were found (epreplay.format.steps), as JSON; None without any shard."""
    from epreplay.format.steps import plan_of_run

    if not shards:
        return None
    plan = plan_of_run(rundir, shards)
    return {"method": plan.method, "layers_per_step": plan.layers_per_step, "detail": plan.detail,
            "text": plan.describe()}


def no_shard(missing: list[int]) -> str:
    """'1 rank with no shard (rank 0)': the count first, so rank 0 cannot read as 'none'."""
    n = len(missing)
    return f"{n} rank{'s' if n > 1 else ''} with no shard ({'rank' if n == 1 else 'ranks'} " \
           f"{', '.join(map(str, missing))})"
