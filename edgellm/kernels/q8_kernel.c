/* edgellm's int8 block matmul (see q8_kernel.h). Written by hand because onnxruntime 1.32's MatMulNBits
 * reaches 14-19 GB/s on our decode shapes (K 576/1536, N 576-3072) where one core reads 31 GB/s: decoding
 * is a stream of weights, and this kernel's whole job is to keep that stream at memory speed.
 *
 * Paths, chosen at run time (never -march=native: the CPU changes between machines):
 *   avx512vnni  constant weights packed at load into 16-row tiles (PACK_PAIR below): one vpdpbusd with a
 *               broadcast activation dword serves 16 rows. Weights fed at run time: vpdpbusd on 2 blocks of
 *               one row per 512-bit register. The -128 zero point is folded into the accumulator's start
 *               value, precomputed once per activation row;
 *   avx2        the uint8 weight becomes int8 (xor 0x80) and vpmaddubsw runs on |w| and sign(a, w);
 *   scalar      the reference, also for non-x86 builds.
 */
#include "q8_kernel.h"

#include "scratch_layout.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EDGELLM_X86 1
#include <immintrin.h>

#include "simd_avx512.h"
#endif

/* The scratch layout: scratch_layout.h. */
static int64_t pairs_of(int64_t K) { return edgellm_pairs_of(K); }
#define PACK_PAIR 1088 /* bytes per pair of 32-blocks in a packed 16-row tile: 2 x 512 weights + 2 x 16 fp16 scales */
static size_t row_bytes(int64_t K) { return edgellm_row_bytes(K); }

static void fill_block_sums(uint8_t* row, int64_t K) {
  const int64_t np = pairs_of(K);
  const int32_t* corr = (const int32_t*)(row + np * 64);
  const float* sa = (const float*)(row + np * 128);
  int32_t* cb = (int32_t*)(row + np * 192);
  float* sb = (float*)(row + np * 192 + np * 8);
  for (int64_t b = 0; b < 2 * np; ++b) {
    int32_t c = 0;
    for (int l = 0; l < 8; ++l) c += corr[(b / 2) * 16 + (b % 2) * 8 + l];
    cb[b] = c;
    sb[b] = sa[(b / 2) * 16 + (b % 2) * 8];
  }
}

size_t edgellm_q8_scratch_bytes(int64_t M, int64_t K) { return (size_t)M * row_bytes(K); }

static void quantize_row(const float* a, int64_t K, uint8_t* out) {
  const int64_t np = pairs_of(K), nb = K / 32;
  int8_t* q = (int8_t*)out;
  int32_t* corr = (int32_t*)(out + np * 64);
  float* sa = (float*)(out + np * 128);
  memset(out, 0, (size_t)np * 192);
  for (int64_t b = 0; b < nb; ++b) {
    float amax = 0.0f;
    for (int k = 0; k < 32; ++k) amax = fmaxf(amax, fabsf(a[b * 32 + k]));
    const float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int k = 0; k < 32; ++k) q[b * 32 + k] = (int8_t)nearbyintf(a[b * 32 + k] * inv);
    for (int k = 0; k < 8; ++k) sa[(b / 2) * 16 + (b % 2) * 8 + k] = scale;
  }
  for (int64_t i = 0; i < np * 16; ++i)
    corr[i] = -128 * ((int32_t)q[4 * i] + q[4 * i + 1] + q[4 * i + 2] + q[4 * i + 3]);
}


/* Block b's int8 values q and scale into a scratch row laid out as quantize_row's (corr, sa; block sums after). */
static void store_block(uint8_t* out, int64_t K, int64_t b, const int8_t q[32], float scale) {
  const int64_t np = pairs_of(K);
  int32_t* corr = (int32_t*)(out + np * 64);
  float* sa = (float*)(out + np * 128);
  memcpy(out + b * 32, q, 32);
  for (int i = 0; i < 8; ++i) corr[b * 8 + i] = -128 * ((int32_t)q[4 * i] + q[4 * i + 1] + q[4 * i + 2] + q[4 * i + 3]);
  for (int k = 0; k < 8; ++k) sa[(b / 2) * 16 + (b % 2) * 8 + k] = scale;
}

