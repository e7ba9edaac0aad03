"""RankMatrix: the rank x rank traffic matrix (senders down, receivers across) with totals.

A Heatmap whose rows are source ranks and columns destination ranks, plus a totals column
(tokens each rank sends), a totals row (tokens each rank receives) and the most loaded receiver
highlighted in the header and the totals row — the rank every other rank waits on in a combine.

Legend: R ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epreplay.tui.heatmap import Heatmap


@dataclass(frozen=True)
class TrafficSummary:
    """What the totals say about one traffic matrix.

    Attributes:
        sent_R: [R] tokens each rank sent (row sums). received_R: [R] column sums.
        busiest_receiver: rank with the largest received total (-1 when there is no traffic).
        ratio: its received total over the mean received total (1.0 = perfectly even).
    """

    sent_R: np.ndarray
    received_R: np.ndarray
    busiest_receiver: int
    ratio: float


def summarize(traffic_RR: np.ndarray) -> TrafficSummary:
    """Totals of a [R, R] src x dst token matrix and its most loaded receiver."""
    t = np.asarray(traffic_RR, dtype=np.float64)
    sent, recv = t.sum(axis=1), t.sum(axis=0)
    if recv.size == 0 or recv.max() <= 0:
        return TrafficSummary(sent, recv, -1, 1.0)
    busiest = int(np.argmax(recv))
    return TrafficSummary(sent, recv, busiest, float(recv[busiest] / recv.mean()))


class RankMatrix(Heatmap):
    """Traffic between ranks; the cursor's row is the sender, its column the receiver."""

    summary: TrafficSummary | None = None

    def set_traffic(self, traffic_RR: np.ndarray, *, keep_cursor: bool = True) -> TrafficSummary:
        """Show a [R, R] src x dst matrix (tokens); returns its totals and busiest receiver."""
        t = np.asarray(traffic_RR, dtype=np.float64)
        ranks = t.shape[0]
        summary = summarize(t)
        labels = [f"r{r}" for r in range(ranks)]
        hl = [summary.busiest_receiver] if summary.busiest_receiver >= 0 else []
        self.set_data(t, row_labels=labels, col_labels=[str(r) for r in range(ranks)],
                      highlight_cols=hl, row_totals=summary.sent_R, col_totals=summary.received_R,
                      keep_cursor=keep_cursor)
        self.summary = summary
        return summary
