/* edgellm's 4-bit block matmul (see q4_kernel.h). Hand-written for the same reason as q8_kernel.c: decoding
 * streams the weights, and onnxruntime has no fast kernel for blocks with a float minimum (its MatMulNBits with
 * float zero points measured 28-57x slower than with uint4 ones, benchmarks/matmul_kernels.json).
 *
 * Per block, with the activations quantized per 32-block to int16 a (scale sa, sum S = sum of a):
 *   sum_k (d q_k + mn) (sa a_k) = sa d (sum_k q_k a_k) + sa mn S
 * and a = 256 hi + lo (hi signed, lo unsigned bytes), so vpdpbusd takes lo (unsigned) against the nibbles (as
 * signed bytes, 0..15) and the nibbles (unsigned) against hi; the minimum costs one multiply-add per block. */
#include "q4_kernel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "q8_kernel.h"
#include "scratch_layout.h"

#if defined(__x86_64__) || defined(_M_X64)
#define EDGELLM_X86 1
#include <immintrin.h>

#include "simd_avx512.h"
#endif

/* The scratch, per activation row: uint8 lo[np*64] | int8 hi[np*64] | int32 sum[2np] | float scale[2np], np = pairs of
 * 32-blocks (zero past the last block), the row padded to 64 bytes. */
static int64_t pairs_of(int64_t K) { return edgellm_pairs_of(K); }
static size_t row16_bytes(int64_t K) { return ((size_t)pairs_of(K) * 144 + 63) / 64 * 64; }
static const int32_t* sums_of(const uint8_t* row, int64_t K) { return (const int32_t*)(row + pairs_of(K) * 128); }
static const float* scales_of(const uint8_t* row, int64_t K) {
  return (const float*)(row + pairs_of(K) * 128 + pairs_of(K) * 8);
}

size_t edgellm_q4_scratch_bytes(int64_t M, int64_t K) { return (size_t)M * row16_bytes(K); }

static void quantize16_row(const float* x, int64_t K, uint8_t* out) {
  const int64_t np = pairs_of(K), nb = K / 32;
  uint8_t* lo = out;
  int8_t* hi = (int8_t*)(out + np * 64);
  int32_t* sum = (int32_t*)(out + np * 128);
  float* scale = (float*)(out + np * 128 + np * 8);
  memset(out, 0, row16_bytes(K));
  for (int64_t b = 0; b < nb; ++b) {
    float amax = 0.0f;
    for (int k = 0; k < 32; ++k) amax = fmaxf(amax, fabsf(x[b * 32 + k]));
    const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
    int32_t s = 0;
    for (int k = 0; k < 32; ++k) {
      const int32_t a = (int32_t)nearbyintf(x[b * 32 + k] * inv);
      lo[b * 32 + k] = (uint8_t)(a & 0xFF);
      hi[b * 32 + k] = (int8_t)(a >> 8);
      s += a;
    }
    sum[b] = s;
    scale[b] = amax / 32767.0f;
  }
}

#define PACK4_PAIR 640 /* bytes per pair of 32-blocks in a packed 16-row tile: 2 x 256 nibbles + 2 x (16 d + 16 mn) */

void edgellm_q4_matmul(const void* scratch, int64_t M, int64_t K, const uint8_t* B, const uint16_t* dm, int64_t N,
                       int64_t n0, int64_t n1, float* Y) {
  const int64_t nb = K / 32, np = pairs_of(K);
  const size_t rb = row16_bytes(K);
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* row = (const uint8_t*)scratch + m * rb;
    const uint8_t* lo = row;
    const int8_t* hi = (const int8_t*)(row + np * 64);
    const int32_t* sum = sums_of(row, K);
    const float* sb = scales_of(row, K);
    for (int64_t n = n0; n < n1; ++n) {
      float y = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* q = B + (n * nb + b) * 16;
        int32_t dot = 0;
        for (int i = 0; i < 32; ++i) {
          const int32_t w = i < 16 ? (q[i] & 0x0F) : (q[i - 16] >> 4);
          dot += w * (256 * (int32_t)hi[b * 32 + i] + (int32_t)lo[b * 32 + i]);
        }
        const float d = edgellm_half_to_float(dm[2 * (n * nb + b)]), mn = edgellm_half_to_float(dm[2 * (n * nb + b) + 1]);
        y += (float)dot * (d * sb[b]) + mn * (sb[b] * (float)sum[b]);
      }
      Y[m * N + n] = y;
    }
  }
}

