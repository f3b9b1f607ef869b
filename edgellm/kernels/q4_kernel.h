/* edgellm's 4-bit block matmul: GGUF's Q4_1 blocks, read as they are.
 *
 * Y[m,n] = sum_k A[m,k] * (d[n,b] * q[n,k] + mn[n,b]), b = k/32, q in 0..15
 * B is uint8 [N, K/32, 16]: byte i of a block holds q[i] in its low nibble and q[i+16] in its high one (GGUF's own
 * order); dm is fp16 [N, K/32, 2] = (d, mn) per block. A block's float minimum is what makes this exact for Q4_1
 * sources: a 4-bit grid with an integer zero point (onnxruntime's MatMulNBits) cannot hold it, so a requantized
 * Q4_1 model loses perplexity (benchmarks/peers.json: 45.7 vs 43.4). About 5 bits a weight are read.
 * A is quantized to int16 per 32-block (edgellm_q4_quantize): with the weights exact, int8 activations were what
 * was left of the error (SmolLM2-135M's Q4_1: perplexity x1.003 of fp32 with them, emulated per matrix type: each
 * one's inputs cost some), and vpdpbusd takes 16 bits as two bytes at twice the instructions, which a decode step
 * reading 5 bits a weight has room for. Then any number of threads call a matmul on disjoint [n_begin, n_end)
 * ranges (multiples of 16 for the packed one).
 */
#ifndef EDGELLM_Q4_KERNEL_H
#define EDGELLM_Q4_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Activations: per row, per 32-block, a = round(x / s), s = |max| / 32767, stored as low bytes (unsigned) and
 * high bytes (signed), with each block's sum of a and s. */
size_t edgellm_q4_scratch_bytes(int64_t M, int64_t K);
void edgellm_q4_quantize(const float* A, int64_t M, int64_t K, void* scratch);
/* The reference, on B and dm as stored (any CPU; also for weights fed at run time). */
void edgellm_q4_matmul(const void* scratch, int64_t M, int64_t K, const uint8_t* B, const uint16_t* dm, int64_t N,
                       int64_t n_begin, int64_t n_end, float* Y);
/* Where edgellm_q8_packed() says so: the weights packed once at load into 16-row tiles (see PACK4_PAIR). */
size_t edgellm_q4_packed_bytes(int64_t N, int64_t K);
void edgellm_q4_pack(const uint8_t* B, const uint16_t* dm, int64_t N, int64_t K, void* out);
void edgellm_q4_matmul_packed(const void* scratch, int64_t M, int64_t K, const void* packed, int64_t N,
                              int64_t n_begin, int64_t n_end, float* Y);

#ifdef __cplusplus
}
#endif

#endif
