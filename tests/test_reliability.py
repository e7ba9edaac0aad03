"""Issue 19's attacks as repeatable trials: random byte flips and truncations of a run's shards,
index and manifest, each followed by every read command through the real CLI. Whatever the
damage, a command ends within its time limit, prints no traceback, exits with one of its
documented codes, never reports a shard that lost records as healthy (`stats`) and never says
OK over one (`replay`).

Trials (seeded, so a failure reproduces): TRIALS per target file kind (shard, index, manifest),
half flips and half truncations, each at a random offset; every trial runs `inspect`, `stats`,
`sql` (a total) and `replay --ranks 1`. The outcome counts are printed (pytest -s shows them).
"""
from __future__ import annotations

import collections
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epreplay.demo.synth import make_synthetic_run
from epreplay.format.run import RunDir

SHAPE = dict(ranks=2, steps=2, layers=2, tokens=16, experts=8, topk=2, seed=5, workers=1)
TOTAL = "SELECT sum(tokens) AS t FROM expert_load"
HEALTHY = "every shard complete"
TRIALS = 6  # per target kind: 18 trials x 4 commands, ~45 s on 2 cores
COMMANDS = {  # name -> (argv after RUN, exit codes it documents)
    "inspect": ([], {0, 1, 2}),
    "stats": ([], {0, 2}),
    "sql": ([TOTAL], {0, 2}),
    "replay": (["--ranks", "1"], {0, 1, 2, 3}),
}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, str]:
    """An indexed synthetic run and its total routed slots."""
    path = tmp_path_factory.mktemp("reliability") / "run"
    make_synthetic_run(path, **SHAPE)
    assert cli("index", path).returncode == 0
    total = cli("sql", path, TOTAL).stdout
    assert total.strip()
    return path, total


def _calls(shard: Path) -> int:
    """Call records whose bytes still check out (CRC) in a shard, however damaged."""
    from epreplay.format.records import Kind
    from epreplay.errors import ShardError
    from epreplay.format.shard import open_shard

    with open_shard(shard) as scan:
        good = 0
        for entry in scan.entries:
            if entry.header.kind != Kind.CALL:
                continue
            try:
                scan.read(entry)
                good += 1
            except ShardError:
                pass
        return good


def _damage(run: Path, kind: str, rng: random.Random) -> tuple[Path, str]:
    if kind == "shard":
        target = rng.choice(RunDir(run).shard_paths())
    elif kind == "index":
        target = RunDir(run).index_path
    else:
        target = RunDir(run).manifest_path
    data = bytearray(target.read_bytes())
    offset = rng.randrange(len(data))
    if rng.random() < 0.5:
        data[offset] ^= 1 << rng.randrange(8)
        how = f"flip at byte {offset}"
    else:
        del data[offset:]
        how = f"truncate at byte {offset}"
    target.write_bytes(bytes(data))
    return target, how


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shard", "index", "manifest"])
def test_damage_never_crashes_hangs_or_shows_stale_figures(pristine, tmp_path, kind):
    src, total = pristine
    rng = random.Random(f"reliability-{kind}")
    outcomes: collections.Counter = collections.Counter()
    for trial in range(TRIALS):
        run = tmp_path / f"run{trial}"
        shutil.copytree(src, run)
        target, how = _damage(run, kind, rng)
        lost = kind == "shard" and _calls(target) < _calls(src / "shards" / target.name)
        for name, (argv, codes) in COMMANDS.items():
            proc = cli(name, run, *argv)
            what = f"{name} after {kind} {target.name} {how}"
            assert "Traceback" not in proc.stderr, (what, proc.stderr[-2000:])
            assert proc.returncode in codes, (what, proc.returncode, proc.stderr[-2000:])
            outcomes[(name, proc.returncode)] += 1
            if lost and name == "stats" and proc.returncode == 0:
                # a shard that lost records is never reported healthy (its figures would be old)
                assert HEALTHY not in proc.stdout, (what, proc.stdout[-1500:])
                assert "truncated" in proc.stdout or "damaged" in proc.stdout, (what, proc.stdout[-1500:])
            if kind == "index" and name == "sql" and proc.returncode == 0:
                assert proc.stdout == total, (what, "a damaged index changed an answer")
            if lost and name == "replay":  # never OK over a shard that lost records
                assert proc.returncode != 0, (what, proc.stdout[-1500:])
    print(f"\n{kind}: {TRIALS} trials; outcomes (command, exit code): {dict(sorted(outcomes.items()))}")
