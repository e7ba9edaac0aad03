"""`epreplay diff` on small synthetic runs written with the real ShardWriter: diff logic and CLI.

The runs are routed by a tiny deterministic router (token features x layer weights + a skew
bias), so "same seed, different release" changes exactly the layers the release perturbs, and
"same tokens in another batch order" keeps every token's routing while moving it to another
(step, rank, row).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epreplay.diff import compare as diff
from epreplay.diff import render as diff_render
from epreplay.diff import runs as diff_runs
from epreplay.errors import UsageError
from epreplay.format.records import Kind, Level, Manifest, Op, RecordHeader, ShardInfo, Status
from epreplay.format.run import RunDir
from epreplay.format.shard import ShardWriter

WORLD, LAYERS, STEPS, T = 2, 4, 3, 16  # ranks, layers, steps, tokens per rank per step
HIDDEN = 8


def write_run(path: Path, *, experts: int = 16, topk: int = 4, seed: int = 0,
              perturb: frozenset[int] = frozenset(), order_seed: int | None = None,
              tags: bool = True, release: str = "r1", routing: bool = True,
              world: int = WORLD, tokens: int = T, ll: str = "", tag_base: int = 0) -> Path:
    """A run of WORLD ranks x STEPS steps x LAYERS layers of dispatch records.

    seed: the token data (the same seed -> the same tokens). perturb: layers whose router is
    changed (the "release"). order_seed: shuffle which (step, rank, row) processes which token.
    routing=False: a counts-level capture (no topk_idx_TK / topk_weights_TK in the records).
    world, tokens: ranks and tokens per rank; the same world * tokens processes the same tokens.
    ll: "" normal dispatch (weights in the record); "combine": low-latency dispatch (no weights)
    followed by its ll_combine (weights); "bare": low-latency dispatch alone.
    tag_base: added to every token tag (another workload's tokens: no tag in common with a run
    of tag_base 0).
    """
    data = np.random.default_rng(seed)
    n_tok = STEPS * world * tokens
    x_NH = data.standard_normal((n_tok, HIDDEN))
    order = np.arange(n_tok) if order_seed is None else np.random.default_rng(order_seed).permutation(n_tok)
    model = np.random.default_rng(1234)  # the model is the same in every run...
    w_LHE = model.standard_normal((LAYERS, HIDDEN, experts))
    bias_LE = np.linspace(2.0, 0.0, experts)[None, :] * (1 + np.arange(LAYERS))[:, None] / LAYERS
    for layer in perturb:  # ...except the layers this release changed
        w_LHE[layer] += 0.8 * np.random.default_rng(99 + layer).standard_normal((HIDDEN, experts))
    run = RunDir.create(path)
    run.write_manifest(Manifest(run_id=f"{path.name}", created="now", world_size=world,
                                num_experts=experts, topk=topk, hidden=HIDDEN, release=release))
    for rank in range(world):
        info = ShardInfo(path.name, rank, world, experts, topk, HIDDEN, Level.ROUTING)
        with ShardWriter(run.shard_path(rank), info) as w:
            seq = 0
            for step in range(STEPS):
                at = (step * world + rank) * tokens
                tok_T = order[at:at + tokens]
                for layer in range(LAYERS):
                    scores_TE = x_NH[tok_T] @ w_LHE[layer] + bias_LE[layer]
                    idx_TK = np.argsort(-scores_TE, axis=1, kind="stable")[:, :topk]
                    w_TK = 1 / (1 + np.exp(-np.take_along_axis(scores_TE, idx_TK, axis=1)))
                    w_TK = (w_TK / w_TK.sum(axis=1, keepdims=True)).astype(np.float32)
                    arrays = {"topk_idx_TK": idx_TK.astype(np.int64), "topk_weights_TK": w_TK,
                              "num_tokens_per_expert_E": np.bincount(idx_TK.ravel(), minlength=experts).astype(np.int32)}
                    if not routing:
                        del arrays["topk_idx_TK"], arrays["topk_weights_TK"]
                    if tags:
                        arrays["token_tag_T"] = (tok_T + tag_base).astype(np.int64)
                    op = Op.LL_DISPATCH if ll else Op.DISPATCH
                    if ll:
                        weights = arrays.pop("topk_weights_TK", None)
                    w.append(RecordHeader(Kind.CALL, op, Level.ROUTING, Status.OK, 0, seq, step, layer,
                                          tokens), arrays, {})
                    seq += 1
                    if ll == "combine" and routing:
                        w.append(RecordHeader(Kind.CALL, Op.LL_COMBINE, Level.ROUTING, Status.OK, 0, seq,
                                              step, layer, tokens),
                                 {"topk_idx_TK": arrays["topk_idx_TK"], "topk_weights_TK": weights},
                                 {"dispatch_seq": seq - 1})
                        seq += 1
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("diffruns")
    return {
        "a": write_run(base / "a"),
        "release": write_run(base / "release", perturb=frozenset({1, 3}), release="r2"),
        "shuffled": write_run(base / "shuffled", order_seed=7),
        "shuffled_untagged": write_run(base / "shuffled_untagged", order_seed=7, tags=False),
        "untagged": write_run(base / "untagged", tags=False),
        "other_seed": write_run(base / "other_seed", seed=5),
        "more_experts": write_run(base / "more_experts", experts=32),
        "counts": write_run(base / "counts", routing=False, tags=False),
        "four_ranks": write_run(base / "four_ranks", world=4, tokens=T // 2),
        "ll": write_run(base / "ll", ll="combine"),
        "ll_release": write_run(base / "ll_release", ll="combine", perturb=frozenset({1, 3})),
        "ll_bare": write_run(base / "ll_bare", ll="bare"),
        # other tokens (other seed, other tags): tag matching pairs none of them with "a"'s
        "disjoint": write_run(base / "disjoint", seed=5, tag_base=10**6),
        "top8": write_run(base / "top8", topk=8),
    }


# The strictest gate on every drift metric: anything but "identical" fails it.
STRICTEST = ["js>0", "js_mean>0", "hot_changed>0", "imbalance_ratio>1", "jaccard<1", "top1<1",
             "weight_change>0", "matched<1"]


def test_run_against_itself_is_identical(runs) -> None:
    res = diff_runs.diff_runs(runs["a"], runs["a"],
                              thresholds=[diff.parse_threshold(t) for t in STRICTEST])
    assert res.match == "tag" and res.passed
    s = res.summary
    assert (s["js"], s["js_mean"], s["hot_changed"]) == (0.0, 0.0, 0.0)
    assert (s["jaccard"], s["top1"], s["weight_change"], s["matched"]) == (1.0, 1.0, 0.0, 1.0)
    assert s["imbalance_ratio"] == 1.0
    assert len(res.layers) == LAYERS
    assert all(r.tokens.tokens == STEPS * WORLD * T for r in res.layers)
    # By position the records are byte-identical: decoded once, same sums as comparing them.
    pos = diff_runs.diff_runs(runs["a"], runs["a"], match="position")
    assert pos.match == "position"
    assert {r.layer: r.tokens for r in pos.layers} == {r.layer: r.tokens for r in res.layers}


def test_release_change_drifts_exactly_the_touched_layers(runs) -> None:
    res = diff_runs.diff_runs(runs["a"], runs["release"],
                              thresholds=[diff.parse_threshold("js>0.01")])
    drifted = {r.layer for r in res.layers if r.js > 0 or r.tokens.top1 < 1.0}
    assert drifted == {1, 3}
    assert [r.layer for r in res.layers][:2] in ([1, 3], [3, 1])  # worst layers first
    untouched = [r for r in res.layers if r.layer in (0, 2)]
    assert all(r.tokens.jaccard == 1.0 and r.tokens.weight_change == 0.0 for r in untouched)
    assert not res.passed and res.failures[0].threshold.metric == "js"
    assert res.failures[0].layers == (1, 3)  # the drifted layers, named
    assert res.verdict_line().startswith("FAIL") and "in layer(s) 1,3" in res.verdict_line()


def test_batch_order_matched_by_tag_agrees_fully(runs) -> None:
    res = diff_runs.diff_runs(runs["a"], runs["shuffled"])
    assert res.match == "tag"
    assert res.summary["top1"] == 1.0 and res.summary["jaccard"] == 1.0
    assert res.summary["matched"] == 1.0 and res.summary["js"] == pytest.approx(0.0, abs=1e-12)
    # The same pair by position compares different tokens: agreement drops well below 1.
    pos = diff_runs.diff_runs(runs["a"], runs["shuffled"], match="position")
    assert pos.match == "position" and pos.summary["top1"] < 0.9


def test_other_world_size_matched_by_tag(runs) -> None:
    """The same tokens served on 4 ranks instead of 2: tags pair them, positions cannot."""
    res = diff_runs.diff_runs(runs["a"], runs["four_ranks"])
    assert res.match == "tag" and res.summary["top1"] == 1.0 and res.summary["matched"] == 1.0
    assert res.summary["js"] == pytest.approx(0.0, abs=1e-12)
    assert res.run_b.world_size == 4 and res.summary["imbalance_b"] is not None
    untagged = diff_runs.diff_runs(runs["untagged"], runs["four_ranks"])
    assert untagged.match == "none" and "dispatch calls differ" in " ".join(untagged.notes)


def test_low_latency_weights_come_from_the_combine(runs) -> None:
    same = diff_runs.diff_runs(runs["a"], runs["ll"])  # same routing, other op
    assert same.summary["top1"] == 1.0 and same.summary["weight_change"] == 0.0
    drift = diff_runs.diff_runs(runs["ll"], runs["ll_release"])
    assert {r.layer for r in drift.layers if r.tokens.weight_change > 0} == {1, 3}
    assert all(r.tokens.weighted == r.tokens.tokens for r in drift.layers)
    # Without the combine records no weights exist: weight change is unmeasured, not 0.
    bare = diff_runs.diff_runs(runs["ll"], runs["ll_bare"])
    assert bare.summary["top1"] == 1.0 and bare.summary["weight_change"] is None
    assert bare.unmeasured["weight_change"] == "no weights recorded"
    gated = diff_runs.diff_runs(runs["ll"], runs["ll_bare"],
                                thresholds=[diff.parse_threshold("weight_change>0.1")])
    (fail,) = gated.failures  # a gate on a metric that could not be measured fails, saying why
    assert fail.measured is None and "no weights recorded" in fail.why


def test_auto_falls_back_to_position_then_none(runs) -> None:
    res = diff_runs.diff_runs(runs["untagged"], runs["a"])
    assert res.match == "position" and res.summary["top1"] == 1.0
    none = diff_runs.diff_runs(runs["untagged"], runs["shuffled_untagged"], match="none")
    assert none.match == "none" and none.summary["top1"] is None
    with pytest.raises(UsageError, match="recorded no token tags"):
        diff_runs.diff_runs(runs["untagged"], runs["a"], match="tag")
    gated = diff_runs.diff_runs(runs["a"], runs["a"], match="none",
                                thresholds=[diff.parse_threshold("top1<0.9")])
    (fail,) = gated.failures
    assert fail.measured is None and "tokens were not matched" in fail.why


def test_different_expert_counts_compare_distributions_only(runs) -> None:
    res = diff_runs.diff_runs(runs["a"], runs["more_experts"])
    assert res.match == "none" and res.summary["top1"] is None
    assert any("distribution level only" in n and "16 vs 32" in n for n in res.notes)
    assert res.summary["js"] > 0


def test_counts_level_run_compares_distributions_only(runs) -> None:
    res = diff_runs.diff_runs(runs["a"], runs["counts"])
    assert res.match == "none" and res.summary["js"] == 0.0
    assert any("capture level 'counts'" in n for n in res.notes)
    with pytest.raises(UsageError, match="run B recorded no token routing"):
        diff_runs.diff_runs(runs["a"], runs["counts"], match="position")


def test_layer_and_step_selection(runs) -> None:
    res = diff_runs.diff_runs(runs["a"], runs["release"], layers=diff.parse_layers(["0,2"]),
                              steps=diff.parse_steps("1:3"))
    assert sorted(r.layer for r in res.layers) == [0, 2] and res.summary["js"] == 0.0
    assert res.run_a.steps == (1, 2)
    assert all(r.tokens.tokens == 2 * WORLD * T for r in res.layers)


def test_no_matched_tokens_is_not_measured_and_fails_the_gate(runs) -> None:
    """Runs with no token in common (issue 20: demo seed 0 against seed 1 printed matched=0,
    jaccard=1, top1=1 and passed 'top1<0.9'): agreement over zero tokens is not measured, and a
    gate on it fails, saying why and how tokens get matched."""
    res = diff_runs.diff_runs(runs["a"], runs["disjoint"],
                              thresholds=[diff.parse_threshold("top1<0.9")])
    s = res.summary
    assert res.match == "tag" and s["matched"] == 0.0
    assert (s["jaccard"], s["top1"], s["weight_change"]) == (None, None, None)
    assert res.unmeasured["top1"] == res.unmeasured["jaccard"] == "no matched tokens"
    assert all(diff.layer_value(r, "top1") is None for r in res.layers)
    assert not res.passed and res.verdict == "fail"
    (fail,) = res.failures
    assert fail.threshold.metric == "top1" and fail.measured is None
    assert "no tokens matched" in fail.why and "position" in fail.why and "tag_tokens" in fail.why
    assert res.verdict_line().startswith("FAIL: top1 could not be measured")
    # `matched` itself is measured (0 of A's tokens), so a gate on it judges normally.
    gated = diff_runs.diff_runs(runs["a"], runs["disjoint"],
                                thresholds=[diff.parse_threshold("matched<0.5")])
    assert [(f.threshold.metric, f.measured) for f in gated.failures] == [("matched", 0.0)]


def test_no_thresholds_judges_nothing(runs) -> None:
    """Top-8 against top-4 used to say 'PASS: js max ...' with no gate at all."""
    res = diff_runs.diff_runs(runs["a"], runs["top8"])
    assert res.summary["js"] > 0 and res.match == "none"
    assert res.verdict == "unjudged" and res.passed  # exit 0: nothing failed, nothing was judged
    assert res.verdict_line().startswith("no thresholds given: nothing judged (pass --fail-on")
    assert "PASS" not in res.verdict_line()


def test_run_against_itself_says_it_is_the_same_run(runs, tmp_path) -> None:
    import shutil

    res = diff_runs.diff_runs(runs["a"], runs["a"])
    assert res.notes[0].startswith("A and B are the same run")
    copy = shutil.copytree(runs["a"], tmp_path / "copy", ignore=shutil.ignore_patterns("index.duckdb*"))
    res = diff_runs.diff_runs(runs["a"], copy)
    assert res.notes[0].startswith("A and B are copies of one recording")
    assert not any("same run" in n for n in diff_runs.diff_runs(runs["a"], runs["release"]).notes)


@pytest.mark.parametrize("text, want", [
    ("js>0.05", diff.Threshold("js", ">", 0.05)),
    (" top1 < 0.9 ", diff.Threshold("top1", "<", 0.9)),
    ("hot_changed>=3", diff.Threshold("hot_changed", ">=", 3.0)),
])
def test_parse_threshold(text, want) -> None:
    assert diff.parse_threshold(text) == want


@pytest.mark.parametrize("text", ["js", "js>>1", "jsx>0.1", "js>abc", "js>nan", "top1=0.9"])
def test_parse_threshold_rejects_with_known_metrics(text) -> None:
    with pytest.raises(UsageError) as exc:
        diff.parse_threshold(text)
    assert repr(text) in str(exc.value)
    if "jsx" in text or "=" in text:
        assert "top1" in str(exc.value) and "weight_change" in str(exc.value)


# ----------------------------------------------------------------------------- CLI

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", "diff", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_text_json_md_and_exit_codes(runs) -> None:
    a, rel = str(runs["a"]), str(runs["release"])
    same = cli(a, a, *[arg for t in STRICTEST for arg in ("--fail-on", t)])
    assert same.returncode == 0, same.stderr
    assert f"PASS within {len(STRICTEST)} threshold(s)" in same.stdout and "layer" in same.stdout

    drift = cli(a, rel, "--fail-on", "js>0.01", "--format", "json")
    assert drift.returncode == 1, drift.stderr
    doc = json.loads(drift.stdout)
    assert doc["verdict"] == "fail" and doc["failed"][0]["metric"] == "js"
    assert doc["failed"][0]["layers"] == [1, 3]
    assert {l["layer"] for l in doc["layers"][:2]} == {1, 3}
    assert doc["layers"][-1]["js"] == 0.0 and doc["match"] == "tag"

    md = cli(a, rel, "--fail-on", "js>0.01", "--format", "md")
    assert md.returncode == 1 and md.stdout.startswith("### ❌ epreplay diff: FAIL")
    assert "| `js>0.01` |" in md.stdout


@pytest.mark.slow
def test_cli_gate_on_an_unmeasured_metric_fails_with_the_reason(runs) -> None:
    a, other = str(runs["a"]), str(runs["disjoint"])
    text = cli(a, other, "--fail-on", "top1<0.9")
    assert text.returncode == 1, text.stdout + text.stderr
    flat = " ".join(text.stdout.split())  # rich wraps long lines
    assert "PASS" not in flat and "top1=n/a (no matched tokens)" in flat
    assert "top1 could not be measured: no tokens matched" in flat and "tag_tokens" in flat
    js = cli(a, other, "--fail-on", "top1<0.9", "--format", "json")
    assert js.returncode == 1, js.stderr
    doc = json.loads(js.stdout)
    assert doc["summary"]["top1"] is None and doc["summary"]["matched"] == 0.0
    assert doc["unmeasured"]["top1"] == "no matched tokens"
    assert doc["verdict"] == "fail" and doc["failed"][0]["measured"] is None
    assert "no tokens matched" in doc["failed"][0]["why"]
    md = cli(a, other, "--fail-on", "top1<0.9", "--format", "md")
    assert md.returncode == 1 and md.stdout.startswith("### ❌ epreplay diff: FAIL")
    assert "| top1 | n/a (no matched tokens) |" in md.stdout


@pytest.mark.slow
def test_cli_without_thresholds_says_nothing_was_judged(runs) -> None:
    proc = cli(str(runs["a"]), str(runs["top8"]))
    assert proc.returncode == 0, proc.stderr
    flat = " ".join(proc.stdout.split())
    assert "no thresholds given: nothing judged (pass --fail-on" in flat and "PASS" not in flat
    same = cli(str(runs["a"]), str(runs["a"]))
    assert "A and B are the same run" in " ".join(same.stdout.split())


def test_cli_help_lists_every_metric() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for name in diff.METRICS:
        assert f"\n  {name} " in proc.stdout, name
    flat = " ".join(proc.stdout.split())
    assert "without --fail-on nothing is judged" in flat  # what a diff without a gate means
    assert "could not be measured fails the gate" in flat


@pytest.mark.slow
def test_cli_unusable_input_exits_2_with_one_line(runs, tmp_path) -> None:
    a = str(runs["a"])
    for args, needle in [
        ((a, str(tmp_path / "missing")), "no such run directory"),
        ((a, a, "--fail-on", "jsx>1"), "unknown metric 'jsx'"),
        ((a, a, "--steps", "5:2"), "--steps"),
        ((a, str(RunDir.create(tmp_path / "empty").path)), "no shards and no index"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert needle in proc.stderr, proc.stderr


def test_json_dict_is_complete(runs) -> None:
    doc = diff_render.to_dict(diff_runs.diff_runs(runs["a"], runs["release"]))
    assert set(doc["summary"]) == set(diff.METRICS)
    assert doc["verdict"] == "unjudged" and doc["failed"] == []  # no thresholds: nothing judged
    layer = doc["layers"][0]
    assert {"js", "hot_entered", "hot_left", "imbalance_a", "top1", "jaccard"} <= set(layer)
    json.dumps(doc)  # JSON-able (no numpy scalars)


def _loads(load_SLE, layers=(0, 1), world=2, rank_SLR=None) -> diff.RunLoads:
    load = np.asarray(load_SLE, dtype=np.int64)
    return diff.RunLoads("x", "x", "", load.shape[2], 2, world, tuple(range(load.shape[0])),
                         tuple(layers), load, rank_SLR)


def test_compare_layers_hand_computed() -> None:
    # 2 steps, 2 layers, 4 experts on 2 ranks (experts 0,1 on rank 0; 2,3 on rank 1).
    a = _loads([[[4, 0, 0, 0], [1, 1, 1, 1]],
                [[2, 2, 0, 0], [0, 0, 0, 0]]])
    b = _loads([[[4, 0, 0, 0], [2, 2, 0, 0]],
                [[2, 2, 0, 0], [0, 0, 0, 0]]], layers=(0, 2))
    rows = {r.layer: r for r in diff.compare_layers(a, b, top_n=2)}
    assert sorted(rows) == [0, 1, 2]  # the union of both runs' layers
    assert rows[0].js == 0.0 and rows[0].hot.changed == 0
    # layer 0, run A: step 0 ranks (4, 0) -> 2.0, step 1 (4, 0) -> 2.0; mean 2.0
    assert rows[0].imbalance_a == 2.0 and rows[0].imbalance_ratio == 1.0
    # layer 1 only in A (step 1 empty: skipped): ranks (2, 2) -> 1.0; B never ran it -> 1.0
    assert rows[1].imbalance_a == 1.0 and rows[1].js == 1.0 and rows[1].slots_b == 0
    assert rows[1].hot.left == (0, 1) and rows[1].hot.entered == ()
    assert rows[2].js == 1.0 and rows[2].imbalance_b == 2.0 and rows[2].hot.entered == (0, 1)
    s = diff.summarize(list(rows.values()))
    assert (s["js"], s["js_mean"], s["hot_changed"]) == (1.0, 2 / 3, 2.0)
    assert s["imbalance_b"] == 2.0 and s["top1"] is None
    fails = diff.judge(s, [diff.parse_threshold("js>0.5"), diff.parse_threshold("imbalance_b>=2"),
                           diff.parse_threshold("js_mean>0.9")], list(rows.values()))
    assert [(f.threshold.metric, f.layers) for f in fails] == [("js", (1, 2)), ("imbalance_b", (0, 2))]
    # With the index's rank loads, those win over the contiguous-placement derivation.
    a2 = _loads(a.load_SLE, rank_SLR=np.array([[[1, 3], [2, 2]], [[2, 2], [0, 0]]]))
    assert a2.layer_imbalance(0) == pytest.approx((1.5 + 1.0) / 2)


def test_index_loads_equal_shard_loads(runs, tmp_path) -> None:
    """The distribution level reads RUN/index.duckdb (built on demand); it must hold exactly the
    loads the shards' dispatch records give."""
    import shutil

    # Shards and manifest only: earlier tests may have built the fixture run's index already.
    run = RunDir.open(shutil.copytree(runs["release"], tmp_path / "run",
                                      ignore=shutil.ignore_patterns("index.duckdb*")))
    assert not run.index_path.exists()
    facts = diff_runs.run_facts(run)
    from_index = diff_runs.load_run(run, facts, steps=(1, 3), layers=frozenset({0, 3}))
    assert run.index_path.exists()  # built because it was missing
    from_shards = diff_runs._load_from_shards(run, facts, steps=(1, 3), layers=frozenset({0, 3}))
    assert from_index.steps == from_shards.steps == (1, 2)
    assert from_index.layers == from_shards.layers == (0, 3)
    np.testing.assert_array_equal(from_index.load_SLE, from_shards.load_SLE)
    # The index's per-rank slots agree with DeepEP's contiguous placement of E / R experts.
    derived = from_shards.load_SLE.reshape(2, 2, WORLD, -1).sum(axis=3)
    np.testing.assert_array_equal(from_index.rank_SLR, derived)


def test_stdout_carries_only_the_report() -> None:
    """Anything written to fd 1 while the diff computes (DuckDB's progress bar during an index
    build) goes to stderr, so `--format json` output always parses."""
    code = ("import os, sys\n"
            "from epreplay.cli.cmd_diff import _stdout_to_stderr\n"
            "with _stdout_to_stderr():\n"
            "    os.write(1, b'[progress bar]')\n"
            "    print('python noise')\n"
            "print('{}')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "{}\n" and "[progress bar]" in proc.stderr and "python noise" in proc.stderr


@pytest.mark.slow
def test_cli_index_being_written_elsewhere_exits_2(runs, tmp_path) -> None:
    """No index yet and another process holds the writer lock: one clear line, exit 2."""
    import shutil

    from epreplay.index.lock import WriterLock

    run = RunDir.open(shutil.copytree(runs["a"], tmp_path / "run",
                                      ignore=shutil.ignore_patterns("index.duckdb*")))
    with WriterLock(run):
        proc = cli(str(run.path), str(runs["a"]))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no index yet" in proc.stderr and "Traceback" not in proc.stderr
    assert cli(str(run.path), str(runs["a"])).returncode == 0  # lock gone: the diff builds it
