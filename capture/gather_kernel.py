"""The compiled hook's gather launch on a GPU: one raw kernel launch per hooked call.

`at::cat_out` of a call's staged arrays into the device ring D costs ~15 us of host time per call
on an H200 host (the dispatcher, a TensorList, meta checks, the caching allocator's bookkeeping),
three times the whole per-call budget. The same copy as one `cuLaunchKernel` of our own kernel,
the arrays' addresses and lengths passed by value in the kernel's parameters, costs a driver
call (~2-3 us on an H200 host, ~8 us on the H100 host measured by bench/launch_floor.py) and no
allocation.

At level `fingerprints` the launch is `epreplay_gather_hash`: the same copies, and the rows to
fingerprint (format/fingerprint.py, version 2) hashed by one block each into fp [rows] int64 and
non-finite marks [rows] int8 at their places in D, so the hash costs no launch of its own (the
Python hook's path makes 2-5 a call: Triton kernels, then the gather). Low-latency buffers are
hashed by their valid rows, the counts read on the device. tests/test_gather_kernel_gpu.py checks
every fingerprint and mark against the torch reference.

The kernel is compiled at capture start with NVRTC (`torch.cuda._compile_kernel`, ~0.3 s once)
so nothing CUDA is needed where the package is built; the compiled hook receives the kernel's
CUfunction and the driver's `cuLaunchKernel` as addresses (`Session.set_gather`). Where NVRTC or
the driver is missing, or a launch fails, the hook keeps `at::cat_out` (same bytes, same place).

Layout in D: the arrays' bytes back to back from the reserved start, exactly as `torch.cat` of
their byte views puts them (device_stage.DeviceStage.gather), so the writer cannot tell the two
apart.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("epreplay.capture")

# Segments per launch: the kernel's parameter block holds their addresses and offsets (< 1 KiB,
# well under the 4 KiB parameter limit). A call with more arrays takes at::cat_out.
MAX_SEGS = 24  # = EP_MAX_SEGS below and kMaxSegs in _hookx.cpp
# Fingerprinted rows jobs per launch (a call hashes at most two tensors: its input and output rows).
MAX_HASH = 4  # = EP_MAX_HASH below and kMaxHash in _hookx.cpp

SOURCE = r"""
#define EP_MAX_SEGS 24
#define EP_MAX_HASH 4
typedef unsigned long long u64;
struct EpGather {
  u64 dst;                    // D + (start % cap)
  u64 src[EP_MAX_SEGS];       // each array's first byte (0: a hash output's place)
  u64 off[EP_MAX_SEGS + 1];   // each array's offset from dst; off[n] = total
  int n;
  int per_seg;                // > 0: blocks per segment, segment i copied by blocks [i * per_seg, ..)
};
// One fingerprinted rows job (format/fingerprint.py, version 2): rows of x [L, X, H] (or [T, H]:
// L = 1) as K whole 64-bit lanes each, an FP8 pair's scales [L, X, S] as words packed into lanes
// after x's, only the first counts[g] rows of group g live (a dead row is not read: fp 0).
struct EpHash {
  u64 a, b, counts;           // x's lanes; the scales' words (0: none); counts (0: every row)
  u64 fp, nf;                 // offsets from dst of fp [L * X] int64 and marks [L * X] int8
  u64 a_exp, a_lo, a_hi;      // x's finite check: exponent mask, 1 and top bit per word (0: none)
  u64 b_exp, b_lo, b_hi;
  u64 n_words;                // H (+ S): the word count the final mix takes
  int a_K, b_W, b_bits;       // lanes per x row; words and word bits per scales row
  int L, X, cmode, R;         // cmode 1: int32 [L]; 3: int64 [L]; 2: layout_range int64 [L, R]
  int per_group, block0;      // blocks per group; this job's first block
};
struct EpGatherHash {
  EpGather g;
  EpHash h[EP_MAX_HASH];
  int nh, copy_blocks;        // copy blocks come first, then each job's L * per_group blocks
};

