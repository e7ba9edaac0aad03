// Fingerprints of host rows inside the compiled hook (_hookx.cpp): version 2 of
// epreplay/format/fingerprint.py, bit for bit, with the non-finite check of the GPU launch.
//
// Why in the hook: at level `fingerprints` the hook used to copy the rows' bytes into the ring for
// the writer to hash (256 KiB a decode dispatch, ~17 us at ~15 GB/s); hashing them here with
// AVX-512 reads them once and writes 9 bytes a row. Only where the CPU has AVX-512DQ (64-bit
// multiplies on 8 lanes): a scalar hash is slower than the copy, so without it the plan keeps
// copying (fast_plan.compile_plan asks host_hash_fast()).
//
// Row: x's K whole 64-bit lanes (contiguous, 8-byte aligned), then an FP8 pair's scales as W words
// of `bytes` each, `stride` bytes apart, packed little-endian into lanes after x's (the last one
// zero-padded). fp = mix(sum_k mix(lane_k ^ k * PMUL ^ SEED) ^ n_words ^ SEED2).
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace hosthash {

constexpr uint64_t SEED = 0x9E3779B97F4A7C15ull, SEED2 = 0xD1B54A32D192ED03ull,
                   PMUL = 0xC2B2AE3D27D4EB4Full, M1 = 0xBF58476D1CE4E5B9ull, M2 = 0x94D049BB133111EBull;

inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * M1;
  z = (z ^ (z >> 27)) * M2;
  return z ^ (z >> 31);
}

// Nonzero iff a word of the lane has all its exponent bits set (has-zero-word of (lane & exp) ^ exp).
inline uint64_t nonfinite(uint64_t lane, uint64_t exp, uint64_t lo, uint64_t hi) {
  uint64_t e = (lane & exp) ^ exp;
  return (e - lo) & (e ^ hi) & hi;
}

struct Masks {  // a word's exponent mask, 1 and top bit replicated over a lane; exp 0: no check
  uint64_t exp = 0, lo = 0, hi = 0;
};

#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f,avx512dq"))) inline __m512i mix8(__m512i z) {
  z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 30));
  z = _mm512_mullo_epi64(z, _mm512_set1_epi64(int64_t(M1)));
  z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 27));
  z = _mm512_mullo_epi64(z, _mm512_set1_epi64(int64_t(M2)));
  return _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
}

__attribute__((target("avx512f,avx512dq"))) inline __m512i nonfinite8(__m512i v, const Masks &m) {
  __m512i exp = _mm512_set1_epi64(int64_t(m.exp)), hi = _mm512_set1_epi64(int64_t(m.hi));
  __m512i e = _mm512_xor_si512(_mm512_and_si512(v, exp), exp);
  return _mm512_and_si512(_mm512_and_si512(_mm512_sub_epi64(e, _mm512_set1_epi64(int64_t(m.lo))),
                                           _mm512_xor_si512(e, hi)), hi);
}

