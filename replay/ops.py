"""The replay engine of one physical rank: inputs from the recording, one physical call through
the backend per collective, results split back per virtual rank and verified.

Legend: N virtual ranks, M physical ranks, B = N / M, j slot of a virtual rank in its block,
E experts, Lv = E / N, Lp = E / M, T tokens (of one virtual rank), Tp = sum of T over a block,
K top-k, H hidden, Np rows a physical dispatch received, Mll recorded LL max tokens per rank.

Why concatenating preserves DeepEP's order: physical rank q's batch is its virtual ranks'
tokens in ascending virtual order, so physical (source q, token offset_v + t) sorts exactly like
virtual (source v, token t); the rows a virtual rank u must receive are the physical rows that
carry at least one expert of u, in the same relative order. Low-latency rows are compared as
sets, so only the (source, token) labels need translating.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from epreplay.format.records import FINGERPRINT_VERSION, Op, fp_version
from epreplay.index.rows import Divergence
from epreplay.replay import inputs as I
from epreplay.replay import elastic as EL
from epreplay.replay import normal as N_
from epreplay.replay import lowlat as LL
from epreplay.replay.schedule import Call
from epreplay.replay.state import DispatchState


@dataclass(frozen=True)
class Routing:
    """All virtual ranks' routing of one call: idx_GK [G, K] int64 and w_GK [G, K] float32 (or
    None) over G = sum of T, rank-major; tokens_N [N] T per rank; base_N [N] first row of each."""

    idx_GK: np.ndarray
    w_GK: np.ndarray | None
    tokens_N: np.ndarray
    base_N: np.ndarray


class Engine:
    """Replays calls on physical rank `p` (see the module docstring)."""

    def __init__(self, job: Any, p: int, device: str, sink: Any) -> None:
        self.job, self.p, self.device, self.sink = job, p, device, sink
        self.plan = job.plan
        self.vs = list(self.plan.virtual_of(p))
        self._scans: dict[int, Any] = {}
        self._recs: dict[tuple[int, int], Any] = {}
        self.recorded_now = False  # this call replays recorded payloads (see run)
        self._fp_cache: dict[tuple, tuple] = {}  # this call's synthetic fingerprints (flat tokens)
        self._base, self._base_for = np.zeros(0, np.int64), -1
        self._routing: Routing | None = None
        self._routing_for = -1
        self._buffers: dict[int, Any] = {}
        self.states: dict[tuple[int, int], DispatchState] = {}
        self._last: dict[tuple[int, int], int] = {}
        for c in job.calls:  # last use of each dispatch, so its tensors can be freed
            if c.parent_seq is not None:
                self._last[(c.buffer, c.parent_seq)] = c.index

    # --- records ----------------------------------------------------------------------------
    def scan(self, v: int) -> Any:
        s = self._scans.get(v)
        if s is None:
            from epreplay.format.shard import open_shard

            s = self._scans[v] = open_shard(self.job.shard_paths[v])
        return s

    def record(self, v: int, call: Call) -> Any:
        """Virtual rank v's record of `call` (cached: a dispatch reads every source's record)."""
        key = (v, call.index)
        rec = self._recs.get(key)
        if rec is None:
            if len(self._recs) > 4 * self.plan.virtual:  # only the current call's are reused
                self._recs.clear()
            rec = self._recs[key] = self.scan(v).read_at(call.offsets_N[v])
        return rec

    def all_routing(self, call: Call) -> "Routing | None":
        """Every virtual rank's recorded routing of `call`, concatenated in (rank, token) order
        (cached per call): what a receiver's expected rows are looked up in, in one vectorised
        gather instead of one per source. None when a rank recorded no topk_idx_TK."""
        if self._routing_for == call.index:
            return self._routing
        idx, w = [], []
        for v in range(self.plan.virtual):
            a = self.record(v, call).arrays
            if a.get("topk_idx_TK") is None:
                idx = None
                break
            idx.append(a["topk_idx_TK"])
            w.append(a.get("topk_weights_TK"))
        routing = None
        if idx is not None:
            T_N = np.array([len(t) for t in idx], np.int64)
            routing = Routing(np.concatenate(idx).astype(np.int64), None if any(x is None for x in w)
                              else np.concatenate(w).astype(np.float32),
                              T_N, np.concatenate([[0], np.cumsum(T_N)[:-1]]).astype(np.int64))
        self._routing, self._routing_for = routing, call.index
        return routing

    def buffer(self, call: Call) -> Any:
        b = self._buffers.get(call.buffer)
        if b is None and call.buffer in self.job.elastic_buffers:  # a DeepEP V2 recording
            b = self._buffers[call.buffer] = EL.make_buffer(self.job.backend, self.device)
        if b is None:
            from epreplay.replay.worker import make_buffer

            ll = call.buffer in self.job.ll_buffers
            mll = self.job.ll_max_tokens.get(call.buffer, 0) * self.plan.per_process
            b = self._buffers[call.buffer] = make_buffer(
                self.job.backend, low_latency=ll, max_tokens=mll, hidden=self.job.hidden,
                world=self.plan.physical, experts=self.job.experts, device=self.device)
        return b

    # --- helpers ----------------------------------------------------------------------------
    def offsets(self, call: Call, q: int) -> np.ndarray:
        """[B + 1] token offsets of physical rank q's virtual ranks in q's concatenated batch."""
        toks = [call.tokens_N[v] for v in self.plan.virtual_of(q)]
        return np.concatenate([[0], np.cumsum(toks)]).astype(np.int64)

    def to_virtual(self, call: Call, q_N: np.ndarray, ptok_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Physical (source q, token in q's batch) -> virtual (source v, token in v's batch)."""
        src = np.empty(len(q_N), np.int64)
        tok = np.empty(len(q_N), np.int64)
        B = self.plan.per_process
        for q in np.unique(q_N):
            off = self.offsets(call, int(q))
            m = q_N == q
            j = np.searchsorted(off, ptok_N[m], side="right") - 1
            src[m] = int(q) * B + j
            tok[m] = ptok_N[m] - off[j]
        return src, tok

    def key(self, call: Call) -> int:
        return I.call_key(self.job.run_id, call.step, call.layer, call.seq)

    def payload(self, call: Call, v: int, rec: Any, T: int, fp8: bool) -> Any:
        """Virtual rank v's x for this call: recorded, or synthetic (FP8-cast when recorded so)."""
        if self.recorded_now:
            return I.recorded_x(rec.arrays, rec.meta)
        x = I.synth_source(self.key(call), v, T, self.job.hidden)
        return I.to_fp8(x) if fp8 else x

    def fp_version(self, rec: Any) -> int:
        """The fingerprint definition to hash received rows with, for comparing with `rec`: the
        recording's (meta "fp_version", 1 when absent) when this call compares against recorded
        fingerprints, else the current one (expected and received rows are both hashed here)."""
        return fp_version(rec.meta) if self.recorded_now else FINGERPRINT_VERSION

    def expected_fp(self, call: Call, rec: Any, name: str, src: np.ndarray, tok: np.ndarray,
                    cast: Any = None, key: int | None = None) -> np.ndarray | None:
        """Expected received fingerprints: recorded (payload replay) or recomputed from the
        synthetic rows of the sources, passed through `cast` (the FP8 cast, or None). Within a
        call every source token is generated and hashed at most once per process, however many
        co-hosted ranks and local experts received it."""
        if self.recorded_now:
            return rec.arrays.get(name)
        key = self.key(call) if key is None else key
        cached = self._fp_cache.get((key, id(cast)))
        if cached is None:  # flat over every source's tokens: index = base[v] + t
            total = int(sum(call.tokens_N))
            cached = self._fp_cache[(key, id(cast))] = (np.zeros(total, np.uint64), np.zeros(total, bool))
        fp, have = cached
        flat = self._token_base(call)[src] + tok
        need = np.unique(flat[~have[flat]])
        if len(need):
            base = self._token_base(call)
            v_need = np.searchsorted(base, need, side="right") - 1
            rows = I.synth_rows(key, torch.from_numpy(v_need), torch.from_numpy(need - base[v_need]),
                                self.job.hidden)
            fp[need] = I.fingerprints(cast(rows) if cast is not None else rows, version=self.fp_version(rec))
            have[need] = True
        return fp[flat]

    def _token_base(self, call: Call) -> np.ndarray:
        """[N] offset of each virtual rank's first token in the call's flat token numbering."""
        if self._base_for != call.index:
            self._base = np.concatenate([[0], np.cumsum(call.tokens_N)[:-1]]).astype(np.int64)
            self._base_for = call.index
        return self._base

    def check(self, call: Call, v: int, fn: Any) -> None:
        """Run one virtual rank's verification; a backend output too malformed to compare
        (wrong shapes, inconsistent handle) is itself a divergence, and the replay goes on."""
        try:
            found = fn()
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the collective completed
            found = [("error", "outputs that can be verified", f"{type(exc).__name__}: {exc}"[:500],
                      -1, -1, -1, "verifying the replayed call failed (malformed backend output)")]
        self.report(call, v, found)

    def report(self, call: Call, v: int, found: list[tuple]) -> None:
        for kind, exp, got, src, tok, expert, detail in found:
            self.sink.add(Divergence(call.index, call.buffer, call.seq, call.step, call.layer,
                                     call.op.label, v, self.p, kind, str(exp), str(got), tok, src,
                                     expert, detail))

    def sync(self) -> None:
        """Wait for the device (a no-op on CPU)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def warm_up(self) -> None:
        """Create every Buffer the schedule uses, in buffer order on every rank (construction may
        be collective), so the first call's timing is the call's, not the Buffer's."""
        for c in self.job.calls:
            if c.buffer not in self._buffers:
                self.buffer(c)

    # --- dispatching ------------------------------------------------------------------------
    def run(self, call: Call) -> None:
        t0 = time.perf_counter_ns()
        recs = {v: self.record(v, call) for v in self.vs}
        self._fp_cache.clear()
        # Recorded payload only where this call has one: with payload_every=k the other steps
        # hold none (on every rank alike), and those calls replay with synthetic payloads.
        self.recorded_now = self.job.payload == "recorded" and all(
            "x_TH" in r.arrays for r in recs.values())
        handler = {Op.LAYOUT: N_.layout, Op.DISPATCH: N_.dispatch, Op.CACHED_DISPATCH: N_.cached,
                   Op.COMBINE: N_.combine, Op.LL_DISPATCH: LL.dispatch, Op.LL_COMBINE: LL.combine}[call.op]
        if call.op == Op.DISPATCH and call.buffer in self.job.elastic_buffers:
            handler = EL.dispatch  # V2: its cached dispatch and combine take V1's arguments
        backend_ns, nbytes = handler(self, call, recs)
        self.sink.timed(call.op.label, backend_ns, time.perf_counter_ns() - t0,
                        sum(call.tokens_N[v] for v in self.vs), nbytes)
        for key, last in list(self._last.items()):
            if last == call.index:
                self.states.pop(key, None)

    def parent(self, call: Call, recs: dict[int, Any]) -> DispatchState:
        seq = I.meta_value(recs[self.vs[0]].meta, "dispatch_seq", default=-1)
        seq = call.parent_seq if seq is None or int(seq) < 0 else int(seq)
        st = self.states.get((call.buffer, seq))
        if st is None:
            raise RuntimeError(f"{call.op.label} seq {call.seq} uses dispatch seq {seq}, "
                               f"which was not replayed")
        return st

    def close(self) -> None:
        for s in self._scans.values():
            s.close()
        self._scans.clear()
        self.states.clear()
        for b in self._buffers.values():
            destroy = getattr(b, "destroy", None)
            if destroy is not None:
                try:
                    destroy()
                except Exception:  # noqa: BLE001 - a Buffer that needs no destroy may refuse it
                    pass
        self._buffers.clear()
