"""epreplay.emulate: DeepEP's Buffer (V1) and ElasticBuffer (V2, epreplay.emulate.v2) on torch.distributed.

    from epreplay.emulate import Buffer, Config, EventOverlap, topk_idx_t

Owns the emulated buffers (buffer: V1's entry points; normal, combine, ll, ll_static: their
paths; v2, v2_ops, v2_combine: V2's), their argument checks, collectives and layout sizes, the
test-only fault injection (faults), and the modules the `deep_ep` stand-in serves as
deep_ep.utils.envs / .math / .testing (standin_envs, standin_math, standin_testing). The stand-in
itself (the `import deep_ep` finder) is epreplay.standin, one layer up: it imports this package,
never the reverse.
May import: torch, epreplay.errors, epreplay.format. Never duckdb, textual, nor capture/replay.
"""
from __future__ import annotations

from epreplay.emulate.buffer import (EMULATED, ENV_LL_ORDER_SEED, REGION_PREFIX, Buffer, Config, EmulatedDeepEPError,
                                     EmulatedTimeout, EventHandle, EventOverlap, is_emulated,
                                     named_hook, region, topk_idx_t)

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "EmulatedDeepEPError",
           "EmulatedTimeout", "is_emulated", "region", "named_hook", "REGION_PREFIX",
           "EMULATED", "ENV_LL_ORDER_SEED"]
