/* The int8 activation scratch that edgellm_q8_quantize writes and the int8 kernels read (q8_kernel.c), and helpers
 * q4_kernel.c shares: header-only, static inline.
 *
 * Per activation row: int8 q[np*64] | int32 corr[np*16] | float sa[np*16] | int32 cb[2np] | float sb[2np],
 * np = pairs of 32-blocks. corr lane i of pair p = -128 * (sum of q[64p+4i .. 64p+4i+3]): vpdpbusd's 4-byte lanes,
 * the int8 weights' zero point folded in. sa lanes 0-7 hold block 2p's scale, lanes 8-15 block 2p+1's (0 past the
 * last block). cb[b] = -128 * (sum of block b's q) and sb[b] its scale: one broadcast per block. */
#ifndef EDGELLM_SCRATCH_LAYOUT_H
#define EDGELLM_SCRATCH_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline int64_t edgellm_pairs_of(int64_t K) { return (K / 32 + 1) / 2; }
static inline size_t edgellm_row_bytes(int64_t K) {
  return (size_t)edgellm_pairs_of(K) * 192 + ((size_t)edgellm_pairs_of(K) * 16 + 63) / 64 * 64;
}
/* IEEE half (bits) to float, exactly, without F16C: the scalar paths run on any CPU. */
static inline float edgellm_half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1Fu) bits = sign | 0x7F800000u | (mant << 13);        /* inf / nan */
  else if (exp != 0) bits = sign | ((exp + 112u) << 23) | (mant << 13); /* normal */
  else if (mant == 0) bits = sign;                                      /* zero */
  else {                                                                /* subnormal: normalize */
    uint32_t e = 113u, m = mant;
    while (!(m & 0x400u)) { m <<= 1; --e; }
    bits = sign | (e << 23) | ((m & 0x3FFu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

#endif