void edgellm_q8_quantize_split(const float* A, int64_t M, int64_t K, void* scratch) {
  const int64_t nb = K / 32, np = pairs_of(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    uint8_t* high = (uint8_t*)scratch + 2 * m * row_bytes(K);
    uint8_t* low = high + row_bytes(K);
    memset(high, 0, (size_t)np * 192);
    memset(low, 0, (size_t)np * 192);
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.0f;
      for (int k = 0; k < 32; ++k) amax = fmaxf(amax, fabsf(a[b * 32 + k]));
      const float scale = amax / 16383.0f, inv = amax > 0.0f ? 16383.0f / amax : 0.0f;
      int8_t hi[32], lo[32];
      for (int k = 0; k < 32; ++k) {
        const int32_t v = (int32_t)nearbyintf(a[b * 32 + k] * inv), h = (v + 128) >> 8; /* h in -64..64 */
        hi[k] = (int8_t)h;
        lo[k] = (int8_t)(v - 256 * h); /* -128..127 */
      }
      store_block(high, K, b, hi, 256.0f * scale);
      store_block(low, K, b, lo, scale);
    }
    fill_block_sums(high, K);
    fill_block_sums(low, K);
  }
}

static float half_to_float(uint16_t h) { return edgellm_half_to_float(h); }

static float block_scale(const float* sa, int64_t b) { return sa[(b / 2) * 16 + (b % 2) * 8]; }

static void matmul_scalar(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* B, const uint16_t* scales,
                          int64_t N, int64_t n0, int64_t n1, float* Y) {
  const int64_t nb = K / 32, np = pairs_of(K);
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* row = scratch + m * row_bytes(K);
    const int8_t* q = (const int8_t*)row;
    const float* sa = (const float*)(row + np * 128);
    for (int64_t n = n0; n < n1; ++n) {
      float y = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t d = 0;
        for (int k = 0; k < 32; ++k) d += ((int32_t)B[n * K + b * 32 + k] - 128) * q[b * 32 + k];
        y += (float)d * half_to_float(scales[n * nb + b]) * block_scale(sa, b);
      }
      Y[m * N + n] = y;
    }
  }
}

#ifdef EDGELLM_X86
#ifndef TILE_MIN_M
#define TILE_MIN_M 5 /* on MatMulNBits' layout (EDGELLM_KERNEL_PACK=0, or weights fed at run time), from this many
                      * activation rows on the tile kernel is faster (1 thread: M=2, 3 the row kernel 2.2x, 1.6x;
                      * M=4 about even; M=38 the tile kernel 4x) */
#endif
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c")))

VNNI_TARGET static inline __m512 pair_scales(const uint16_t* s, int64_t p, const __m512i halves) {
  /* lanes 0-7: s[2p], lanes 8-15: s[2p+1] */
  int32_t bits;
  memcpy(&bits, s + 2 * p, sizeof bits);
  const __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two));
}


/* One activation row into the scratch layout, 2 blocks (one pair) per step. */
VNNI_TARGET static void quantize_row_vnni(const float* a, int64_t K, uint8_t* out) {
  const int64_t np = pairs_of(K), nb = K / 32;
  const __m512i ones = _mm512_set1_epi8(1), m128 = _mm512_set1_epi32(-128);
  for (int64_t p = 0; p < np; ++p) {
    float scale2[2] = {0.0f, 0.0f};
    __m128i qb[4];
    for (int h = 0; h < 2; ++h) {
      const int64_t b = 2 * p + h;
      if (b >= nb) { qb[2 * h] = qb[2 * h + 1] = _mm_setzero_si128(); continue; }
      const __m512 v0 = _mm512_loadu_ps(a + 32 * b), v1 = _mm512_loadu_ps(a + 32 * b + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      scale2[h] = amax / 127.0f;
      const __m512 vi = _mm512_set1_ps(inv);
      qb[2 * h] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vi)));
      qb[2 * h + 1] = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vi)));
    }
    const __m512i q = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(
        _mm512_castsi128_si512(qb[0]), qb[1], 1), qb[2], 2), qb[3], 3);
    _mm512_storeu_si512(out + 64 * p, q);
    _mm512_storeu_si512(out + np * 64 + 64 * p, _mm512_mullo_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q), m128));
    _mm512_storeu_ps((float*)(out + np * 128) + 16 * p,
                     _mm512_insertf32x8(_mm512_set1_ps(scale2[0]), _mm256_set1_ps(scale2[1]), 1));
  }
}

