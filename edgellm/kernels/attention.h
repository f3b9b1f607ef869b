/* edgellm's cached attention for one query row (the decode half of onnxruntime's GroupQueryAttention).
 *
 * onnxruntime's CPU GroupQueryAttention runs two tiny MLAS GEMMs per head per step; for a 135M model
 * at decode that is ~40 us a layer, ~1 ms of a ~10 ms token. These loops do the same math directly. */
#ifndef EDGELLM_ATTENTION_H
#define EDGELLM_ATTENTION_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Non-interleaved rotary embedding of one head vector in place: with h = D/2,
 * x[i] <- x[i] cos[i] - x[i+h] sin[i],  x[i+h] <- x[i+h] cos[i] + x[i] sin[i]  (i < h). */
void edgellm_rotary(float* x, int64_t D, const float* cos, const float* sin);

/* out[D] = softmax(scale * q . keys[j]) . values[j] over positions j < n; keys/values are [n, D] rows.
 * scores: n floats of scratch. */
void edgellm_attend(const float* q, const float* keys, const float* values, int64_t n, int64_t D, float scale,
                    float* scores, float* out);

#ifdef __cplusplus
}
#endif

#endif