// Segment i copied by threads tid, tid + stride, ...: 16 bytes a thread where the addresses and
// length allow, then 4, then 1 (int32 arrays of odd lengths put later segments off 16-byte
// alignment).
__device__ void ep_copy_seg(const EpGather &a, int i, u64 tid, u64 stride) {
  u64 s = a.src[i], d = a.dst + a.off[i], nb = a.off[i + 1] - a.off[i];
  if (!s) return;  // a hash output's place: written by ep_hash
  if (((s | d | nb) & 15ull) == 0) {
    const uint4 *s4 = (const uint4 *)s;
    uint4 *d4 = (uint4 *)d;
    for (u64 k = tid; k < (nb >> 4); k += stride) d4[k] = s4[k];
  } else if (((s | d | nb) & 3ull) == 0) {
    const unsigned int *s1 = (const unsigned int *)s;
    unsigned int *d1 = (unsigned int *)d;
    for (u64 k = tid; k < (nb >> 2); k += stride) d1[k] = s1[k];
  } else {
    const unsigned char *s1 = (const unsigned char *)s;
    unsigned char *d1 = (unsigned char *)d;
    for (u64 k = tid; k < nb; k += stride) d1[k] = s1[k];
  }
}

// Every segment over blocks [0, nblocks). With per_seg, each segment has blocks of its own, so
// all segments' loads are in flight at once: a call's arrays are small (a decode call's are a
// few KiB each) and a thread walking them one after another waits out a memory latency per
// segment (~0.25 us from L2 each, most of the kernel's time). Without, every block strides over
// every segment in turn.
__device__ void ep_copy(const EpGather &a, unsigned block, unsigned nblocks) {
  if (a.per_seg > 0) {
    int i = int(block / (unsigned)a.per_seg);
    if (i < a.n)
      ep_copy_seg(a, i, (u64)(block % (unsigned)a.per_seg) * blockDim.x + threadIdx.x, (u64)a.per_seg * blockDim.x);
    return;
  }
  u64 tid = block * (u64)blockDim.x + threadIdx.x;
  u64 stride = (u64)nblocks * blockDim.x;
  for (int i = 0; i < a.n; i++) ep_copy_seg(a, i, tid, stride);
}

extern "C" __global__ void epreplay_gather(EpGather a) { ep_copy(a, blockIdx.x, gridDim.x); }