/* Decoding (M small): one weight row at a time, so the weights are read as one sequential stream that the
 * hardware prefetcher follows (interleaving 4 rows halved the bandwidth); two pairs per step for ILP.
 * row_dot leaves the 16 partial sums of Y[m, n] in a register; for M = 1, 16 rows' registers are summed
 * together by a transpose tree (~3 instructions a row instead of ~9 for a reduction each: perf showed the
 * per-row reductions at ~12% of decode time). */
VNNI_TARGET static inline __m512 row_dot(const uint8_t* row, int64_t np, int64_t nb, const uint8_t* w,
                                         const uint16_t* s, const __m512i halves) {
  const int64_t full = nb / 2;
  const uint8_t* q = row;
  const uint8_t* corr = row + np * 64;
  const float* sa = (const float*)(row + np * 128);
  __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 2 <= full; p += 2) {
    const __m512i d0 = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + 64 * p), _mm512_loadu_si512(w + 64 * p),
                                           _mm512_loadu_si512(q + 64 * p));
    const __m512i d1 = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + 64 * p + 64),
                                           _mm512_loadu_si512(w + 64 * p + 64), _mm512_loadu_si512(q + 64 * p + 64));
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(pair_scales(s, p, halves), _mm512_loadu_ps(sa + 16 * p)), f0);
    f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1),
                         _mm512_mul_ps(pair_scales(s, p + 1, halves), _mm512_loadu_ps(sa + 16 * p + 16)), f1);
  }
  for (; p < full; ++p) {
    const __m512i d0 = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + 64 * p), _mm512_loadu_si512(w + 64 * p),
                                           _mm512_loadu_si512(q + 64 * p));
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(pair_scales(s, p, halves), _mm512_loadu_ps(sa + 16 * p)), f0);
  }
  if (nb & 1) { /* the last block alone: the upper half of q, corr and sa is zero in the scratch */
    const __m512i d0 = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + 64 * p), _mm512_maskz_loadu_epi8(0xFFFFFFFFull, w + 64 * p),
                                           _mm512_loadu_si512(q + 64 * p));
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(s[2 * p])), _mm512_loadu_ps(sa + 16 * p)), f0);
  }
  return _mm512_add_ps(f0, f1);
}

VNNI_TARGET static void matmul_vnni_row(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* B,
                                        const uint16_t* scales, int64_t N, int64_t n0, int64_t n1, float* Y) {
  const int64_t nb = K / 32, np = pairs_of(K);
  const size_t rb = row_bytes(K);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  int64_t n = n0;
  if (M == 1) {
    __m512 v[16];
    for (; n + 16 <= n1; n += 16) {
      for (int j = 0; j < 16; ++j) v[j] = row_dot(scratch, np, nb, B + (n + j) * K, scales + (n + j) * nb, halves);
      _mm512_storeu_ps(Y + n, edgellm_sum16(v));
    }
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m)
      Y[m * N + n] = _mm512_reduce_add_ps(row_dot(scratch + m * rb, np, nb, B + n * K, scales + n * nb, halves));
}

/* Prompts (M > 1) are compute-bound, so the 16 rows of a tile are gathered into 8 registers whose lane j holds
 * row n+j's 4 bytes: one vpdpbusd with a broadcast activation dword then serves 16 outputs (the row kernel
 * serves one). Two chains per activation row and 4 rows at a time hide vpdpbusd's latency. */

/* W[g] lane j = dword g of the 32 bytes at w + j*K (j < 16): a 16x8 -> 8x16 dword transpose done as two 8x8
 * transposes, rows j and j+8 sharing a register. */
