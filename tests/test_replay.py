"""Replay: a recorded 8-rank demo run replays on 8/4/2/1 processes with zero divergences (with
its recorded payload and with synthetic payloads); injected faults, an edited and a truncated
shard, a hang, bad input. Besides the demo run (conftest's demo_run_factory), one tiny 4-rank
recording of every op (cached dispatch too; payload on even steps only) is made once per session
with capture around the emulated Buffer and reused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epreplay.format.records import Op
from epreplay.format.run import RunDir
from epreplay.replay import replay_run

WORLD, TOKENS, HIDDEN, EXPERTS, TOPK = 4, 6, 128, 16, 3


def _workload(ctx, run_dir: str, fp_version: int | None = None) -> bool:
    """Each rank: step 0 (payload recorded) and step 1 (no payload); per step a normal layer
    (layout, BF16 dispatch, FP8 cached dispatch, combine) and a low-latency layer. fp_version:
    hash with that fingerprint definition instead of the current one (in-process writer)."""
    import torch
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer
    from epreplay.demo.epbench import per_token_cast_to_fp8

    if fp_version is None:
        capture.start(run_dir, level="payload", payload_every=2, install=False)
    else:  # what an older epreplay recorded: every fingerprint call defaults to that version
        from epreplay.format import fingerprint
        from epreplay.format import fingerprint_gpu

        for fn in (fingerprint.fingerprint_rows, fingerprint_gpu.fingerprint_rows_fast,
                   fingerprint_gpu.fingerprint_rows_triton):
            fn.__kwdefaults__["version"] = fp_version
        capture.start(run_dir, level="payload", payload_every=2, install=False, writer="thread")
    buf = capture.wrap(Buffer(dist.group.WORLD, low_latency_mode=True))
    g = torch.Generator().manual_seed(100 + ctx.rank)
    for s in range(2):
        with capture.step(s):
            t = TOKENS - (ctx.rank % 3)  # ranks send different token counts
            topk = torch.rand(t, EXPERTS, generator=g).topk(TOPK, dim=1).indices.long()
            if ctx.rank == 1:
                topk[0, 1] = -1  # a slot with no expert
            w = torch.rand(t, TOPK, generator=g)
            x = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)
            with capture.layer(0):
                nr, nrd, ne, ir, _ = buf.get_dispatch_layout(topk, EXPERTS)
                rx, _, rw, _, h, _ = buf.dispatch(x, num_tokens_per_rank=nr, num_tokens_per_rdma_rank=nrd,
                                                 is_token_in_rank=ir, num_tokens_per_expert=ne,
                                                 topk_idx=topk, topk_weights=w)
                buf.dispatch(per_token_cast_to_fp8(x), handle=h)
                buf.combine(rx, h, topk_weights=rw)
            with capture.layer(1):
                rx, _, h, _, _ = buf.low_latency_dispatch(x, topk, TOKENS, EXPERTS, use_fp8=bool(s))
                if isinstance(rx, tuple):
                    q, sc = rx
                    rx = (q.float().view(*q.shape[:2], -1, 128) * sc.unsqueeze(-1)).view(q.shape).to(torch.bfloat16)
                buf.low_latency_combine(rx, topk, w, h)
    capture.stop()
    return True


@pytest.fixture(scope="session")
def recorded(tmp_path_factory) -> Path:
    from epreplay.launch import run_ranks

    pytest.importorskip("epreplay.emulate")
    run = tmp_path_factory.mktemp("replay") / "run4"
    run_ranks(_workload, WORLD, str(run), timeout=240)
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("replays", "index.duckdb", ".capture"))
    return dst


@pytest.fixture(scope="session")
def demo8(demo_run_factory) -> Path:
    """An 8-rank demo run at level payload: a prefill step (layout/dispatch/combine, FP8 dispatch)
    and two decode steps (low-latency, FP8), two MoE layers, two Buffers."""
    return demo_run_factory(level="payload", ranks=8, steps=3, layers=2, prefill_tokens=16,
                            decode_tokens=8)


@pytest.mark.slow
@pytest.mark.parametrize("ranks,payload", [(8, "recorded"), (4, "synthetic"), (2, "recorded"), (1, "synthetic")])
def test_demo_run_replays_without_divergence(demo8: Path, ranks: int, payload: str) -> None:
    report = replay_run(demo8, ranks, payload=payload, call_timeout=60, index=False)
    assert report.divergences == 0, report.divergence_list[:3]
    assert report.first_divergence is None and report.exit_code == 0
    assert report.payload == payload and not report.skipped
    ops = report.calls_by_op
    assert ops["dispatch"] == ops["combine"] == 2 and ops["ll_dispatch"] == ops["ll_combine"] == 4
    assert report.calls == report.scheduled == sum(ops.values())
    assert report.plan["physical_ranks"] == ranks and report.plan["virtual_per_physical"] == 8 // ranks
    saved = json.loads((demo8 / "replays" / f"{report.id}.json").read_text())
    assert saved["divergences"] == 0 and saved["calls"] == report.calls


@pytest.mark.slow
def test_every_op_replays_folded_without_divergence(recorded: Path) -> None:
    from epreplay.format.records import FINGERPRINT_VERSION
    from epreplay.format.shard import open_shard

    with open_shard(RunDir(recorded).shard_path(0)) as scan:
        versions = {r.meta.get("fp_version") for r in scan.records() if any("_fp_" in k for k in r.arrays)}
    assert versions == {FINGERPRINT_VERSION}  # new recordings say which fingerprints they hold
    report = replay_run(recorded, 2, call_timeout=60, index=False)
    assert report.divergences == 0, report.divergence_list[:3]
    # every op, with recorded payload (step 0) and synthetic (step 1: not a payload step)
    assert report.calls_by_op == {"layout": 2, "dispatch": 2, "cached_dispatch": 2, "combine": 2,
                                  "ll_dispatch": 2, "ll_combine": 2}
    assert report.calls == report.scheduled == 12 and report.payload == "recorded"


def _edit_expert(src: Path, dst: Path, *, rank: int, seq: int, token: int, slot: int) -> int:
    """Rewrite rank's shard with one token's expert changed in the dispatch record `seq`;
    returns (old expert, new expert)."""
    from epreplay.format.shard import ShardWriter, open_shard

    path = RunDir(dst).shard_path(rank)
    path.unlink()
    old_expert = new_expert = -1
    with open_shard(RunDir(src).shard_path(rank)) as scan, ShardWriter(path, scan.info) as w:
        for rec in scan.records():
            arrays = {k: v for k, v in rec.arrays.items()}
            logical = rec.meta.get("_logical_dtypes", {})
            for k, name in logical.items():
                arrays[k] = (arrays[k], name)
            if rec.header.op == Op.DISPATCH and rec.header.seq == seq:
                t = arrays["topk_idx_TK"].copy()
                row = set(t[token].tolist())
                new_expert = next(e for e in range(EXPERTS - 1, -1, -1) if e not in row)
                old_expert, t[token, slot] = int(t[token, slot]), new_expert
                arrays["topk_idx_TK"] = t
            meta = {k: v for k, v in rec.meta.items() if k != "_logical_dtypes"}
            w.append(rec.header, arrays, meta)
    return old_expert, new_expert


@pytest.mark.slow
def test_edited_expert_is_reported_at_that_call(recorded: Path, tmp_path: Path) -> None:
    run = _copy(recorded, tmp_path / "edited")
    # seq 1 is step 0's dispatch (seq 0 its layout); rank 3 sends token 2 elsewhere
    old_expert, new_expert = _edit_expert(recorded, run, rank=3, seq=1, token=2, slot=0)
    report = replay_run(run, 2, call_timeout=60, index=False)
    assert report.exit_code == 1
    first = report.first_divergence
    assert (first["step"], first["layer"], first["op"], first["seq"]) == (0, 0, "dispatch", 1)
    assert first["kind"] == "count"
    at_call = [d for d in report.divergence_list if d["seq"] == 1]
    # the sender is named with an expert whose load the edit changed ...
    assert any(d["rank"] == 3 and d["expert"] in (old_expert, new_expert) for d in at_call)
    # ... and the new expert's virtual rank received a row it never recorded
    home = new_expert // (EXPERTS // WORLD)
    assert any(d["rank"] == home and d["kind"] == "count" for d in at_call)


def _rewrite_meta(run: Path, edit) -> None:
    """Rewrite every shard of `run` in place with edit(meta) applied to each record's meta."""
    from epreplay.format.shard import ShardWriter, open_shard

    for path in RunDir(run).shard_paths():
        old = path.with_suffix(".old")
        path.rename(old)
        with open_shard(old) as scan, ShardWriter(path, scan.info) as w:
            for rec in scan.records():
                arrays = dict(rec.arrays)
                for k, name in rec.meta.get("_logical_dtypes", {}).items():
                    arrays[k] = (arrays[k], name)
                meta = {k: v for k, v in rec.meta.items() if k != "_logical_dtypes"}
                edit(meta)
                w.append(rec.header, arrays, meta)
        old.unlink()


