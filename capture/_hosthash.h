// Fingerprints of host rows inside the compiled hook (_hookx.cpp): version 2 of
// epreplay/format/fingerprint.py, bit for bit, with the non-finite check of the GPU launch.
//
// Why in the hook: at level `fingerprints` the hook used to copy the rows' bytes into the ring for
// the writer to hash (256 KiB a decode dispatch, ~17 us at ~15 GB/s); hashing them here with
// AVX-512 reads them once and writes 9 bytes a row. Only where the CPU has AVX-512DQ and BW (64-bit
// multiplies on 8 lanes, 16-bit word minima): a scalar hash is slower than the copy, so without it the plan keeps
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

// The non-finite check, vectorized: (~lane & exp) has a zero word exactly where a word has all its
// exponent bits set, so the unsigned minimum of those words over the row is zero iff one is
// NaN/inf (one andnot and one min a vector, where the has-zero-word formula took six ops).
template <int W>
__attribute__((target("avx512f,avx512bw"))) inline __m512i min_words(__m512i a, __m512i b) {
  return W == 16 ? _mm512_min_epu16(a, b) : _mm512_min_epu32(a, b);
}
template <int W>
__attribute__((target("avx512f,avx512bw"))) inline bool any_zero_word(__m512i v) {
  return W == 16 ? _mm512_cmpeq_epi16_mask(v, _mm512_setzero_si512()) != 0
                 : _mm512_cmpeq_epi32_mask(v, _mm512_setzero_si512()) != 0;
}

// The rows are read after the call, which has evicted them: asking for the lines 2 KiB ahead keeps
// more misses in flight than the hardware's stream prefetch alone (hook us/call, decode
// fingerprints 16.2-17.3 -> 14.4-14.7, low-latency 83-89 -> 75-78; 1 and 4 KiB ahead: no better).
#ifndef PREFETCH
#define PREFETCH 2048
#endif
// sum_k mix(lane_k ^ k * PMUL ^ SEED) over lanes [0, K) of p; *bad |= 1 where a checked word (W
// bits: 16 or 32; 0 none) is NaN/inf. The loop is bound by the vector ALU ports (the two 64-bit
// multiplies are 3 uops each): v ^ pos ^ seed is one ternary-logic op.
template <int W>
__attribute__((target("avx512f,avx512dq,avx512bw"))) inline uint64_t lanes8w(const uint64_t *p, int64_t K,
                                                                            const Masks &m, uint64_t *bad) {
  const __m512i seed = _mm512_set1_epi64(int64_t(SEED)), step = _mm512_set1_epi64(int64_t(8 * PMUL));
  const __m512i exp = _mm512_set1_epi64(int64_t(m.exp));
  __m512i pos0 = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(int64_t(PMUL)));
  __m512i pos1 = _mm512_add_epi64(pos0, step), step2 = _mm512_add_epi64(step, step);
  __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0, low = _mm512_set1_epi64(-1);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // two independent chains: the multiplies' latency overlaps
    _mm_prefetch(reinterpret_cast<const char *>(p + k) + PREFETCH, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char *>(p + k) + PREFETCH + 64, _MM_HINT_T0);
    __m512i v0 = _mm512_loadu_si512(p + k), v1 = _mm512_loadu_si512(p + k + 8);
    acc0 = _mm512_add_epi64(acc0, mix8(_mm512_ternarylogic_epi64(v0, pos0, seed, 0x96)));
    acc1 = _mm512_add_epi64(acc1, mix8(_mm512_ternarylogic_epi64(v1, pos1, seed, 0x96)));
    if (W) low = min_words<W>(low, min_words<W>(_mm512_andnot_si512(v0, exp), _mm512_andnot_si512(v1, exp)));
    pos0 = _mm512_add_epi64(pos0, step2);
    pos1 = _mm512_add_epi64(pos1, step2);
  }
  for (; k < K; k += 8) {  // the rest, 8 lanes at a time, the last masked (dead lanes: never bad)
    __mmask8 live = K - k >= 8 ? __mmask8(0xFF) : __mmask8((1u << (K - k)) - 1);
    __m512i v = _mm512_maskz_loadu_epi64(live, p + k);
    __m512i z = mix8(_mm512_ternarylogic_epi64(v, pos0, seed, 0x96));
    acc0 = _mm512_add_epi64(acc0, _mm512_maskz_mov_epi64(live, z));
    if (W) low = min_words<W>(low, _mm512_andnot_si512(v, exp));  // dead lanes load 0: ~0 & exp
    pos0 = _mm512_add_epi64(pos0, step);
  }
  if (W && any_zero_word<W>(low)) *bad |= 1;
  return uint64_t(_mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1)));
}

__attribute__((target("avx512f,avx512dq,avx512bw"))) inline uint64_t lanes8(const uint64_t *p, int64_t K,
                                                                           const Masks &m, uint64_t *bad) {
  if (!m.exp) return lanes8w<0>(p, K, m, bad);
  return m.lo == 0x0001000100010001ull ? lanes8w<16>(p, K, m, bad) : lanes8w<32>(p, K, m, bad);
}

inline bool fast() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"));
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
