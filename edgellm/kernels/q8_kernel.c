/* edgellm's int8 block matmul (see q8_kernel.h). Written by hand because onnxruntime 1.32's MatMulNBits
 * reaches 14-19 GB/s on our decode shapes (K 576/1536, N 576-3072) where one core reads 31 GB/s: decoding
 * is a stream of weights, and this kernel's whole job is to keep that stream at memory speed.
 *
 * Paths, chosen at run time (never -march=native: the CPU changes between machines):
 *   avx512vnni  vpdpbusd on 2 blocks per 512-bit register; the -128 zero point is folded into the
 *               accumulator's start value, precomputed once per activation row;
 *   avx2        the uint8 weight becomes int8 (xor 0x80) and vpmaddubsw runs on |w| and sign(a, w);
 *   scalar      the reference, also for non-x86 builds.
 */
#include "q8_kernel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EDGELLM_X86 1
#include <immintrin.h>
#endif

/* Scratch, per activation row: int8 q[np*64] | int32 corr[np*16] | float sa[np*16], np = pairs of blocks.
 * corr lane i of pair p = -128 * (sum of q[64p+4i .. 64p+4i+3]): vpdpbusd's 4-byte lanes, zero point folded.
 * sa lanes 0-7 hold block 2p's scale, lanes 8-15 block 2p+1's (0 past the last block). */
static int64_t pairs_of(int64_t K) { return (K / 32 + 1) / 2; }
static size_t row_bytes(int64_t K) { return (size_t)pairs_of(K) * 192; }

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

void edgellm_q8_quantize(const float* A, int64_t M, int64_t K, void* scratch) {
  for (int64_t m = 0; m < M; ++m) quantize_row(A + m * K, K, (uint8_t*)scratch + m * row_bytes(K));
}

static float block_scale(const float* sa, int64_t b) { return sa[(b / 2) * 16 + (b % 2) * 8]; }

static void matmul_scalar(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* B, const float* scales,
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
        y += (float)d * scales[n * nb + b] * block_scale(sa, b);
      }
      Y[m * N + n] = y;
    }
  }
}

#ifdef EDGELLM_X86
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

VNNI_TARGET static inline __m512 pair_scales(const float* s, int64_t p, const __m512i halves) {
  /* lanes 0-7: s[2p], lanes 8-15: s[2p+1] */
  const __m128 two = _mm_castpd_ps(_mm_load_sd((const double*)(s + 2 * p)));
  return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(two));
}