@pytest.mark.slow
def test_version1_recording_replays_clean(tmp_path: Path) -> None:
    """A recording made before fingerprint versions existed (v1 hashes, no "fp_version" meta)
    replays with its recorded payload and fingerprints without divergence: replay hashes the
    received rows with version 1. Claiming version 2 for the same bits makes them diverge."""
    from epreplay.launch import run_ranks
    from epreplay.format.shard import open_shard

    run = tmp_path / "v1"
    run_ranks(_workload, WORLD, str(run), 1, timeout=240)
    _rewrite_meta(run, lambda meta: meta.pop("fp_version", None))
    with open_shard(RunDir(run).shard_path(0)) as scan:
        recs = [r for r in scan.records() if "recv_x_fp_N" in r.arrays]
    assert recs and all("fp_version" not in r.meta for r in recs)
    report = replay_run(run, 2, call_timeout=60, index=False)
    assert report.divergences == 0, report.divergence_list[:3]
    assert report.payload == "recorded" and report.calls == report.scheduled == 12

    wrong = _copy(run, tmp_path / "claims-v2")
    _rewrite_meta(wrong, lambda meta: meta.update(fp_version=2))
    report = replay_run(wrong, 2, call_timeout=60, index=False)
    assert report.exit_code == 1
    assert report.first_divergence["kind"] == "payload" and report.first_divergence["step"] == 0


