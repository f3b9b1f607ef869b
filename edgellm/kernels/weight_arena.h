// Constant weights copied once, at session load, into memory the kernel backs with 2 MB pages.
//
// onnxruntime hands custom ops their initializers inside its 4 KB-page file mapping of model.onnx.data. A
// decode step streams all ~146 MB of weights once, and with 4 KB pages that is ~36,000 TLB misses and a
// hardware-prefetch restart at every page edge (benchmarks/kernel_steps.json, "+ huge pages", measures the
// gain on this repo's default model). The copies replace the originals in memory: the
// file mapping's pages are handed back with MADV_PAGEOUT, which keeps their contents (they re-read from the
// file if anything touches them), so resident memory grows only by what cannot be handed back (tensors
// onnxruntime holds in its heap, like the twin's fp16 scales, and partial pages): ~25 MB on the default model.
//
// The AVX-512 VNNI path packs its weights into its own layout (q8_kernel.h) in memory from allocate(), so it
// always copies; the other paths copy with place().
//
// EDGELLM_KERNEL_HUGEPAGES=0 turns huge pages off (place() then returns the original, and allocate() advises
// MADV_NOHUGEPAGE); they are off by themselves where transparent huge pages are disabled ("never").
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace edgellm_arena {

struct Chunk;

// The copies one kernel placed; they live as long as it does (chunks are shared between kernels and freed
// when the last kernel using them is destroyed).
class PlacedWeights {
 public:
  // A copy of `bytes` bytes at `src` in huge-page memory, or `src` itself when placing is off or fails.
  const void* place(const void* src, size_t bytes);
  // `bytes` of writable memory, 64-byte aligned, in huge pages when enabled() (for weights the kernel lays out
  // itself); nullptr if the system has no memory left.
  void* allocate(size_t bytes);

 private:
  std::vector<std::shared_ptr<Chunk>> chunks_;
};

// Hand this process's pages of a constant's original back to the system once a copy replaces it (whole pages
// inside [src, src + bytes) only; MADV_PAGEOUT keeps their contents).
void hand_back(const void* src, size_t bytes);

// Whether place() copies (EDGELLM_KERNEL_HUGEPAGES and the kernel's transparent huge page setting).
bool enabled();

}  // namespace edgellm_arena
