"""Turn what the workers left behind (divergence files, summaries, the parent's hang and crash
findings) into one ReplayReport."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from epreplay.format.run import RunDir, new_run_id
from epreplay.index.rows import Divergence
from epreplay.replay import schedule as S
from epreplay.replay.report import OpStats, ReplayReport, first_of
from epreplay.replay.worker import Job


def build_report(job: Job, run: RunDir, sched: S.Schedule, hang: dict | None, died: dict[int, str],
             backend: str, device: str, wall_s: float, pids: list[int], *,
             allow_partial: bool = False) -> ReplayReport:
    work = Path(job.work_dir)
    plan = job.plan
    divs: list[dict] = []
    count, by_kind = 0, {}
    summaries = {}
    for p in range(plan.physical):
        f = work / f"divergences-{p}.jsonl"
        if f.exists():
            divs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        sf = work / f"summary-{p}.json"
        if sf.exists():
            summaries[p] = json.loads(sf.read_text())
    for p, s in summaries.items():
        count += s["divergences"]
        for k, n in s["by_kind"].items():
            by_kind[k] = by_kind.get(k, 0) + n
    for p in range(plan.physical):  # workers that never wrote a summary: count what they flushed
        if p not in summaries:
            mine = [d for d in divs if d["physical"] == p]
            count += len(mine)
            for d in mine:
                by_kind[d["kind"]] = by_kind.get(d["kind"], 0) + 1
    stopped = next((s["stopped"] for s in summaries.values() if s.get("stopped")), None)
    extra: list[Divergence] = []
    if hang is not None:
        c = job.calls[hang["call"]]
        for p in hang["physical"]:
            v = plan.virtual_of(p)[0]
            extra.append(Divergence(c.index, c.buffer, c.seq, c.step, c.layer, c.op.label, v, p, "hang",
                                    f"completes within {hang['seconds']:g}s",
                                    f"still running after {hang['seconds']:g}s on physical ranks "
                                    f"{hang['physical']}", detail="the call did not return; workers killed"))
        stopped = stopped or f"call {c.index} ({c.op.label} seq {c.seq}) hung; replay ended"
    elif died and not stopped:
        p, text = min(died.items())
        tail = text.strip().splitlines()[-1] if text.strip() else "process died"
        done = [s["done"] for s in summaries.values()]
        idx = min(done) if done else 0
        c = job.calls[min(idx, len(job.calls) - 1)]
        v = plan.virtual_of(max(p, 0))[0]
        extra.append(Divergence(c.index, c.buffer, c.seq, c.step, c.layer, c.op.label, v, max(p, 0), "error",
                                "the replay process completes", tail[:500], detail="a replay process failed"))
        stopped = f"physical rank {p} failed: {tail[:200]}"
    for d in extra:
        divs.append(d.to_dict())
        count += 1
        by_kind[d.kind] = by_kind.get(d.kind, 0) + 1
    divs.sort(key=lambda d: (d["call"], d["rank"]))
    done = min((s["done"] for s in summaries.values()), default=0) if len(summaries) == plan.physical else (
        hang["call"] if hang else min((s["done"] for s in summaries.values()), default=0))
    ops = _op_stats(job, summaries, sched)
    calls_by_op: dict[str, int] = {}
    for c in job.calls[:done]:
        calls_by_op[c.op.label] = calls_by_op.get(c.op.label, 0) + 1
    return ReplayReport(
        id=new_run_id(), run=str(run.path), run_id=job.run_id,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), plan=plan.to_dict(),
        backend=backend, device=device, payload=job.payload, calls=done, scheduled=len(job.calls),
        calls_by_op=calls_by_op, divergences=count, by_kind=by_kind, first_divergence=first_of(divs),
        divergence_list=divs[:1000], filtered=sched.filtered,
        skipped=[{**s.__dict__, "ranks": list(s.ranks)} for s in sched.skipped],
        ops=ops, stopped=stopped, wall_s=round(wall_s, 3), worker_pids=pids,
        shard_problems={str(k): v for k, v in sched.shard_problems.items()}, allow_partial=allow_partial,
        hidden=job.hidden, peak_rss_mb=[round(summaries[p].get("max_rss_kb", 0) / 1024, 1) if p in summaries
                                        else -1.0 for p in range(plan.physical)])


def _op_stats(job: Job, summaries: dict[int, dict], sched: S.Schedule) -> dict[str, dict]:
    out = {}
    recorded: dict[str, list[int]] = {}
    for c in job.calls:
        if c.duration_ns >= 0:
            recorded.setdefault(c.op.label, []).append(c.duration_ns)
    ops = set().union(*(s["calls"].keys() for s in summaries.values())) if summaries else set()
    for op in sorted(ops):
        vals = [s for s in summaries.values() if op in s["calls"]]
        rec = recorded.get(op)
        out[op] = OpStats(
            calls=max(s["calls"][op] for s in vals), tokens=sum(s["tokens"][op] for s in vals),
            bytes=sum(s["bytes"][op] for s in vals),
            backend_s=max(s["backend_ns"][op] for s in vals) / 1e9,
            total_s=max(s["total_ns"][op] for s in vals) / 1e9,
            recorded_mean_us=(sum(rec) / len(rec) / 1e3) if rec else -1.0).to_dict()
    return out