def _cut(run: Path, rank: int, *, record: int, into: int) -> int:
    """Truncate rank's shard `into` bytes after the start of its record number `record` (0: at a
    record boundary, as a rank that died between calls leaves it); returns that record's offset
    (where the intact part ends: the offset a reader reports)."""
    from epreplay.format.shard import open_shard

    path = RunDir(run).shard_path(rank)
    with open_shard(path) as scan:
        start = scan.entries[record].offset
    with open(path, "r+b") as fh:
        fh.truncate(start + into)
    return start


def _flip(run: Path, rank: int, *, record: int) -> int:
    """Flip one byte of the compressed data of rank's record number `record` (its CRC fails; the
    footer still lists it); returns the record's offset."""
    from epreplay.format.shard import open_shard
    from epreplay.format.frames import REC_PREFIX

    path = RunDir(run).shard_path(rank)
    with open_shard(path) as scan:
        assert scan.complete
        off = scan.entries[record].offset
    with open(path, "r+b") as fh:
        fh.seek(off + REC_PREFIX + 10)
        b = fh.read(1)
        fh.seek(off + REC_PREFIX + 10)
        fh.write(bytes([b[0] ^ 0xFF]))
    return off


@pytest.mark.slow
def test_truncated_shard_replays_common_calls_and_says_what_was_skipped(recorded: Path, tmp_path: Path) -> None:
    from epreplay.errors import ShardError

    run = _copy(recorded, tmp_path / "truncated")
    cut = _cut(run, 3, record=8, into=40)  # 40 bytes into step 1's first record: 8 stay intact
    with pytest.raises(ShardError, match=f"rank 3 .*truncated at byte {cut}"):
        replay_run(run, 2, call_timeout=60, index=False)  # damage: refused without --allow-partial
    assert not (run / "replays").exists()
    report = replay_run(run, 2, call_timeout=60, index=False, allow_partial=True)
    assert report.divergences == 0, report.divergence_list[:3]
    assert report.calls == 8 and len(report.skipped) == 4
    assert all("rank 3 (shard truncated at byte" in s["reason"] and s["ranks"] == [3] for s in report.skipped)
    assert {s["step"] for s in report.skipped} == {1}
    assert report.exit_code == 0 and report.verdict.startswith("PARTIAL")
    assert report.to_dict()["skipped_by_rank"] == {"3": 4}