// The rows are read after the call, which has evicted them: asking for the lines 2 KiB ahead keeps
// more misses in flight than the hardware's stream prefetch alone (hook us/call, decode
// fingerprints 16.2-17.3 -> 14.4-14.7, low-latency 83-89 -> 75-78; 1 and 4 KiB ahead: no better).
#ifndef PREFETCH
#define PREFETCH 2048
#endif
// sum_k mix(lane_k ^ k * PMUL ^ SEED) over lanes [0, K) of p; *bad |= the non-finite marks.
__attribute__((target("avx512f,avx512dq"))) inline uint64_t lanes8(const uint64_t *p, int64_t K, const Masks &m,
                                                                  uint64_t *bad) {
  const __m512i seed = _mm512_set1_epi64(int64_t(SEED)), step = _mm512_set1_epi64(int64_t(8 * PMUL));
  __m512i pos0 = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(int64_t(PMUL)));
  __m512i pos1 = _mm512_add_epi64(pos0, step), step2 = _mm512_add_epi64(step, step);
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, badv = acc0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // two independent chains: the multiplies' latency overlaps
    _mm_prefetch(reinterpret_cast<const char *>(p + k) + PREFETCH, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char *>(p + k) + PREFETCH + 64, _MM_HINT_T0);
    __m512i v0 = _mm512_loadu_si512(p + k), v1 = _mm512_loadu_si512(p + k + 8);
    acc0 = _mm512_add_epi64(acc0, mix8(_mm512_xor_si512(_mm512_xor_si512(v0, pos0), seed)));
    acc1 = _mm512_add_epi64(acc1, mix8(_mm512_xor_si512(_mm512_xor_si512(v1, pos1), seed)));
    if (m.exp) badv = _mm512_or_si512(badv, _mm512_or_si512(nonfinite8(v0, m), nonfinite8(v1, m)));
    pos0 = _mm512_add_epi64(pos0, step2);
    pos1 = _mm512_add_epi64(pos1, step2);
  }
  for (; k < K; k += 8) {  // the rest, 8 lanes at a time, the last masked
    __mmask8 live = K - k >= 8 ? __mmask8(0xFF) : __mmask8((1u << (K - k)) - 1);
    __m512i v = _mm512_maskz_loadu_epi64(live, p + k);
    __m512i z = mix8(_mm512_xor_si512(_mm512_xor_si512(v, pos0), seed));
    acc0 = _mm512_add_epi64(acc0, _mm512_maskz_mov_epi64(live, z));
    if (m.exp) badv = _mm512_or_si512(badv, _mm512_maskz_mov_epi64(live, nonfinite8(v, m)));
    pos0 = _mm512_add_epi64(pos0, step);
  }
  *bad |= uint64_t(_mm512_reduce_or_epi64(badv));
  return uint64_t(_mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1)));
}

inline bool fast() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512dq"));
  return yes;
}
#else
inline bool fast() { return false; }
#endif

inline uint64_t lanes1(const uint64_t *p, int64_t K, const Masks &m, uint64_t *bad) {
  uint64_t acc = 0;
  for (int64_t k = 0; k < K; k++) {
    uint64_t lane;
    memcpy(&lane, p + k, 8);
    acc += mix(lane ^ (uint64_t(k) * PMUL) ^ SEED);
    if (m.exp) *bad |= nonfinite(lane, m.exp, m.lo, m.hi);
  }
  return acc;
}

// One row's fingerprint; *bad set nonzero where a checked word is NaN/inf.
// a: x's row (aK lanes); b: the scales' row or null (bW words of bBytes, bStride bytes apart).
inline uint64_t row(const char *a, int64_t aK, const Masks &am, const char *b, int64_t bW, int bBytes,
                    int64_t bStride, const Masks &bm, uint64_t n_words, uint64_t *bad) {
  const uint64_t *lanes = reinterpret_cast<const uint64_t *>(a);
#if defined(__x86_64__) || defined(_M_X64)
  uint64_t acc = fast() ? lanes8(lanes, aK, am, bad) : lanes1(lanes, aK, am, bad);
#else
  uint64_t acc = lanes1(lanes, aK, am, bad);
#endif
  if (b) {
    int per = 8 / bBytes;
    for (int64_t k = 0, w = 0; w < bW; k++) {
      uint64_t lane = 0;
      for (int i = 0; i < per && w < bW; i++, w++) {
        uint64_t v = 0;
        memcpy(&v, b + w * bStride, size_t(bBytes));
        lane |= v << (8 * bBytes * i);
      }
      acc += mix(lane ^ (uint64_t(aK + k) * PMUL) ^ SEED);
      if (bm.exp) *bad |= nonfinite(lane, bm.exp, bm.lo, bm.hi);
    }
  }
  return mix(acc ^ n_words ^ SEED2);
}

}  // namespace hosthash