VNNI_TARGET static inline void transpose_tile(const uint8_t* w, int64_t K, __m512i W[8]) {
  __m512i r[8], t[8], u[8];
  for (int j = 0; j < 8; ++j)
    r[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(w + j * K))),
                              _mm256_loadu_si256((const __m256i*)(w + (j + 8) * K)), 1);
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    u[h] = _mm512_unpacklo_epi64(t[h], t[h + 2]);
    u[h + 1] = _mm512_unpackhi_epi64(t[h], t[h + 2]);
    u[h + 2] = _mm512_unpacklo_epi64(t[h + 1], t[h + 3]);
    u[h + 3] = _mm512_unpackhi_epi64(t[h + 1], t[h + 3]);
  }
  /* u[c] (c < 4) holds column c (128-bit lanes 0, 2) and c+4 (lanes 1, 3) of rows 0-3 / 8-11; u[c+4] rows 4-7 / 12-15 */
  const __m512i lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
  for (int c = 0; c < 4; ++c) {
    W[c] = _mm512_permutex2var_epi64(u[c], lo, u[c + 4]);
    W[c + 4] = _mm512_permutex2var_epi64(u[c], hi, u[c + 4]);
  }
}

#define TILE_M 4 /* activation rows per register block: 4 beat 6 and 8 on the prompt shapes */
VNNI_TARGET static void matmul_vnni_tiles(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* B,
                                          const uint16_t* scales, int64_t N, int64_t n0, int64_t n1, float* Y) {
  const int64_t nb = K / 32, np = pairs_of(K);
  const size_t rb = row_bytes(K);
  int32_t* cb = (int32_t*)malloc(sizeof(int32_t) * M * nb);
  float* sb = (float*)malloc(sizeof(float) * M * nb);
  float* acc = (float*)aligned_alloc(64, sizeof(float) * 16 * ((M + TILE_M - 1) / TILE_M * TILE_M));
  float* swt = (float*)aligned_alloc(64, sizeof(float) * 16 * nb);
  float* swf = (float*)malloc(sizeof(float) * 16 * nb);
  if (!cb || !sb || !acc || !swt || !swf) { free(cb); free(sb); free(acc); free(swt); free(swf); matmul_vnni_row(scratch, M, K, B, scales, N, n0, n1, Y); return; }
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* row = scratch + m * rb;
    const int32_t* corr = (const int32_t*)(row + np * 64);
    const float* sa = (const float*)(row + np * 128);
    for (int64_t b = 0; b < nb; ++b) {
      int32_t c = 0;
      for (int l = 0; l < 8; ++l) c += corr[(b / 2) * 16 + (b % 2) * 8 + l];
      cb[m * nb + b] = c;
      sb[m * nb + b] = block_scale(sa, b);
    }
  }
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    const uint8_t* w = B + n * K;
    memset(acc, 0, sizeof(float) * 16 * M);
    { /* the tile's 16 x nb fp16 scales are contiguous: convert them 16 at a time, then lay them out by block */
      const uint16_t* src = scales + n * nb;
      int64_t i = 0;
      for (; i + 16 <= 16 * nb; i += 16)
        _mm512_storeu_ps(swf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
      for (; i < 16 * nb; ++i) swf[i] = _cvtsh_ss(src[i]);
      for (int j = 0; j < 16; ++j)
        for (int64_t b = 0; b < nb; ++b) swt[16 * b + j] = swf[j * nb + b];
    }
    for (int64_t b = 0; b < nb; ++b) {
      if (!(b & 1) && n + 32 <= n1) /* the next tile's rows, a line per row every other block */
        for (int j = 0; j < 16; ++j) _mm_prefetch((const char*)(w + (16 + j) * K + b * 32), _MM_HINT_T0);
      __m512i W[8];
      transpose_tile(w + b * 32, K, W);
      const __m512 sw = _mm512_load_ps(swt + 16 * b);
      int64_t m = 0;
      for (; m + TILE_M <= M; m += TILE_M) {
        __m512i d[TILE_M][2];
        for (int t = 0; t < TILE_M; ++t) {
          d[t][0] = _mm512_set1_epi32(cb[(m + t) * nb + b]);
          d[t][1] = _mm512_setzero_si512();
        }
        for (int g = 0; g < 8; g += 2)
          for (int t = 0; t < TILE_M; ++t) {
            const int32_t* a = (const int32_t*)(scratch + (m + t) * rb + b * 32 + 4 * g);
            d[t][0] = _mm512_dpbusd_epi32(d[t][0], W[g], _mm512_set1_epi32(a[0]));
            d[t][1] = _mm512_dpbusd_epi32(d[t][1], W[g + 1], _mm512_set1_epi32(a[1]));
          }
        for (int t = 0; t < TILE_M; ++t) {
          float* f = acc + (m + t) * 16;
          const __m512 s = _mm512_mul_ps(sw, _mm512_set1_ps(sb[(m + t) * nb + b]));
          _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d[t][0], d[t][1])), s,
                                             _mm512_load_ps(f)));
        }
      }
      for (; m < M; ++m) {
        __m512i d0 = _mm512_set1_epi32(cb[m * nb + b]), d1 = _mm512_setzero_si512();
        const int32_t* a = (const int32_t*)(scratch + m * rb + b * 32);
        for (int g = 0; g < 8; g += 2) {
          d0 = _mm512_dpbusd_epi32(d0, W[g], _mm512_set1_epi32(a[g]));
          d1 = _mm512_dpbusd_epi32(d1, W[g + 1], _mm512_set1_epi32(a[g + 1]));
        }
        float* f = acc + m * 16;
        const __m512 s = _mm512_mul_ps(sw, _mm512_set1_ps(sb[m * nb + b]));
        _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), s, _mm512_load_ps(f)));
      }
    }
    for (int64_t m = 0; m < M; ++m) _mm512_storeu_ps(Y + m * N + n, _mm512_load_ps(acc + m * 16));
  }
  free(cb);
  free(sb);
  free(acc);
  free(swt);
  free(swf);
  if (n < n1) matmul_vnni_row(scratch, M, K, B, scales, N, n, n1, Y);
}

