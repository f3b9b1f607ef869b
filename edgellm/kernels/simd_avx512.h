/* AVX-512 helpers shared by edgellm's kernels (q8_kernel.c, attention.c): header-only, static inline, each
 * compiled with the including function's target attribute. Include only on x86-64. */
#ifndef EDGELLM_SIMD_AVX512_H
#define EDGELLM_SIMD_AVX512_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define EDGELLM_AVX512 __attribute__((target("avx512f,avx512dq")))

/* exp(x) = 2^k * e^r, k = round(x / ln2), r = x - k ln2 (ln2 split in two for accuracy), e^r by its Taylor
 * polynomial to degree 6 on |r| <= ln2/2; scalef applies 2^k and saturates to 0 / inf by itself. */
EDGELLM_AVX512 static inline __m512 edgellm_exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

/* out[j] = the sum of v[j]'s 16 lanes, for j < 16. */
EDGELLM_AVX512 static inline __m512 edgellm_sum16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j) /* 128-bit lanes: [v_j 0+2, v_j 1+3, v_j+8 0+2, v_j+8 1+3] */
    a[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 8], 0x44), _mm512_shuffle_f32x4(v[j], v[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j) /* lanes: rows j, j+8, j+4, j+12, 4 partial sums each */
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 4], 0x88), _mm512_shuffle_f32x4(a[j], a[j + 4], 0xDD));
  for (int j = 0; j < 2; ++j) /* per lane: b[j]'s row in elements 0, 2; b[j+2]'s in 1, 3 */
    c[j] = _mm512_add_ps(_mm512_unpacklo_ps(b[j], b[j + 2]), _mm512_unpackhi_ps(b[j], b[j + 2]));
  const __m512 d = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
  /* d holds rows 0,2,1,3, 8,10,9,11, 4,6,5,7, 12,14,13,15 */
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0), d);
}


/* Bytes ahead of a decode step's weight stream that the packed kernels prefetch (EDGELLM_KERNEL_PREFETCH; "0" turns
 * it off). The default depends on the CPU's maker, as measured on both VM kinds. Intel: 4352 (four 8-bit tile
 * pairs). Its hardware prefetcher stops at every 4 KB boundary and keeps too few lines in flight for one core to read
 * at memory speed: prefetching every line ahead took 0.87-0.90x off a decode step on the Intel VM
 * (benchmarks/kernel_steps_xeon.json, "+ prefetch"), and 4352 was the best of the distances tried
 * (benchmarks/prefetch_distance_xeon.json). AMD: 0. On the AMD EPYC VM (Zen 4) the same prefetch made a decode step
 * 1.07-1.14x slower (benchmarks/kernel_steps.json, "+ prefetch"), and every distance tried was slower for int8
 * (1.07-1.22x, benchmarks/prefetch_distance.json): its own prefetchers keep up, and the extra instructions only
 * cost. Read once per file, at the first call; the pool's threads may make that call together, hence the atomic. */
static inline int64_t edgellm_prefetch_distance(void) {
  static int64_t distance = -1;
  int64_t d = __atomic_load_n(&distance, __ATOMIC_RELAXED);
  if (d < 0) {
    const char* v = getenv("EDGELLM_KERNEL_PREFETCH");
    __builtin_cpu_init();
    const long long parsed = v ? atoll(v) : __builtin_cpu_is("amd") ? 0 : 4352;
    d = parsed > 0 ? (int64_t)parsed : 0;
    __atomic_store_n(&distance, d, __ATOMIC_RELAXED);
  }
  return d;
}

/* Prefetch (into every cache level) the lines of [from, from + bytes) that lie before end: one pair's worth of the
 * stream, issued as its pair is computed, so the loads spread over the step instead of filling the line-fill buffers
 * at once. */
static inline void edgellm_prefetch_lines(const uint8_t* from, size_t bytes, const uint8_t* end) {
  const uintptr_t stop = (uintptr_t)from + bytes < (uintptr_t)end ? (uintptr_t)from + bytes : (uintptr_t)end;
  for (uintptr_t a = (uintptr_t)from & ~(uintptr_t)63; a < stop; a += 64) _mm_prefetch((const char*)a, _MM_HINT_T0);
}

/* The packed matmuls' outer loop (q8_kernel.c, q4_kernel.c), in the caller's scope (scratch, M, P, N, n0, n1, Y):
 * 16-row tiles of TILE_BYTES each; up to 8 activation rows share each weight register when M <= 8 (decode,
 * speculative verify), 4 for prompts (groups of 4 measured ~10% faster there). TILE(row, R, tile, out) computes
 * R rows (a constant, so each case compiles its own register allocation) of one tile, prefetching PF bytes ahead (one
 * row only; a constant 0 compiles a copy without the prefetch, so turning it off gives back the code before it). */
#define EDGELLM_PACKED_TILES(TILE_BYTES, RB, TILE)                                                        \
  const uint8_t* const range_end = P + (size_t)((n1 + 15) / 16) * (TILE_BYTES);                             \
  const int64_t prefetch = M == 1 ? edgellm_prefetch_distance() : 0;                                       \
  for (int64_t t = n0 / 16; t * 16 < n1; ++t) {                                                            \
    const uint8_t* tile = P + (size_t)t * (TILE_BYTES);                                                    \
    const int64_t n = t * 16;                                                                               \
    const __mmask16 keep = n + 16 <= N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);           \
    const int64_t group = M <= 8 ? 8 : 4;                                                                   \
    for (int64_t m = 0; m < M; m += group) {                                                                \
      __m512 out[8];                                                                                        \
      const uint8_t* row = scratch + m * (RB);                                                              \
      const int64_t R = M - m < group ? M - m : group;                                                      \
      switch (R) {                                                                                          \
        case 1:                                                                                             \
          if (prefetch) TILE(row, 1, tile, out, prefetch);                                                  \
          else TILE(row, 1, tile, out, 0); /* its own copy, compiled without the prefetch */               \
          break;                                                                                            \
        case 2: TILE(row, 2, tile, out, 0); break;                                                          \
        case 3: TILE(row, 3, tile, out, 0); break;                                                          \
        case 4: TILE(row, 4, tile, out, 0); break;                                                          \
        case 5: TILE(row, 5, tile, out, 0); break;                                                          \
        case 6: TILE(row, 6, tile, out, 0); break;                                                          \
        case 7: TILE(row, 7, tile, out, 0); break;                                                          \
        default: TILE(row, 8, tile, out, 0); break;                                                         \
      }                                                                                                     \
      for (int64_t r = 0; r < R; ++r) _mm512_mask_storeu_ps(Y + (m + r) * N + n, keep, out[r]);            \
    }                                                                                                       \
  }

#endif
