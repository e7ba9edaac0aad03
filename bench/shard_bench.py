"""Shard encoding cost for DeepSeek-V3 routing: bytes per token-layer and encode/decode MB/s.

    .venv/bin/python bench/shard_bench.py [--reps 5] [--layers 8] [--fingerprint]

Shapes: prefill T=4096 and decode T=128 tokens per rank per layer, K=8 of E=256 routed experts,
topk_idx int64 and topk_weights float32 as DeepEP receives them (96 raw bytes per token-layer).
Routing is DeepSeek-V3-like, not uniform: sigmoid scores with a per-layer skewed expert bias
(a few hot experts), group-limited top-k (8 groups of 32, best 4 groups by top-2 sum), weights
normalised and scaled by 2.5, ids sorted by score as torch.topk returns them.

Reported per (T, zstd level, layout):
  B/tok-layer  bytes of a whole shard record (header frame + data frame) per token and layer
  ratio        raw int64+fp32 bytes / record bytes
  enc MB/s     raw bytes per second through codec.encode + zstd compress (one thread)
  dec MB/s     raw bytes per second through zstd decompress + codec.decode
layout "raw": arrays stored as given; "narrow+shuffle": the codec's default (ids -> uint8, byte
planes). The same record also goes through a real ShardWriter to check the on-disk size.
A second table does the same for payload records (bf16 activations, x_TH), where the writer's
default is level 1 (records over 1 MiB raw).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import zstandard

from epreplay.format import codec
from epreplay.format.frames import REC_PREFIX
from epreplay.format.records import Kind, Level, Op, RecordHeader, ShardInfo, Status
from epreplay.format.shard import ShardWriter

E, K, GROUPS, TOPK_GROUPS = 256, 8, 8, 4
ROUTED_SCALE = 2.5  # DeepSeek-V3's routed_scaling_factor
HIDDEN = 7168


def routing(T: int, layer: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """topk_idx_TK int64, topk_weights_TK float32 with layer-dependent hot experts."""
    bias_E = rng.standard_normal(E) * (0.5 + 0.1 * layer)  # skew grows with depth
    hot = rng.choice(E, 8, replace=False)
    bias_E[hot] += 2.0
    logits_TE = rng.standard_normal((T, E)) + bias_E
    scores_TE = 1.0 / (1.0 + np.exp(-logits_TE))
    per_group = scores_TE.reshape(T, GROUPS, E // GROUPS)
    group_score = np.sort(per_group, axis=2)[:, :, -2:].sum(axis=2)  # [T, G] top-2 sum
    keep_TG = np.argsort(-group_score, axis=1)[:, :TOPK_GROUPS]
    mask_TG = np.zeros((T, GROUPS), bool)
    np.put_along_axis(mask_TG, keep_TG, True, axis=1)
    masked_TE = np.where(np.repeat(mask_TG, E // GROUPS, axis=1), scores_TE, -np.inf)
    idx_TK = np.argsort(-masked_TE, axis=1, kind="stable")[:, :K].astype(np.int64)
    w_TK = np.take_along_axis(scores_TE, idx_TK, axis=1)
    w_TK = (w_TK / w_TK.sum(axis=1, keepdims=True) * ROUTED_SCALE).astype(np.float32)
    return idx_TK, w_TK


def bench(T: int, level: int, narrow: bool, batches: list[dict], reps: int) -> dict:
    comp = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    dec = zstandard.ZstdDecompressor()
    raw_bytes = sum((a[0] if isinstance(a, tuple) else a).nbytes for b in batches for a in b.values())
    frames, enc_t, dec_t = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        frames = [comp.compress(codec.encode(b, None, narrow=narrow, shuffle=narrow)) for b in batches]
        enc_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for f in frames:
            codec.decode(dec.decompress(f))
        dec_t.append(time.perf_counter() - t0)
    record_bytes = sum(len(f) + REC_PREFIX for f in frames)
    return {"bpt": record_bytes / (T * len(batches)), "ratio": raw_bytes / record_bytes,
            "enc": raw_bytes / min(enc_t) / 1e6, "dec": raw_bytes / min(dec_t) / 1e6,
            "enc_med": raw_bytes / statistics.median(enc_t) / 1e6}


def on_disk(T: int, batches: list[dict]) -> float:
    """Bytes per token-layer of a real shard (default writer settings), footer included."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank-00000.eprs")
        with ShardWriter(path, ShardInfo("bench", 0, 32, E, K, 7168)) as w:
            for layer, b in enumerate(batches):
                w.append(RecordHeader(Kind.CALL, Op.DISPATCH, Level.ROUTING, Status.OK, 0, layer,
                                      0, layer, T), b)
        return os.path.getsize(path) / (T * len(batches))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (best is reported)")
    ap.add_argument("--layers", type=int, default=8, help="distinct layers (records) per shape")
    ap.add_argument("--fingerprint", action="store_true",
                    help="also time the reference token fingerprint (torch, this machine's CPU/GPU)")
    args = ap.parse_args()
    if args.fingerprint:
        fingerprint_bench()
    rng = np.random.default_rng(0)
    print(f"DeepSeek-V3 routing, K={K} E={E}; raw int64 ids + fp32 weights = {K * 12} B per "
          f"token-layer; best of {args.reps} reps, one thread, zstandard {zstandard.__version__}")
    print(f"{'shape':<16}{'level':>6}  {'layout':<15}{'B/tok-layer':>12}{'ratio':>8}"
          f"{'enc MB/s':>10}{'dec MB/s':>10}")
    for name, T in (("prefill T=4096", 4096), ("decode T=128", 128)):
        batches = []
        for layer in range(args.layers):
            idx_TK, w_TK = routing(T, layer, rng)
            batches.append({"topk_idx_TK": idx_TK, "topk_weights_TK": w_TK})
        print(f"{name:<16}{'-':>6}  {'raw arrays':<15}{K * 12:>12.1f}{1.0:>8.2f}{'-':>10}{'-':>10}")
        for level in (1, 3):
            for narrow in (False, True):
                r = bench(T, level, narrow, batches, args.reps)
                layout = "narrow+shuffle" if narrow else "raw"
                print(f"{name:<16}{level:>6}  {layout:<15}{r['bpt']:>12.1f}{r['ratio']:>8.2f}"
                      f"{r['enc']:>10.0f}{r['dec']:>10.0f}")
        print(f"{name:<16}{3:>6}  {'ShardWriter':<15}{on_disk(T, batches):>12.1f}"
              f"   (real file, default settings, footer included)")
    print(f"\npayload level: x_TH bf16 H={HIDDEN} (bytes per token, not per token-layer; "
          f"raw {HIDDEN * 2} B). Synthetic activations: randn * per-channel scale.")
    print(f"{'shape':<16}{'level':>6}  {'layout':<15}{'B/token':>12}{'ratio':>8}"
          f"{'enc MB/s':>10}{'dec MB/s':>10}")
    for name, T in (("decode T=128", 128), ("prefill T=4096", 4096)):
        x_TH = (rng.standard_normal((T, HIDDEN), dtype=np.float32)
                * rng.lognormal(0, 1, HIDDEN).astype(np.float32))
        bits_TH = bf16_bits(x_TH)
        batches = [{"x_TH": (bits_TH, "bfloat16")}]
        for level in (1, 3):
            for shuffle in (False, True):
                r = bench(T, level, shuffle, batches, max(1, min(args.reps, 3)))
                layout = "shuffle" if shuffle else "raw"
                print(f"{name:<16}{level:>6}  {layout:<15}{r['bpt']:>12.1f}{r['ratio']:>8.2f}"
                      f"{r['enc']:>10.0f}{r['dec']:>10.0f}")


def fingerprint_bench() -> None:
    """Throughput of epreplay.format.fingerprint.fingerprint_rows (both definitions) at DeepSeek-V3
    hidden size."""
    import torch

    from epreplay.format.fingerprint import VERSIONS, fingerprint_rows

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"token fingerprint (reference, torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    for device in devices:
        for T in (128, 4096):
            for dtype in (torch.bfloat16, torch.float8_e4m3fn):
                x = torch.randn(T, HIDDEN, device=device).to(dtype)
                for version in VERSIONS:
                    best = float("inf")
                    for _ in range(3):
                        if device == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        fingerprint_rows(x, version=version)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        best = min(best, time.perf_counter() - t0)
                    print(f"  {device:<5} T={T:<5} H={HIDDEN} {str(dtype).replace('torch.', ''):<14} v{version} "
                          f"{best * 1e3:8.2f} ms  {x.numel() * x.element_size() / best / 1e6:8.0f} MB/s")
    print()


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


if __name__ == "__main__":
    main()