/* The packed layout (edgellm_q8_pack): weight rows in tiles of 16, and per tile, per pair of 32-blocks,
 * [W_b | W_b+1 | S_b | S_b+1] = PACK_PAIR bytes. W_b is 8 registers whose lane j holds dword g of row j's
 * block b (the tile kernel's transposed tile, done once at load instead of at every call), S_b the 16 rows'
 * fp16 scales of block b. One vpdpbusd with a broadcast activation dword then serves 16 rows, so a decode step
 * runs ~2.5 instructions per 64 weight bytes instead of the row kernel's ~10, and the scales travel inline:
 * kept in a separate region at the tile's end they made a second stream that cut the read rate by 40%.
 * A padded row (past N) or block (past K/32) has weights 128 (zero) and scale 0. */
/* R activation rows (rb apart in the scratch) against one packed tile: out[r] = the tile's 16 outputs of row r. */
VNNI_TARGET static inline __attribute__((always_inline)) void packed_tile(const uint8_t* row0, size_t rb, int64_t np,
                                                                       const uint8_t* tile, const int R, __m512 out[8],
                                                                       int64_t prefetch, const uint8_t* end) {
  __m512 acc[8];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const int32_t* cb = (const int32_t*)(row0 + np * 192);
  const float* sb = (const float*)(row0 + np * 192 + np * 8);
  for (int64_t p = 0; p < np; ++p) {
    const uint8_t* w = tile + p * PACK_PAIR;
    const uint16_t* s = (const uint16_t*)(w + 1024);
    if (R == 1 && prefetch) edgellm_prefetch_lines(w + prefetch, PACK_PAIR, end);
    for (int h = 0; h < 2; ++h) {
      const int64_t b = 2 * p + h;
      __m512i d[8][2];
      for (int r = 0; r < R; ++r) {
        d[r][0] = _mm512_set1_epi32(*(const int32_t*)((const uint8_t*)(cb + b) + r * rb));
        d[r][1] = _mm512_setzero_si512();
      }
      for (int g = 0; g < 8; g += 2) {
        const __m512i w0 = _mm512_load_si512(w + h * 512 + g * 64), w1 = _mm512_load_si512(w + h * 512 + g * 64 + 64);
        for (int r = 0; r < R; ++r) {
          const int32_t* a = (const int32_t*)(row0 + r * rb + 32 * b);
          d[r][0] = _mm512_dpbusd_epi32(d[r][0], w0, _mm512_set1_epi32(a[g]));
          d[r][1] = _mm512_dpbusd_epi32(d[r][1], w1, _mm512_set1_epi32(a[g + 1]));
        }
      }
      const __m512 sw = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(s + 16 * h)));
      for (int r = 0; r < R; ++r) {
        const float sa = *(const float*)((const uint8_t*)(sb + b) + r * rb);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d[r][0], d[r][1])),
                                 _mm512_mul_ps(sw, _mm512_set1_ps(sa)), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

