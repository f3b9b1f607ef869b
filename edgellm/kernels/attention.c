/* See attention.h. AVX-512 where the CPU has it (chosen at run time), plain C elsewhere. */
#include "attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define EDGELLM_X86 1
#include <immintrin.h>

#include "simd_avx512.h"
#endif

void edgellm_rotary(float* x, int64_t D, const float* cos, const float* sin) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i] + a * sin[i];
  }
}

static void attend_scalar(const float* q, const float* keys, const float* values, int64_t n, int64_t D, float scale,
                          float* scores, float* out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * keys[j * D + d];
    scores[j] = s * scale;
    if (scores[j] > top) top = scores[j];
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += scores[j] = expf(scores[j] - top);
  memset(out, 0, sizeof(float) * (size_t)D);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) out[d] += scores[j] * values[j * D + d];
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

#ifdef EDGELLM_X86

/* D = 64 (4 registers per row), the head size of every model edgellm converts today. */
EDGELLM_AVX512 static void attend64(const float* q, const float* keys, const float* values, int64_t n, float scale,
                                   float* scores, float* out) {
  const __m512 q0 = _mm512_loadu_ps(q), q1 = _mm512_loadu_ps(q + 16), q2 = _mm512_loadu_ps(q + 32),
               q3 = _mm512_loadu_ps(q + 48);
  /* 16 keys' dot products at a time, summed by one transpose tree (a reduction per key cost more than its dot) */
  int64_t j = 0;
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) {
    __m512 v[16];
    for (int t = 0; t < 16; ++t) {
      const float* k = keys + (j + t) * 64;
      __m512 s = _mm512_mul_ps(q0, _mm512_loadu_ps(k));
      s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k + 16), s);
      s = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), s);
      v[t] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), s);
    }
    const __m512 sc = _mm512_mul_ps(edgellm_sum16(v), _mm512_set1_ps(scale));
    _mm512_storeu_ps(scores + j, sc);
    vmax = _mm512_max_ps(vmax, sc);
  }
  float top = _mm512_reduce_max_ps(vmax);
  for (; j < n; ++j) {
    const float* k = keys + j * 64;
    __m512 s = _mm512_mul_ps(q0, _mm512_loadu_ps(k));
    s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k + 16), s);
    s = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), s);
    s = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), s);
    scores[j] = _mm512_reduce_add_ps(s) * scale;
    top = scores[j] > top ? scores[j] : top;
  }
  const __m512 vtop = _mm512_set1_ps(top);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= n; j += 16) {
    const __m512 e = edgellm_exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), vtop));
    _mm512_storeu_ps(scores + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (j < n) {
    const __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
    const __m512 e = edgellm_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), vtop));
    _mm512_mask_storeu_ps(scores + j, m, e);
    vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
  __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
  for (j = 0; j < n; ++j) {
    const __m512 p = _mm512_set1_ps(scores[j]);
    const float* v = values + j * 64;
    o0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v), o0);
    o1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16), o1);
    o2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 32), o2);
    o3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 48), o3);
  }
  const __m512 vi = _mm512_set1_ps(inv);
  _mm512_storeu_ps(out, _mm512_mul_ps(o0, vi));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(o1, vi));
  _mm512_storeu_ps(out + 32, _mm512_mul_ps(o2, vi));
  _mm512_storeu_ps(out + 48, _mm512_mul_ps(o3, vi));
}

static int has_avx512(void) {
  static int known = -1;
  if (known < 0) {
    __builtin_cpu_init();
    const char* forced = getenv("EDGELLM_Q8_ISA"); /* the kernels' switch to a lower path, for tests */
    known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
            !(forced && (strcmp(forced, "avx2") == 0 || strcmp(forced, "scalar") == 0));
  }
  return known;
}
#endif

void edgellm_attend(const float* q, const float* keys, const float* values, int64_t n, int64_t D, float scale,
                    float* scores, float* out) {
#ifdef EDGELLM_X86
  if (D == 64 && has_avx512()) {
    attend64(q, keys, values, n, scale, scores, out);
    return;
  }
#endif
  attend_scalar(q, keys, values, n, D, scale, scores, out);
}
