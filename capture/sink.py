"""Where built records go: one rank's shard, or flight mode's ring until a trigger dumps it.

A `Sink` takes built records (header, arrays, meta; see build.py) and control items in the
order the recorder queued them, and owns everything after building: the shard writer, the records
held back until the shard header knows H, the flight ring, dumps and their de-duplication, and the
facts a rank reports at close. It runs in the job's writer thread (writer "thread") or alone in a
helper process (writer "process", see writer_proc.py); both call it the same way.

Errors propagate to the caller, which turns capture off with one line: a sink never logs.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from epreplay.capture.config import CaptureConfig
from epreplay.capture.flight import FlightRing
from epreplay.format.records import Kind, RecordHeader, ShardInfo, Status
from epreplay.format.run import RunDir

Built = tuple[RecordHeader, dict[str, Any], dict[str, Any]]

# Triggers with the same reason within 2 s are one incident (a NaN reaches every later record of
# its step; all ranks see one hang and each also reads the others' DUMP markers).
DUMP_DEDUP_S = 2.0
# Records held back until the shard header can carry H: a layout precedes its dispatch, so 4
# covers any sane call order while risking at most 4 records on a crash at the very start.
EARLY_RECORDS = 4
# What a shard header needs to know, learnt from the first records; reported in a rank's facts.
STATIC_FACTS = {"num_experts": 0, "topk": 0, "hidden": 0, "x_dtype": ""}
# Test hook: nanoseconds added to every time this rank's shard records (record start_ns, the
# shard's created_ns), as if its host clock were that far ahead. Lets one machine play nodes
# whose clocks disagree (tests/test_multinode.py); 0 (unset) in real use.
CLOCK_OFFSET_ENV = "EPREPLAY_CLOCK_OFFSET_NS"


def clock_offset_ns(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> int:
    text = environ.get(CLOCK_OFFSET_ENV, "").strip()
    try:
        return int(text) if text else 0
    except ValueError:
        raise ValueError(f"{CLOCK_OFFSET_ENV}={text!r}: must be an integer number of nanoseconds") from None


class Sink:
    """One rank's record destination (see the module docstring).

    on_trigger(reason, detail) is called when a built record asks for a dump (non-finite values
    in flight mode) after this sink has dumped its own ring: it tells the other ranks.
    """

    def __init__(self, config: CaptureConfig, *, rank: int, world_size: int,
                 on_trigger: Callable[[str, str], None] | None = None, resume: bool = False) -> None:
        self.config, self.level = config, config.level
        self.rank, self.world_size = rank, world_size
        self.run = RunDir(Path(config.run_dir))
        self.on_trigger = on_trigger
        self.static = dict(STATIC_FACTS)
        self.records = 0
        self.dumps: list[dict[str, Any]] = []
        self._writer: Any = None  # ShardWriter, opened on the first record that can go out
        self._early: list[Built] = []
        self._ring = FlightRing(config.flight_steps, config.ring_bytes) if config.flight else None
        self._last_dump: dict[str, float] = {}  # reason -> time.monotonic() of its last dump
        self.clock_offset_ns = clock_offset_ns()
        if resume and self.run.shard_path(rank).exists():
            # A writer before this one died (ring_consumer.py): go on with its shard, cut back to
            # its last whole record.
            from epreplay.format.shard import ShardWriter

            self._writer = ShardWriter.resume(self.run.shard_path(rank))
            self.static.update(num_experts=self._writer.info.num_experts, topk=self._writer.info.topk,
                               hidden=self._writer.info.hidden)
            self.records = self._writer.records

    # --- records ------------------------------------------------------------------------------
    def call(self, built: Built) -> None:
        """A built call record: to the ring (flight) or the shard; non-finite values trigger."""
        header, arrays, meta = built
        self._learn_static(header, arrays, meta)
        self._keep(built)
        if meta.get("nonfinite") and self._ring is not None:
            self.trigger("nonfinite", f"op {header.op} seq {header.seq}: {meta['nonfinite']}")

    def graph(self, records: list[Built]) -> None:
        """Records drained from CUDA-graph rings (graph_ring.Drainer), already built."""
        for built in records:
            self._learn_static(*built)
            self._keep(built)

    def event(self, meta: dict[str, Any], time_ns: int | None = None) -> None:
        """An EVENT record; time_ns: when it happened (default now)."""
        header = RecordHeader(kind=Kind.EVENT, op=0, level=self.level, status=Status.OK, buffer=0,
                              seq=self.records, step=-1, layer=-1, tokens=0,
                              start_ns=(time.time_ns() if time_ns is None else time_ns) + self.clock_offset_ns)
        self._append(header, {}, dict(meta, rank=self.rank))

    def dump(self, reason: str, detail: str, origin: int, time_ns: int | None = None) -> bool:
        """Drain the flight ring into the shard behind an EVENT naming the reason (time_ns: when
        the trigger fired, default now). False when it repeats the last trigger's reason within
        DUMP_DEDUP_S (one incident, one dump): then the records that reached the ring since that
        dump go to the shard after it, with no second EVENT. They are the incident's too: a rank
        whose own exception comes just after another rank's exception dumped it keeps its ERROR
        record, and every record a NaN reaches within the window is kept."""
        now = time.monotonic()
        repeat = now - self._last_dump.get(reason, -DUMP_DEDUP_S) < DUMP_DEDUP_S
        recs = self._ring.drain() if self._ring is not None else []
        if repeat:
            for built in recs:
                self._append(*built)
            next(d for d in reversed(self.dumps) if d["reason"] == reason)["records"] += len(recs)
            return False
        self._last_dump[reason] = now
        when = time.time_ns() if time_ns is None else time_ns
        self.dumps.append({"reason": reason, "origin_rank": origin, "records": len(recs),
                           "time_ns": when})
        self.event({"reason": reason, "detail": detail, "origin_rank": origin, "dump": True,
                    "records": len(recs), "evicted": self._ring.evicted if self._ring else 0}, when)
        for built in recs:
            self._append(*built)
        return True

    def trigger(self, reason: str, detail: str) -> None:
        """This rank saw a reason to dump: dump now, then tell the others (on_trigger)."""
        if self.dump(reason, detail, self.rank) and self.on_trigger is not None:
            self.on_trigger(reason, detail)

    @property
    def held(self) -> int:
        """Records taken but not yet in the shard (the first few wait for the header's H)."""
        return len(self._early)

    def last_record(self) -> tuple[int, int, int, int] | None:
        """(kind, buffer, seq, status) of the shard's last record when this sink resumed one."""
        index = getattr(self._writer, "_index", None)
        if not index:
            return None
        from epreplay.format.records import RecordHeader

        h = RecordHeader.from_bytes(index[-1][1])
        return (h.kind, h.buffer, h.seq, h.status)

    # --- close ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Write what is held back (every rank that captured gets a shard, even an empty one)
        and the footer. Idempotent."""
        if self._writer is None or self._early:
            self._flush_early()
        self._writer.close()

    def abandon(self) -> None:
        """The job died without closing: write what is held back, leave the shard unclosed (as
        a crash would, so readers see it was not closed)."""
        self._flush_early()

    def facts(self) -> dict[str, Any]:
        """This sink's part of a rank's closing facts."""
        return {"records": self.records, "dumps": self.dumps,
                "flight_evicted": self._ring.evicted if self._ring else 0,
                "bytes": getattr(self._writer, "bytes_written", 0), **self.static}

    # --- internals ------------------------------------------------------------------------------
    def _keep(self, built: Built) -> None:
        if self.clock_offset_ns:
            header, arrays, meta = built
            built = (replace(header, start_ns=header.start_ns + self.clock_offset_ns), arrays, meta)
        if self._ring is not None:
            self._ring.add(built)
        else:
            self._append(*built)

    def _learn_static(self, header: RecordHeader, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        s = self.static
        if not s["num_experts"] and meta.get("E"):
            s["num_experts"] = int(meta["E"])
        if not s["num_experts"] and "num_tokens_per_expert_E" in arrays:
            s["num_experts"] = int(arrays["num_tokens_per_expert_E"].shape[0])
        if not s["topk"] and "topk_idx_TK" in arrays and arrays["topk_idx_TK"].ndim == 2:
            s["topk"] = int(arrays["topk_idx_TK"].shape[1])
        if not s["hidden"] and meta.get("hidden"):
            s["hidden"], s["x_dtype"] = int(meta["hidden"]), str(meta.get("x_dtype", ""))

    def _shard(self) -> Any:
        if self._writer is None:
            from epreplay.format.shard import ShardWriter

            info = ShardInfo(run_id=self.config.run_id, rank=self.rank, world_size=self.world_size,
                             num_experts=self.static["num_experts"], topk=self.static["topk"],
                             hidden=self.static["hidden"], level=self.level,
                             created_ns=time.time_ns() + self.clock_offset_ns,
                             node=self.config.node, host=socket.gethostname())
            self._writer = ShardWriter(self.run.shard_path(self.rank), info)
        return self._writer

    def _append(self, header: RecordHeader, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        if self._writer is None and not self.static["hidden"] and len(self._early) < EARLY_RECORDS:
            # The shard header carries E, K and H; a layout call knows no H, so the first few
            # records wait (in memory) for a dispatch that tells it.
            self._early.append((header, arrays, meta))
            return
        self._flush_early()
        self._writer.append(header, arrays, meta)
        self.records += 1

    def _flush_early(self) -> None:
        writer = self._shard()
        early, self._early = self._early, []
        for built in early:
            writer.append(*built)
            self.records += 1