size_t edgellm_q4_packed_bytes(int64_t N, int64_t K) {
  return (size_t)((N + 15) / 16) * (size_t)edgellm_pairs_of(K) * PACK4_PAIR;
}

/* The packed layout: weight rows in tiles of 16, and per tile, per pair of 32-blocks,
 * [Q_b | Q_b+1 | D_b M_b | D_b+1 M_b+1] = PACK4_PAIR bytes. Q_b is 4 registers: lane j of register g holds bytes
 * 4g..4g+3 of row j's block b, so its low nibbles are weights 4g..4g+3 (against activation dword g) and its high
 * nibbles weights 16+4g..16+4g+3 (against dword 4+g). D_b and M_b are the 16 rows' fp16 d and mn. A padded row
 * (past N) or block (past K/32) has d = mn = 0. */
void edgellm_q4_pack(const uint8_t* B, const uint16_t* dm, int64_t N, int64_t K, void* out) {
  const int64_t nb = K / 32, np = edgellm_pairs_of(K);
  uint8_t* P = (uint8_t*)out;
  for (int64_t t = 0; t * 16 < N; ++t)
    for (int64_t p = 0; p < np; ++p) {
      uint8_t* o = P + ((size_t)t * (size_t)np + (size_t)p) * PACK4_PAIR;
      for (int h = 0; h < 2; ++h) {
        const int64_t b = 2 * p + h;
        uint16_t* s = (uint16_t*)(o + 512 + 64 * h);
        for (int j = 0; j < 16; ++j) {
          const int64_t n = t * 16 + j;
          const int real = n < N && b < nb;
          for (int g = 0; g < 4; ++g) {
            if (real) memcpy(o + h * 256 + g * 64 + j * 4, B + (n * nb + b) * 16 + 4 * g, 4);
            else memset(o + h * 256 + g * 64 + j * 4, 0, 4);
          }
          s[j] = real ? dm[2 * (n * nb + b)] : 0;
          s[16 + j] = real ? dm[2 * (n * nb + b) + 1] : 0;
        }
      }
    }
}

#ifdef EDGELLM_X86
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c")))

/* R activation rows (rb apart in the scratch) against one packed tile: out[r] = the tile's 16 outputs of row r.
 * As q8_kernel.c's packed_tile: one vpdpbusd with a broadcast activation dword serves 16 rows; here each weight
 * register serves two dwords (its low and high nibbles). */
