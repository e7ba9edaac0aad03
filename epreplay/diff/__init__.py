"""epreplay.diff: comparing the routing of two runs.

Owns the routing metrics (metrics: pure numpy), the per-layer comparison and its verdict
(compare), the token-level agreement from the shards (tokens), loading two runs through their
indexes (runs) and the text/JSON report (render).
May import: epreplay.errors, epreplay.marks, epreplay.format, epreplay.index, numpy. Never torch,
textual, nor emulate/capture/replay.
"""