/* Up to 8 activation rows share each weight register (2 chains each + 2 weights + 8 sums fit 32 registers), so a
 * speculative verify pass of up to 7 drafts reads the weights once. Longer prompts are compute-bound, and there
 * groups of 4 measured ~10% faster than groups of 8 (M = 38, 1 and 2 threads, development measurement). A tile
 * (16 rows x K bytes, <= ~50 KB) stays in L1/L2 between groups. */
VNNI_TARGET static void matmul_packed_vnni(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* P, int64_t N,
                                           int64_t n0, int64_t n1, float* Y) {
  const int64_t np = pairs_of(K);
  const size_t rb = row_bytes(K);
#define Q8_TILE(row, R, tile, out, PF) packed_tile(row, rb, np, tile, R, out, PF, range_end)
  EDGELLM_PACKED_TILES((size_t)np * PACK_PAIR, rb, Q8_TILE)
#undef Q8_TILE
}

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET static void matmul_avx2(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* B,
                                    const uint16_t* scales, int64_t N, int64_t n0, int64_t n1, float* Y) {
  const int64_t nb = K / 32, np = pairs_of(K);
  const size_t rb = row_bytes(K);
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = B + n * K;
    const uint16_t* s = scales + n * nb;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* row = scratch + m * rb;
      const float* sa = (const float*)(row + np * 128);
      __m256 f = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 32 * b)), flip);
        const __m256i a = _mm256_loadu_si256((const __m256i*)(row + 32 * b));
        const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(a, wq));
        const __m256i d = _mm256_madd_epi16(prod, ones);
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(_cvtsh_ss(s[b]) * block_scale(sa, b)), f);
      }
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      Y[m * N + n] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
    }
  }
}
#endif

typedef void (*matmul_fn)(const uint8_t*, int64_t, int64_t, const uint8_t*, const uint16_t*, int64_t, int64_t,
                          int64_t, float*);

static int chosen_isa(void) { /* 2 avx512vnni, 1 avx2, 0 scalar; EDGELLM_Q8_ISA may only lower it */
  static int isa = -1;
  if (isa >= 0) return isa;
  int best = 0;
#ifdef EDGELLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) best = 1;
  if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    best = 2;
#endif
  const char* forced = getenv("EDGELLM_Q8_ISA");
  if (forced && strcmp(forced, "scalar") == 0) best = 0;
  else if (forced && strcmp(forced, "avx2") == 0 && best > 1) best = 1;
  isa = best;
  return isa;
}

void edgellm_q8_quantize(const float* A, int64_t M, int64_t K, void* scratch) {
  void (*fn)(const float*, int64_t, uint8_t*) = quantize_row;
#ifdef EDGELLM_X86
  if (chosen_isa() == 2) fn = quantize_row_vnni;
#endif
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* row = (uint8_t*)scratch + m * row_bytes(K);
    fn(A + m * K, K, row);
    fill_block_sums(row, K);
  }
}


static void silu_mul_scalar(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

#ifdef EDGELLM_X86
EDGELLM_AVX512 static void silu_mul_avx512(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = edgellm_exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
  }
  silu_mul_scalar(g + i, u + i, out + i, n - i);
}
#endif

