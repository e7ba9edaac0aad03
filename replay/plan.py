"""Rank folding: N recorded (virtual) ranks onto M replay (physical) processes.

Legend: N virtual ranks, M physical ranks, B = N / M virtual ranks per physical rank,
E experts, Lv = E / N local experts of a virtual rank, Lp = E / M = B * Lv of a physical rank.

Physical rank p hosts the contiguous block of virtual ranks [p*B, (p+1)*B). Virtual rank v owns
experts [v*Lv, (v+1)*Lv); the union over p's block is [p*Lp, (p+1)*Lp), exactly the range DeepEP
gives physical rank p in a group of M. So expert e lives on physical rank e // Lp, every
token -> expert assignment is unchanged, every expert's load is unchanged, and the physical
rank-to-rank traffic is the block-sum of the virtual traffic (co-hosted pairs become local).

Pure: numpy only, no torch, no processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epreplay.errors import UsageError


def processes(n: int) -> str:
    """'1 process', '4 processes': the count of replay processes as a person reads it."""
    return f"{n} process" if n == 1 else f"{n} processes"


def valid_ranks(n: int) -> list[int]:
    """Every M a run recorded on `n` ranks can be replayed on (the divisors of n)."""
    return [m for m in range(1, n + 1) if n % m == 0]


@dataclass(frozen=True)
class Plan:
    """Where every virtual rank and expert runs.

    Attributes:
        virtual: N, the recorded world size.
        physical: M, the replay world size (divides N).
        experts: E (0 when the recording does not say; expert maps are then unavailable).
    """

    virtual: int
    physical: int
    experts: int = 0

    @classmethod
    def make(cls, virtual: int, physical: int | None = None, experts: int = 0) -> "Plan":
        """Validate and build. `physical` None means M = N.

        Raises:
            UsageError: M < 1, M does not divide N, or E is not a multiple of N.
        """
        m = virtual if physical is None else int(physical)
        if virtual < 1:
            raise UsageError(f"recorded world size {virtual}: a run needs at least one rank")
        if m < 1 or virtual % m != 0:
            choices = ", ".join(str(x) for x in valid_ranks(virtual))
            raise UsageError(f"--ranks {m}: must divide the recorded world size {virtual}; "
                             f"valid values: {choices}")
        if experts and experts % virtual != 0:
            raise UsageError(f"recording says {experts} experts on {virtual} ranks: experts must be "
                             f"a multiple of the world size; the manifest or shard header is wrong")
        return cls(virtual, m, experts)

    @property
    def per_process(self) -> int:
        """B, virtual ranks hosted by one physical rank."""
        return self.virtual // self.physical

    @property
    def local_experts_virtual(self) -> int:
        return self.experts // self.virtual

    @property
    def local_experts_physical(self) -> int:
        return self.experts // self.physical

    def physical_of(self, v: int) -> int:
        """The physical rank hosting virtual rank v."""
        return v // self.per_process

    def virtual_of(self, p: int) -> range:
        """The virtual ranks hosted by physical rank p, ascending."""
        b = self.per_process
        return range(p * b, (p + 1) * b)

    def slot_of(self, v: int) -> int:
        """j = v's position inside its physical rank's block (0 .. B-1)."""
        return v % self.per_process

    def experts_of_virtual(self, v: int) -> range:
        lv = self.local_experts_virtual
        return range(v * lv, (v + 1) * lv)

    def experts_of_physical(self, p: int) -> range:
        lp = self.local_experts_physical
        return range(p * lp, (p + 1) * lp)

    def expert_home_physical(self, e: int) -> int:
        return e // self.local_experts_physical

    def expert_home_virtual(self, e: int) -> int:
        return e // self.local_experts_virtual

    def fold_matrix(self, traffic_NN: np.ndarray) -> np.ndarray:
        """Physical traffic [M, M] = block sums of virtual traffic [N, N] (src rows, dst cols)."""
        t = np.asarray(traffic_NN)
        if t.shape != (self.virtual, self.virtual):
            raise ValueError(f"traffic matrix {t.shape}: expected ({self.virtual}, {self.virtual})")
        b, m = self.per_process, self.physical
        return t.reshape(m, b, m, b).sum(axis=(1, 3))

    def fold_vector(self, per_virtual_N: np.ndarray) -> np.ndarray:
        """Per-physical-rank totals [M] of a per-virtual-rank vector [N]."""
        v = np.asarray(per_virtual_N)
        return v.reshape(self.physical, self.per_process).sum(axis=1)

    def to_dict(self) -> dict:
        """JSON form for the report: the placement a person reads to see what runs where."""
        out = {"virtual_ranks": self.virtual, "physical_ranks": self.physical,
               "virtual_per_physical": self.per_process, "experts": self.experts,
               "placement": []}
        for p in range(self.physical):
            vs = self.virtual_of(p)
            row: dict = {"physical": p, "virtual": [vs.start, vs.stop - 1]}
            if self.experts:
                es = self.experts_of_physical(p)
                row["experts"] = [es.start, es.stop - 1]
            out["placement"].append(row)
        return out

    def describe(self) -> list[str]:
        """Human-readable lines: one per physical rank."""
        lines = [f"plan: {self.virtual} recorded ranks on {processes(self.physical)} "
                 f"({self.per_process} per process)"]
        for p in range(self.physical):
            vs = self.virtual_of(p)
            part = (f"  process {p}: virtual ranks {vs.start}..{vs.stop - 1}" if len(vs) > 1
                    else f"  process {p}: virtual rank {vs.start}")
            if self.experts:
                es = self.experts_of_physical(p)
                part += f", experts {es.start}..{es.stop - 1}"
            lines.append(part)
        return lines
