"""epreplay.diff: comparing the routing of two runs.

Owns the routing metrics (metrics: pure numpy), what a diff is made of (result), the per-layer
comparison and its verdict (compare), the token-level agreement from the shards (tokens), loading
two runs through their indexes (runs) and the text/JSON/markdown report (render).
May import: epreplay.errors, epreplay.marks, epreplay.format, epreplay.index, numpy, rich. Never torch,
textual, nor emulate/capture/replay.
"""