void edgellm_silu_mul(const float* gate, const float* up, float* out, int64_t n) {
#ifdef EDGELLM_X86
  if (chosen_isa() == 2) {
    silu_mul_avx512(gate, up, out, n);
    return;
  }
#endif
  silu_mul_scalar(gate, up, out, n);
}

void edgellm_rms_norm(const float* x, const float* gamma, float eps, float* out, int64_t n) {
  float sum = 0.0f;  /* 8 partial sums let the compiler vectorize without -ffast-math reassociation */
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += x[i + j] * x[i + j];
  for (; i < n; ++i) sum += x[i] * x[i];
  for (int j = 0; j < 8; ++j) sum += part[j];
  const float inv = 1.0f / sqrtf(sum / (float)n + eps);
  for (i = 0; i < n; ++i) out[i] = x[i] * inv * gamma[i];
}

const char* edgellm_q8_isa(void) {
  static const char* names[] = {"scalar", "avx2", "avx512vnni"};
  return names[chosen_isa()];
}

int64_t edgellm_kernel_prefetch(void) {
#ifdef EDGELLM_X86
  return edgellm_q8_packed() ? edgellm_prefetch_distance() : 0;
#else
  return 0;
#endif
}

void edgellm_q8_matmul(const void* scratch, int64_t M, int64_t K, const uint8_t* B, const uint16_t* scales,
                       int64_t N, int64_t n_begin, int64_t n_end, float* Y) {
  matmul_fn fn = matmul_scalar;
#ifdef EDGELLM_X86
  const int isa = chosen_isa();
  if (isa == 2) fn = M >= TILE_MIN_M ? matmul_vnni_tiles : matmul_vnni_row;
  else if (isa == 1) fn = matmul_avx2;
#endif
  fn((const uint8_t*)scratch, M, K, B, scales, N, n_begin, n_end, Y);
}

int edgellm_q8_packed(void) {
#ifdef EDGELLM_X86
  static int packed = -1;
  if (packed < 0) {
    const char* v = getenv("EDGELLM_KERNEL_PACK"); /* "0": keep MatMulNBits' layout (to measure what packing buys) */
    packed = chosen_isa() == 2 && !(v && strcmp(v, "0") == 0);
  }
  return packed;
#else
  return 0;
#endif
}

size_t edgellm_q8_packed_bytes(int64_t N, int64_t K) { return (size_t)((N + 15) / 16) * (size_t)pairs_of(K) * PACK_PAIR; }

void edgellm_q8_pack(const uint8_t* B, const uint16_t* scales, int64_t N, int64_t K, void* out) {
  const int64_t nb = K / 32, np = pairs_of(K);
  uint8_t* P = (uint8_t*)out;
  for (int64_t t = 0; t * 16 < N; ++t)
    for (int64_t p = 0; p < np; ++p) {
      uint8_t* o = P + ((size_t)t * (size_t)np + (size_t)p) * PACK_PAIR;
      uint16_t* s = (uint16_t*)(o + 1024);
      for (int h = 0; h < 2; ++h) {
        const int64_t b = 2 * p + h;
        for (int j = 0; j < 16; ++j) {
          const int64_t n = t * 16 + j;
          const int real = n < N && b < nb;
          for (int g = 0; g < 8; ++g) {
            if (real) memcpy(o + h * 512 + g * 64 + j * 4, B + n * K + b * 32 + 4 * g, 4);
            else memset(o + h * 512 + g * 64 + j * 4, 128, 4);
          }
          s[16 * h + j] = real ? scales[n * nb + b] : 0;
        }
      }
    }
}

void edgellm_q8_matmul_packed(const void* scratch, int64_t M, int64_t K, const void* packed, int64_t N,
                              int64_t n_begin, int64_t n_end, float* Y) {
#ifdef EDGELLM_X86
  if (chosen_isa() == 2) matmul_packed_vnni((const uint8_t*)scratch, M, K, (const uint8_t*)packed, N, n_begin, n_end, Y);
#else
  (void)scratch; (void)M; (void)K; (void)packed; (void)N; (void)n_begin; (void)n_end; (void)Y;
#endif
}