__device__ __forceinline__ u64 ep_mix(u64 z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// Nonzero iff some word of the lane has all its exponent bits set (NaN/inf): has-zero-word of
// (lane & EXP) ^ EXP, exact as a yes/no.
__device__ __forceinline__ u64 ep_nonfinite(u64 lane, u64 exp, u64 lo, u64 hi) {
  u64 e = (lane & exp) ^ exp;
  return (e - lo) & (e ^ hi) & hi;
}
__device__ __forceinline__ void ep_put64(u64 addr, u64 v) {  // D's offsets need not be aligned
  if ((addr & 7ull) == 0) {
    *(u64 *)addr = v;
  } else {
    for (int i = 0; i < 8; i++) ((unsigned char *)addr)[i] = (unsigned char)(v >> (8 * i));
  }
}

// Rows c, c + per_group, ... of group g, one row at a time by the whole block (256 threads).
__device__ void ep_hash(u64 dst, const EpHash &h, unsigned b) {
  __shared__ u64 part[32];
  int g = b / h.per_group, c = b % h.per_group;
  long long live = h.X;
  if (h.cmode == 1) live = ((const int *)h.counts)[g];
  else if (h.cmode == 3) live = ((const long long *)h.counts)[g];
  else if (h.cmode == 2) {
    const long long *r = (const long long *)h.counts + (long long)g * h.R;
    live = 0;
    for (int k = 0; k < h.R; k++) live += r[k] & 0xFFFFFFFFll;
  }
  live = live < 0 ? 0 : (live > h.X ? h.X : live);
  const u64 SEED = 0x9E3779B97F4A7C15ull, PMUL = 0xC2B2AE3D27D4EB4Full;
  int b_K = (h.b_W * h.b_bits + 63) / 64, per = h.b_bits ? 64 / h.b_bits : 1;
  for (long long r = c; r < live; r += h.per_group) {
    long long t = (long long)g * h.X + r;
    const u64 *row = (const u64 *)h.a + t * h.a_K;
    u64 acc = 0, bad = 0;
#pragma unroll 4
    for (int k = threadIdx.x; k < h.a_K; k += blockDim.x) {
      u64 lane = row[k];
      acc += ep_mix(lane ^ ((u64)k * PMUL) ^ SEED);
      if (h.a_exp) bad |= ep_nonfinite(lane, h.a_exp, h.a_lo, h.a_hi);
    }
    if (h.b) {  // the scales: few words, packed little-endian into lanes after x's
      const unsigned char *srow = (const unsigned char *)h.b + t * (long long)h.b_W * (h.b_bits / 8);
      for (int k = threadIdx.x; k < b_K; k += blockDim.x) {
        u64 lane = 0;
        for (int i = 0; i < per; i++) {
          int w = k * per + i;
          if (w >= h.b_W) break;
          u64 v = h.b_bits == 32 ? ((const unsigned int *)srow)[w]
                : h.b_bits == 16 ? ((const unsigned short *)srow)[w] : srow[w];
          lane |= v << (h.b_bits * i);
        }
        acc += ep_mix(lane ^ ((u64)(h.a_K + k) * PMUL) ^ SEED);
        if (h.b_exp) bad |= ep_nonfinite(lane, h.b_exp, h.b_lo, h.b_hi);
      }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
    int any_bad = __syncthreads_or(bad != 0);  // also the barrier that publishes part[]
    if (threadIdx.x == 0) {
      u64 total = 0;
      for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += part[w];
      ep_put64(dst + h.fp + 8ull * t, ep_mix(total ^ h.n_words ^ 0xD1B54A32D192ED03ull));
      ((unsigned char *)(dst + h.nf))[t] = any_bad ? 1 : 0;
    }
    __syncthreads();  // part[] is reused by the next row
  }
  // dead rows (past their group's count): fp 0, no mark, nothing read
  long long first = c;
  if (first < live) first += ((live - c + h.per_group - 1) / h.per_group) * h.per_group;
  for (long long r = first + (long long)threadIdx.x * h.per_group; r < h.X; r += (long long)blockDim.x * h.per_group) {
    long long t = (long long)g * h.X + r;
    ep_put64(dst + h.fp + 8ull * t, 0);
    ((unsigned char *)(dst + h.nf))[t] = 0;
  }
}

// The call's copies and its fingerprinted rows in one launch.
extern "C" __global__ void epreplay_gather_hash(EpGatherHash p) {
  unsigned b = blockIdx.x;
  if (b < (unsigned)p.copy_blocks) {
    ep_copy(p.g, b, p.copy_blocks);
    return;
  }
  int j = 0;
  while (j + 1 < p.nh && b >= (unsigned)p.h[j + 1].block0) j++;
  ep_hash(p.g.dst, p.h[j], b - p.h[j].block0);
}
"""

_loaded: dict[tuple[int, str], Any] = {}  # (device, kernel) -> kernel (kept: its module stays loaded)
GATHER, GATHER_HASH = "epreplay_gather", "epreplay_gather_hash"


def load(device: Any, name: str = GATHER) -> tuple[int, int] | None:
    """(CUfunction address, cuLaunchKernel address) of kernel `name` (GATHER: the copies only;
    GATHER_HASH: the copies and fingerprinted rows) on `device`, or None where it cannot be had
    (the hook then keeps at::cat_out, and fingerprinted rows stay with the Python hook).
    Compiled once per device and kernel."""
    import torch

    try:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        kernel = _loaded.get((index, name))
        if kernel is None:
            with torch.cuda.device(index):  # the module belongs to this device's context
                kernel = torch.cuda._compile_kernel(SOURCE, name)
            _loaded[index, name] = kernel
        lib = ctypes.CDLL("libcuda.so.1")
        launch = ctypes.cast(lib.cuLaunchKernel, ctypes.c_void_p).value
        func = kernel.func.value if isinstance(kernel.func, ctypes.c_void_p) else int(kernel.func)
        if not func or not launch:
            return None
        return int(func), int(launch)
    except Exception as exc:  # no NVRTC, an old torch, no driver: the slower launch still works
        log.info("epreplay capture: kernel %s unavailable (%s); using torch.cat", name, exc)
        return None


def current_stream_handle() -> int:
    """The calling thread's current CUDA stream as a raw cudaStream_t (the hook caches it per
    stream id, so this runs once per stream)."""
    import torch

    return int(torch.cuda.current_stream().cuda_stream)