/* 4 weight rows at a time share each activation load; the rows are contiguous, so the 4 streams are one. */
VNNI_TARGET static void matmul_vnni(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* B,
                                    const float* scales, int64_t N, int64_t n0, int64_t n1, float* Y) {
  const int64_t nb = K / 32, np = pairs_of(K), full = nb / 2;
  const size_t rb = row_bytes(K);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __mmask64 low32 = 0xFFFFFFFFull;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const uint8_t* w = B + n * K;
    const float* s = scales + n * nb;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* row = scratch + m * rb;
      const uint8_t* q = row;
      const uint8_t* corr = row + np * 64;
      const float* sa = (const float*)(row + np * 128);
      __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps(), f2 = _mm512_setzero_ps(),
             f3 = _mm512_setzero_ps();
      for (int64_t p = 0; p < full; ++p) {
        const __m512i a = _mm512_loadu_si512(q + 64 * p);
        const __m512i c = _mm512_loadu_si512(corr + 64 * p);
        const __m512 sav = _mm512_loadu_ps(sa + 16 * p);
        const __m512i d0 = _mm512_dpbusd_epi32(c, _mm512_loadu_si512(w + 64 * p), a);
        const __m512i d1 = _mm512_dpbusd_epi32(c, _mm512_loadu_si512(w + K + 64 * p), a);
        const __m512i d2 = _mm512_dpbusd_epi32(c, _mm512_loadu_si512(w + 2 * K + 64 * p), a);
        const __m512i d3 = _mm512_dpbusd_epi32(c, _mm512_loadu_si512(w + 3 * K + 64 * p), a);
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_mul_ps(pair_scales(s, p, halves), sav), f0);
        f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_mul_ps(pair_scales(s + nb, p, halves), sav), f1);
        f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d2), _mm512_mul_ps(pair_scales(s + 2 * nb, p, halves), sav), f2);
        f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d3), _mm512_mul_ps(pair_scales(s + 3 * nb, p, halves), sav), f3);
      }
      if (nb & 1) { /* the last block alone: upper half of a, corr, sa are zero in the scratch */
        const int64_t p = full;
        const __m512i a = _mm512_loadu_si512(q + 64 * p);
        const __m512i c = _mm512_loadu_si512(corr + 64 * p);
        const __m512 sav = _mm512_loadu_ps(sa + 16 * p);
        const uint8_t* wl = w + 64 * p;
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, _mm512_maskz_loadu_epi8(low32, wl), a)),
                             _mm512_mul_ps(_mm512_set1_ps(s[2 * p]), sav), f0);
        f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, _mm512_maskz_loadu_epi8(low32, wl + K), a)),
                             _mm512_mul_ps(_mm512_set1_ps(s[nb + 2 * p]), sav), f1);
        f2 = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, _mm512_maskz_loadu_epi8(low32, wl + 2 * K), a)),
            _mm512_mul_ps(_mm512_set1_ps(s[2 * nb + 2 * p]), sav), f2);
        f3 = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, _mm512_maskz_loadu_epi8(low32, wl + 3 * K), a)),
            _mm512_mul_ps(_mm512_set1_ps(s[3 * nb + 2 * p]), sav), f3);
      }
      float* y = Y + m * N + n;
      y[0] = _mm512_reduce_add_ps(f0);
      y[1] = _mm512_reduce_add_ps(f1);
      y[2] = _mm512_reduce_add_ps(f2);
      y[3] = _mm512_reduce_add_ps(f3);
    }
  }
  if (n < n1) matmul_scalar(scratch, M, K, B, scales, N, n, n1, Y);
}

#define AVX2_TARGET __attribute__((target("avx2,fma")))

AVX2_TARGET static void matmul_avx2(const uint8_t* scratch, int64_t M, int64_t K, const uint8_t* B,
                                    const float* scales, int64_t N, int64_t n0, int64_t n1, float* Y) {
  const int64_t nb = K / 32, np = pairs_of(K);
  const size_t rb = row_bytes(K);
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = B + n * K;
    const float* s = scales + n * nb;
    for (int64_t m = 0; m < M; ++m) {
      const uint8_t* row = scratch + m * rb;
      const float* sa = (const float*)(row + np * 128);
      __m256 f = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 32 * b)), flip);
        const __m256i a = _mm256_loadu_si256((const __m256i*)(row + 32 * b));
        const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(wq), _mm256_sign_epi8(a, wq));
        const __m256i d = _mm256_madd_epi16(prod, ones);
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s[b] * block_scale(sa, b)), f);
      }
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      Y[m * N + n] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
    }
  }
}
#endif

typedef void (*matmul_fn)(const uint8_t*, int64_t, int64_t, const uint8_t*, const float*, int64_t, int64_t,
                          int64_t, float*);

static int chosen_isa(void) { /* 2 avx512vnni, 1 avx2, 0 scalar; EDGELLM_Q8_ISA may only lower it */
  static int isa = -1;
  if (isa >= 0) return isa;
  int best = 0;
#ifdef EDGELLM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
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

const char* edgellm_q8_isa(void) {
  static const char* names[] = {"scalar", "avx2", "avx512vnni"};
  return names[chosen_isa()];
}

void edgellm_q8_matmul(const void* scratch, int64_t M, int64_t K, const uint8_t* B, const float* scales,
                       int64_t N, int64_t n_begin, int64_t n_end, float* Y) {
  matmul_fn fn = matmul_scalar;
#ifdef EDGELLM_X86
  const int isa = chosen_isa();
  if (isa == 2) fn = matmul_vnni;
  else if (isa == 1) fn = matmul_avx2;
#endif
  fn((const uint8_t*)scratch, M, K, B, scales, N, n_begin, n_end, Y);
}
