"""epreplay.format.steps: steps found in an unmarked run's traffic (pure functions on header arrays)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from epreplay.format import steps
from epreplay.format.reader import HEADER_DTYPE
from epreplay.format.records import Kind, Op

NORMAL = (Op.LAYOUT, Op.DISPATCH, Op.COMBINE)
LL = (Op.LL_DISPATCH, Op.LL_COMBINE)


def _headers(layer_calls: list[tuple[tuple[Op, ...], int]], *, step_of=None) -> np.ndarray:
    """One rank's records as the recorder writes them without marks: layer call u -> (step 0,
    layer u), calls numbered per buffer 0 in call order. layer_calls: [(ops, T)]."""
    rows = []
    seq = 0
    for u, (ops, T) in enumerate(layer_calls):
        for op in ops:
            rows.append((int(op), seq, 0 if step_of is None else step_of(u), u, T))
            seq += 1
    h = np.zeros(len(rows), HEADER_DTYPE)
    h["kind"] = int(Kind.CALL)
    for name, col in zip(("op", "seq", "step", "layer", "tokens"), zip(*rows)):
        h[name] = col
    return h


def _detect(*ranks: np.ndarray) -> steps.StepPlan:
    return steps.plan_for(None, list(ranks))


def test_token_counts_that_change_per_step_give_the_period():
    # 3 steps x 4 layers; each rank's batch differs per step (and between ranks)
    for L in (1, 2, 4, 5):
        ranks = [_headers([(NORMAL, 16 + 8 * s + r) for s in range(3) for _ in range(L)]) for r in range(2)]
        plan = _detect(*ranks)
        assert (plan.method, plan.layers_per_step) == ("detected", L), plan
        step, layer = steps.apply(plan, ranks[0]["step"], ranks[0]["layer"])
        assert step.max() == 2 and layer.max() == L - 1 and step.dtype == ranks[0]["step"].dtype
        assert list(step[::3]) == [s for s in range(3) for _ in range(L)]


def test_one_rank_changing_is_enough_and_a_step_that_keeps_its_batch_is_fine():
    L = 3
    # prefill 40 tokens, then three decode steps of 8 on rank 0; rank 1 always 8
    r0 = _headers([(NORMAL, 40 if s == 0 else 8) for s in range(4) for _ in range(L)])
    r1 = _headers([(NORMAL, 8) for s in range(4) for _ in range(L)])
    plan = _detect(r0, r1)
    assert (plan.method, plan.layers_per_step) == ("detected", L)


def test_a_repeating_call_pattern_gives_the_period_when_tokens_never_change():
    # layer 0 of each step runs low-latency, layers 1..3 normal (a mixed model), fixed batch
    per_step = [(LL, 8)] + [(NORMAL, 8)] * 3
    plan = _detect(_headers(per_step * 3))
    assert (plan.method, plan.layers_per_step) == ("detected", 4)
    # a cached dispatch in the last layer of each step: also a pattern
    per_step = [(NORMAL, 8)] * 2 + [(NORMAL + (Op.CACHED_DISPATCH, Op.COMBINE), 8)]
    plan = _detect(_headers(per_step * 5))
    assert (plan.method, plan.layers_per_step) == ("detected", 3)


def test_prefill_normal_then_decode_low_latency():
    # prefill on normal kernels, decode on low-latency ones: the switch is a step boundary, and
    # the decode steps' batches differ
    L = 2
    calls = [(NORMAL, 64)] * L + [(LL, 4)] * L + [(LL, 5)] * L + [(LL, 6)] * L
    plan = _detect(_headers(calls))
    assert (plan.method, plan.layers_per_step) == ("detected", L)


def test_nothing_to_see_is_none_not_a_guess():
    # identical layers on a fixed batch: 3 steps x 4 layers look like 12 x 1 or 1 x 12
    plan = _detect(_headers([(NORMAL, 32)] * 12))
    assert plan.method == "none" and plan.layers_per_step == 0
    assert "same call pattern" in plan.detail and "--layers-per-step" in plan.describe()
    step, layer = steps.apply(plan, np.zeros(3, np.int32), np.arange(3, dtype=np.int32))
    assert list(step) == [0, 0, 0] and list(layer) == [0, 1, 2]
    # one layer call is nothing to compare
    assert _detect(_headers([(NORMAL, 32)])).method == "none"
    # an aperiodic pattern whose changes share no period other than 1... is period 1 (each its own step)
    plan = _detect(_headers([(NORMAL, 8), (LL, 8), (LL, 8), (NORMAL, 8)]))
    assert (plan.method, plan.layers_per_step) == ("detected", 1)


def test_single_layer_model_every_dispatch_is_a_step():
    plan = _detect(_headers([(NORMAL, t) for t in (32, 30, 31, 29, 33)]))
    assert (plan.method, plan.layers_per_step) == ("detected", 1)
    step, layer = steps.apply(plan, np.zeros(5, np.int32), np.arange(5, dtype=np.int16))
    assert list(step) == [0, 1, 2, 3, 4] and list(layer) == [0] * 5


def test_pattern_and_tokens_that_disagree_find_nothing():
    per_step = [(LL, 8)] + [(NORMAL, 8)] * 3  # pattern says 4
    calls = per_step * 3
    calls[2] = (NORMAL, 9)  # but T changes inside a step
    calls[3] = (NORMAL, 9)
    plan = _detect(_headers(calls))
    assert plan.method == "none" and "repeats every 4" in plan.detail


def test_marks_and_layers_per_step_win():
    calls = [(NORMAL, 16 + 8 * s) for s in range(3) for _ in range(2)]
    marked = _headers(calls, step_of=lambda u: u // 2)
    assert _detect(marked).method == "marked"
    # one marked step (all step 0): the ranks' facts say they saw marks
    m = SimpleNamespace(extra={"layers_per_step": 0}, ranks={"0": {"steps_marked": 6}})
    assert steps.plan_for(m, [_headers(calls)]).method == "marked"
    m = SimpleNamespace(extra={"layers_per_step": 2}, ranks={"0": {"steps_marked": 0}})
    plan = steps.plan_for(m, [_headers(calls, step_of=lambda u: u // 2)])
    assert (plan.method, plan.layers_per_step) == ("layers-per-step", 2)
    assert not plan.derived and plan.describe() == "steps: --layers-per-step 2"
    # steps without marks or --layers-per-step: CUDA-graph replays, kept as recorded
    m = SimpleNamespace(extra={"layers_per_step": 0}, ranks={"0": {"steps_marked": 0}})
    plan = steps.plan_for(m, [marked])
    assert plan.method == "marked" and "CUDA-graph replay" in plan.describe()
    # facts that say no marks: detection runs
    m = SimpleNamespace(extra={"layers_per_step": 0}, ranks={"0": {"steps_marked": 0}})
    assert steps.plan_for(m, [_headers(calls)]).layers_per_step == 2


def test_records_out_of_order_and_events_are_handled():
    calls = [(NORMAL, 16 + 8 * s) for s in range(3) for _ in range(4)]
    h = _headers(calls)
    ev = np.zeros(1, HEADER_DTYPE)
    ev["kind"], ev["layer"], ev["step"] = int(Kind.EVENT), -1, 0
    shuffled = np.concatenate([h[::-1], ev])
    plan = _detect(shuffled)
    assert plan.layers_per_step == 4
    step, layer = steps.apply(plan, shuffled["step"], shuffled["layer"])
    assert (step[-1], layer[-1]) == (0, -1)  # the event keeps "unknown"