def _cli(*args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", "replay", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_ranks_must_divide_world_size(recorded: Path) -> None:
    r = _cli(str(recorded), "--ranks", "3")
    assert r.returncode == 2
    assert "--ranks 3: must divide the recorded world size 4; valid values: 1, 2, 4" in r.stderr
    assert "Traceback" not in r.stderr


def test_unusable_input_exits_2(tmp_path: Path, recorded: Path) -> None:
    r = _cli(str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such run directory" in r.stderr
    r = _cli(str(recorded), "--steps", "5:9")
    assert r.returncode == 2 and "nothing to replay" in r.stderr


def _refused_and_nothing_stored(r: subprocess.CompletedProcess, run: Path, *needles: str) -> None:
    """A setup or usage error: exit 2, one line naming the value and the fix, no traceback, and no
    report stored (no replays/*.json, no row in the index: it is not a replay's finding)."""
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not list(run.glob("replays/*.json"))
    if (run / "index.duckdb").exists():
        import duckdb

        with duckdb.connect(str(run / "index.duckdb"), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM replays").fetchone()[0] == 0


def test_device_cuda_without_cuda_is_refused_before_any_process(recorded: Path, tmp_path: Path) -> None:
    """Issue 20: four ZeroDivisionError tracebacks from the ranks, then 'DIVERGED: 1
    divergence(s)', exit 1, stored in the index."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is valid")
    run = _copy(recorded, tmp_path / "run")
    _refused_and_nothing_stored(_cli(str(run), "--device", "cuda"), run, "--device cuda", "--device cpu")


def test_run_ranks_on_cuda_without_cuda_raises_in_the_parent() -> None:
    import torch

    from epreplay.errors import UsageError
    from epreplay.launch import run_ranks

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UsageError, match="device='cuda'.*no CUDA device.*device='cpu'"):
        run_ranks(_workload, 2, "unused", device="cuda")


def test_counts_level_recording_is_refused_before_any_process(demo_run_factory, tmp_path: Path) -> None:
    """Issue 20: 'DIVERGED: 4 divergence(s)' although every divergence said replay needs
    level 'routing'."""
    run = _copy(demo_run_factory(level="counts", ranks=2, steps=1, layers=1), tmp_path / "run")
    _refused_and_nothing_stored(_cli(str(run)), run, "level 'counts'", "--level routing")


@pytest.mark.slow
def test_cli_json_report_exit_1_and_index(recorded: Path, tmp_path: Path) -> None:
    import duckdb

    run = _copy(recorded, tmp_path / "cli")
    _edit_expert(recorded, run, rank=1, seq=1, token=0, slot=0)
    r = _cli(str(run), "--ranks", "2", "--steps", "0:1", "--format", "json")
    assert r.returncode == 1, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["calls"] == 6 and out["filtered"] == 6 and out["divergences"] >= 1
    assert out["by_kind"]["count"] >= 1
    first = out["first_divergence"]
    assert (first["step"], first["layer"], first["op"]) == (0, 0, "dispatch") and first["rank"] in range(4)
    assert (run / "replays" / f"{out['id']}.json").exists()
    with duckdb.connect(str(run / "index.duckdb"), read_only=True) as con:
        assert con.execute("SELECT divergences FROM replays WHERE replay = ?", [out["id"]]).fetchone()[0] \
            == out["divergences"]
        assert con.execute("SELECT count(*) FROM divergences WHERE replay = ?", [out["id"]]).fetchone()[0] \
            == len(out["divergence_list"])


def _one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_shard_damage_is_refused_before_any_replay_process(recorded: Path, tmp_path: Path,
                                                           damage: str) -> None:
    run = _copy(recorded, tmp_path / damage)
    if damage == "truncated":
        rank, off = 3, _cut(run, 3, record=8, into=40)
        what = f"truncated at byte {off}"
    else:
        rank, off = 1, _flip(run, 1, record=5)
        what = f"record at byte {off}: crc"
    r = _cli(str(run), "--ranks", "2", "--no-index")
    line = _one_line_exit_2(r, "shard damage", f"rank {rank} (rank-0000{rank}.eprs) {what}",
                            f"epreplay repair {run}", "--allow-partial")
    assert "Connection closed" not in r.stderr and "DIVERGED" not in r.stdout + line
    assert not (run / "replays").exists()  # no replay ran, no report written


@pytest.mark.slow
def test_allow_partial_replays_what_is_intact_and_says_partial(recorded: Path, tmp_path: Path) -> None:
    run = _copy(recorded, tmp_path / "partial")
    cut = _cut(run, 3, record=8, into=40)
    r = _cli(str(run), "--ranks", "2", "--no-index", "--allow-partial")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = " ".join(r.stdout.split())  # rich wraps at 80 columns without a terminal
    assert ("PARTIAL (--allow-partial): 8 calls replayed on 2 processes, "
            "4 recorded call(s) skipped (rank 3: 4)") in summary
    assert f"shard truncated at byte {cut}" in summary
    (saved,) = (run / "replays").glob("*.json")
    doc = json.loads(saved.read_text())
    assert doc["exit_code"] == 0 and doc["allow_partial"] and doc["incomplete"]
    assert doc["skipped_by_rank"] == {"3": 4} and {tuple(s["ranks"]) for s in doc["skipped"]} == {(3,)}

    # a damaged record among intact ones: only its call is skipped, named with the offset
    flipped = _copy(recorded, tmp_path / "flipped")
    off = _flip(flipped, 1, record=5)
    r = _cli(str(flipped), "--ranks", "2", "--no-index", "--allow-partial", "--format", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["divergences"] == 0 and doc["calls"] == 11 and doc["verdict"].startswith("PARTIAL")
    (skip,) = doc["skipped"]
    assert skip["ranks"] == [1] and f"record at byte {off} damaged: crc" in skip["reason"]


@pytest.mark.slow
def test_skipped_calls_make_the_replay_incomplete_exit_3(recorded: Path, tmp_path: Path) -> None:
    run = _copy(recorded, tmp_path / "died")
    _cut(run, 3, record=8, into=0)  # rank 3 died between calls: no damage, 4 calls it never recorded
    r = _cli(str(run), "--ranks", "2", "--no-index")
    assert r.returncode == 3, r.stderr[-2000:]
    summary = " ".join(r.stdout.split())
    assert "INCOMPLETE: 8 calls replayed on 2 processes, 4 recorded call(s) skipped (rank 3: 4)" in summary
    assert "OK" not in summary.split("INCOMPLETE")[1]
    (saved,) = (run / "replays").glob("*.json")
    doc = json.loads(saved.read_text())
    assert doc["exit_code"] == 3 and doc["incomplete"] and not doc["allow_partial"]
    assert doc["skipped_by_rank"] == {"3": 4}
    assert all(s["ranks"] == [3] and s["reason"] == "missing on rank 3 (not recorded)"
               for s in doc["skipped"])


@pytest.mark.slow
def test_clean_run_still_exits_0_with_ok(recorded: Path, tmp_path: Path) -> None:
    run = _copy(recorded, tmp_path / "clean")
    r = _cli(str(run), "--ranks", "2", "--no-index")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK: 12 calls replayed on 2 processes, no divergence" in " ".join(r.stdout.split())


# Faults fire in the emulated Buffer of one replay process (physical rank) at the n-th call of an
# op there. On 2 processes, physical rank p hosts virtual ranks 2p and 2p+1.
FAULTS = [
    # (fault kwargs, expected kind, (step, layer, op))
    (dict(kind="drop_token", rank=1, op="dispatch", call=1, row=0), "count", (1, 0, "dispatch")),
    (dict(kind="swap_rows", rank=0, op="dispatch", call=0, row=0, row2=1), "order", (0, 0, "dispatch")),
    (dict(kind="flip_bit", rank=1, op="ll_dispatch", call=1, row=2, bit=5), "payload", (1, 1, "ll_dispatch")),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec,kind,where", FAULTS, ids=[f[0]["kind"] for f in FAULTS])
def test_injected_fault_is_the_first_divergence(recorded: Path, spec: dict, kind: str, where: tuple) -> None:
    from epreplay.emulate.faults import Fault

    report = replay_run(recorded, 2, call_timeout=60, index=False, fault=Fault(**spec))
    assert report.exit_code == 1
    first = report.first_divergence
    assert first["kind"] == kind, report.divergence_list[:3]
    assert (first["step"], first["layer"], first["op"]) == where
    assert first["physical"] == spec["rank"] and first["rank"] in (2 * spec["rank"], 2 * spec["rank"] + 1)
    # nothing diverged before the faulty call (a dropped row leaves the emulation's handle
    # inconsistent, so a later combine of that dispatch may raise and end the replay there)
    assert all(d["call"] >= first["call"] for d in report.divergence_list)
    assert report.calls > first["call"]


@pytest.mark.slow
def test_hang_is_reported_within_the_timeout_and_leaves_no_process(recorded: Path) -> None:
    import time

    from epreplay.emulate.faults import Fault

    t0 = time.monotonic()
    report = replay_run(recorded, 2, call_timeout=3, index=False,
                        fault=Fault(kind="hang", rank=1, op="combine", call=0))
    elapsed = time.monotonic() - t0
    assert report.exit_code == 1 and report.by_kind == {"hang": report.divergences}
    first = report.first_divergence
    assert first["kind"] == "hang" and (first["step"], first["layer"], first["op"]) == (0, 0, "combine")
    assert "hung" in report.stopped and report.calls == 3  # layout, dispatch, cached dispatch done
    assert elapsed < 3 + 30  # the timeout plus process start-up, not the emulation's own 100 s
    assert len(report.worker_pids) == 2
    for pid in report.worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
