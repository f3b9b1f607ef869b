/* edgellm's int8 block matmul: the decode-time replacement for onnxruntime's MatMulNBits (bits 8, block 32).
 *
 * Y[m,n] = sum_k A[m,k] * (B[n,k] - 128) * scales[n*(K/32) + k/32]
 * B is uint8 [N, K/32, 32], exactly MatMulNBits' layout for bits=8, block_size=32 and no zero_points input,
 * so a graph can switch op without copying its weights. The scales are IEEE half floats (the bits, uint16):
 * MatMulNBits' fp32 scales are 1 of every 9 bytes a decode step reads, fp16 makes that 1 in 17. A is first quantized per 32-block to int8
 * (symmetric, as MatMulNBits does with accuracy_level=4) into a scratch buffer; then any number of threads
 * call edgellm_q8_matmul on disjoint [n_begin, n_end) ranges.
 */
#ifndef EDGELLM_Q8_KERNEL_H
#define EDGELLM_Q8_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

size_t edgellm_q8_scratch_bytes(int64_t M, int64_t K);
void edgellm_q8_quantize(const float* A, int64_t M, int64_t K, void* scratch);
/* A at ~15 bits for the same kernels: per 32-block, a = round(x / s) with s = |max| / 16383, split a = 256 hi + lo
 * (hi in -64..64, lo in -128..127) into two scratch rows, 2m (hi, scale 256 s) and 2m + 1 (lo, scale s), so
 * Y[m] = Y'[2m] + Y'[2m + 1] over the 2M rows (edgellm_q8_scratch_bytes(2M, K)). The packed kernel reads each
 * weight once for both rows: a decode step pays compute, not bandwidth, for 64x finer activations. */
void edgellm_q8_quantize_split(const float* A, int64_t M, int64_t K, void* scratch);
void edgellm_q8_matmul(const void* scratch, int64_t M, int64_t K, const uint8_t* B, const uint16_t* scales,
                       int64_t N, int64_t n_begin, int64_t n_end, float* Y);
/* The avx512vnni path also reads weights packed once (at load) into its own layout: 16-row tiles, interleaved so
 * one instruction serves 16 rows, scales inline (see PACK_PAIR in q8_kernel.c). edgellm_q8_packed() says whether
 * this CPU's path has it (EDGELLM_KERNEL_PACK=0 turns it off); edgellm_q8_matmul_packed then takes the same scratch and n ranges (n_begin a multiple
 * of 16) as edgellm_q8_matmul. Elsewhere the weights stay in MatMulNBits' layout. */
int edgellm_q8_packed(void);
size_t edgellm_q8_packed_bytes(int64_t N, int64_t K);
void edgellm_q8_pack(const uint8_t* B, const uint16_t* scales, int64_t N, int64_t K, void* out);
void edgellm_q8_matmul_packed(const void* scratch, int64_t M, int64_t K, const void* packed, int64_t N,
                              int64_t n_begin, int64_t n_end, float* Y);
/* out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i]: SwiGLU, vectorized (exp by a
 * degree-6 polynomial, ~2 ulp) because a libm expf per element would cost more than the matmul it follows. */
void edgellm_silu_mul(const float* gate, const float* up, float* out, int64_t n);
/* out = x / sqrt(mean(x^2) + eps) * gamma over one row of n: RMSNorm as SimplifiedLayerNormalization does it. */
void edgellm_rms_norm(const float* x, const float* gamma, float eps, float* out, int64_t n);
/* "avx512vnni", "avx2" or "scalar": the code path this CPU runs (EDGELLM_Q8_ISA=avx2|scalar forces a lower one). */
const char* edgellm_q8_isa(void);
/* Bytes ahead of a decode step's weight stream that the packed kernels prefetch here (0: none; simd_avx512.h). */
int64_t edgellm_kernel_prefetch(void);

#ifdef __cplusplus
}
#endif

#endif
