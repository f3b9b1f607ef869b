// See weight_arena.h.
#include "weight_arena.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif

namespace edgellm_arena {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kChunkBytes = size_t(32) << 20;  // a few layers per chunk; a chunk's unused tail stays unbacked
constexpr size_t kMinBytes = 4096;               // a page: smaller tensors share pages with others anyway
constexpr size_t kAlign = 64;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

struct Chunk {
  unsigned char* base = nullptr;
  size_t size = 0, used = 0;
  ~Chunk() {
    if (base) munmap(base, size);
  }
};

namespace {

std::mutex g_mutex;
std::weak_ptr<Chunk> g_current;  // the chunk being filled; kernels hold the strong references

// size bytes of anonymous memory starting on a 2 MB boundary, advised MADV_HUGEPAGE; nullptr if mmap fails.
std::shared_ptr<Chunk> new_chunk(size_t need) {
  const size_t size = round_up(need > kChunkBytes ? need : kChunkBytes, kHugePage);
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = round_up(begin, kHugePage);
  if (start > begin) munmap(raw, start - begin);
  const uintptr_t end = begin + size + kHugePage;
  if (end > start + size) munmap(reinterpret_cast<void*>(start + size), end - (start + size));
  auto chunk = std::make_shared<Chunk>();
  chunk->base = reinterpret_cast<unsigned char*>(start);
  chunk->size = size;
  madvise(chunk->base, size, enabled() ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return chunk;
}

bool read_enabled() {
  const char* v = std::getenv("EDGELLM_KERNEL_HUGEPAGES");
  if (v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0)) return false;
  std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string setting;
  std::getline(thp, setting);
  return setting.find("[never]") == std::string::npos;  // unreadable: copy anyway, aligned is no worse
}

}  // namespace

bool enabled() {
  static const bool on = read_enabled();
  return on;
}

// MADV_PAGEOUT keeps the contents: a clean file page is re-read if touched, an anonymous one stays (there is no
// swap to page it to).
void hand_back(const void* src, size_t bytes) {
  const uintptr_t first = round_up(reinterpret_cast<uintptr_t>(src), 4096);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(src) + bytes) / 4096 * 4096;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT);
}

void* PlacedWeights::allocate(size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::shared_ptr<Chunk> chunk = g_current.lock();
  if (!chunk || chunk->size - round_up(chunk->used, kAlign) < bytes) {
    chunk = new_chunk(bytes);
    if (!chunk) return nullptr;
    g_current = chunk;
  }
  const size_t offset = round_up(chunk->used, kAlign);
  chunk->used = offset + bytes;
  if (chunks_.empty() || chunks_.back() != chunk) chunks_.push_back(chunk);
  return chunk->base + offset;
}

const void* PlacedWeights::place(const void* src, size_t bytes) {
  if (!enabled() || bytes < kMinBytes) return src;
  void* copy = allocate(bytes);
  if (!copy) return src;
  std::memcpy(copy, src, bytes);
  hand_back(src, bytes);
  return copy;
}

}  // namespace edgellm_arena