VNNI_TARGET static inline __attribute__((always_inline)) void packed_tile4(const uint8_t* row0, size_t rb, int64_t K,
                                                                        const uint8_t* tile, const int R, __m512 out[8],
                                                                        int64_t prefetch, const uint8_t* end) {
  const int64_t np = pairs_of(K);
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int32_t* sum = sums_of(row0, K);
  const float* sb = scales_of(row0, K);
  __m512 acc[8];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < np; ++p) {
    const uint8_t* w = tile + p * PACK4_PAIR;
    if (R == 1 && prefetch) edgellm_prefetch_lines(w + prefetch, PACK4_PAIR, end);
    for (int h = 0; h < 2; ++h) {
      const int64_t b = 2 * p + h;
      __m512i d[8][2]; /* [r][0]: nibbles x low bytes, [r][1]: nibbles x high bytes */
      for (int r = 0; r < R; ++r) d[r][0] = d[r][1] = _mm512_setzero_si512();
      for (int g = 0; g < 4; ++g) {
        const __m512i q = _mm512_load_si512(w + h * 256 + g * 64);
        const __m512i qlo = _mm512_and_si512(q, low), qhi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t* alo = (const int32_t*)(row0 + r * rb + 32 * b);
          const int32_t* ahi = (const int32_t*)(row0 + r * rb + np * 64 + 32 * b);
          d[r][0] = _mm512_dpbusd_epi32(d[r][0], _mm512_set1_epi32(alo[g]), qlo);
          d[r][1] = _mm512_dpbusd_epi32(d[r][1], qlo, _mm512_set1_epi32(ahi[g]));
          d[r][0] = _mm512_dpbusd_epi32(d[r][0], _mm512_set1_epi32(alo[4 + g]), qhi);
          d[r][1] = _mm512_dpbusd_epi32(d[r][1], qhi, _mm512_set1_epi32(ahi[4 + g]));
        }
      }
      const uint16_t* s = (const uint16_t*)(w + 512 + 64 * h);
      const __m512 dv = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)s));
      const __m512 mv = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)(s + 16)));
      for (int r = 0; r < R; ++r) {
        const float sa = *(const float*)((const uint8_t*)(sb + b) + r * rb);
        const int32_t c = *(const int32_t*)((const uint8_t*)(sum + b) + r * rb);
        const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(d[r][1], 8), d[r][0]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, _mm512_set1_ps(sa)), acc[r]);
        acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sa * (float)c), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

VNNI_TARGET static void matmul_packed4_vnni(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* P, int64_t N,
                                            int64_t n0, int64_t n1, float* Y) {
  const int64_t np = pairs_of(K);
  const size_t rb = row16_bytes(K);
#define Q4_TILE(row, R, tile, out, PF) packed_tile4(row, rb, K, tile, R, out, PF, range_end)
  EDGELLM_PACKED_TILES((size_t)np * PACK4_PAIR, rb, Q4_TILE)
#undef Q4_TILE
}
#endif

#ifdef EDGELLM_X86
/* quantize16_row, 16 lanes at a time (the same rounding: cvtps rounds to nearest even, as nearbyintf does). */
VNNI_TARGET static void quantize16_row_avx512(const float* x, int64_t K, uint8_t* out) {
  const int64_t np = pairs_of(K), nb = K / 32;
  int32_t* sum = (int32_t*)(out + np * 128);
  float* scale = (float*)(out + np * 128 + np * 8);
  memset(out, 0, row16_bytes(K));
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    const __m512i a0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), a1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128((__m128i*)(out + 32 * b), _mm512_cvtepi32_epi8(a0));
    _mm_storeu_si128((__m128i*)(out + 32 * b + 16), _mm512_cvtepi32_epi8(a1));
    _mm_storeu_si128((__m128i*)(out + np * 64 + 32 * b), _mm512_cvtepi32_epi8(_mm512_srai_epi32(a0, 8)));
    _mm_storeu_si128((__m128i*)(out + np * 64 + 32 * b + 16), _mm512_cvtepi32_epi8(_mm512_srai_epi32(a1, 8)));
    sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
    scale[b] = amax / 32767.0f;
  }
}
#endif

void edgellm_q4_quantize(const float* A, int64_t M, int64_t K, void* scratch) {
  void (*fn)(const float*, int64_t, uint8_t*) = quantize16_row;
#ifdef EDGELLM_X86
  if (strcmp(edgellm_q8_isa(), "avx512vnni") == 0) fn = quantize16_row_avx512;
#endif
  for (int64_t m = 0; m < M; ++m) fn(A + m * K, K, (uint8_t*)scratch + m * row16_bytes(K));
}

void edgellm_q4_matmul_packed(const void* scratch, int64_t M, int64_t K, const void* packed, int64_t N,
                              int64_t n_begin, int64_t n_end, float* Y) {
#ifdef EDGELLM_X86
  if (edgellm_q8_packed()) {
    matmul_packed4_vnni((const uint8_t*)scratch, M, K, (const uint8_t*)packed, N, n_begin, n_end, Y);
    return;
  }
#endif
  (void)scratch; (void)M; (void)K; (void)packed; (void)N; (void)n_begin; (void)n_end; (void)Y;
}
