// onnxruntime custom op ai.edgellm::MatMulQ8: MatMulNBits (bits 8, block_size 32, no zero points) computed by
// edgellm's own kernel (q8_kernel.h), or 4-bit blocks with a float minimum each (bits 4: GGUF's Q4_1, q4_kernel.h).
// Same first three inputs as MatMulNBits (A float [..., K], B uint8 [N, K/32, 32], scales float16 [N * K/32]: the twin
// graph stores MatMulNBits' fp32 scales as fp16, 8 MB fewer to read per token; for bits 4, B [N, K/32, 16] and
// scales [N, K/32, 2], d and minimum) and the attributes K, N, bits, block_size; output float [..., N].
//
// Python loads this library with SessionOptions.register_custom_ops_library(path), which calls
// RegisterCustomOps below. Bad attributes or weight shapes fail when the session is created; bad activation
// shapes fail at the call. Each call quantizes A once, then splits N across onnxruntime's intra-op threads.
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "ort_abi.h"
#include "attention.h"
#include "q4_kernel.h"
#include "q8_kernel.h"
#include "weight_arena.h"

namespace {

using namespace edgellm_ort;

const OrtApi* g_api = nullptr;  // set by the first RegisterCustomOps (the table is the same for every session)

constexpr int64_t kRowsPerUnit = 16;  // each thread gets a contiguous range of weight rows, a multiple of 16

OrtStatus* error(int code, const std::string& message) {
  return CreateStatus::get(g_api)(code, message.c_str());
}

// A constant weight matrix as the kernel reads it: packed once (edgellm_q8_pack) where this CPU's path reads
// that layout, else B and scales in MatMulNBits' layout (copied into huge pages by weight_arena.h).
// bits 8: B [N, K/32, 32] uint8 and scales [N*K/32] fp16 (q8_kernel.h); bits 4: B [N, K/32, 16] and scales
// [N, K/32, 2] fp16, a (d, minimum) pair per block (q4_kernel.h). Which one a matrix is follows from B's size.
struct ConstantWeights {
  const void* packed = nullptr;
  const uint8_t* B = nullptr;
  const uint16_t* scales = nullptr;
  int bits = 8;
};

// b and scales, already checked (out->bits says which layout), into `out`; the originals' pages are handed back.
OrtStatus* prepare_weights(const OrtValue* b, const OrtValue* scales, int64_t N, int64_t K, const std::string& where,
                           edgellm_arena::PlacedWeights& placed, ConstantWeights* out) {
  void *b_data = nullptr, *s_data = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(b), &b_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(scales), &s_data)) return s;
  const bool four = out->bits == 4;
  const size_t b_bytes = (size_t)(four ? N * K / 2 : N * K), s_bytes = (size_t)(N * (K / 32)) * (four ? 4 : 2);
  if (edgellm_q8_packed()) {
    const size_t bytes = four ? edgellm_q4_packed_bytes(N, K) : edgellm_q8_packed_bytes(N, K);
    void* packed = placed.allocate(bytes);
    if (!packed)
      return error(ORT_FAIL, where + ": out of memory for its " + std::to_string(bytes) +
                                 " bytes of packed weights; free memory or set EDGELLM_KERNELS=0");
    if (four)
      edgellm_q4_pack(static_cast<const uint8_t*>(b_data), static_cast<const uint16_t*>(s_data), N, K, packed);
    else
      edgellm_q8_pack(static_cast<const uint8_t*>(b_data), static_cast<const uint16_t*>(s_data), N, K, packed);
    edgellm_arena::hand_back(b_data, b_bytes);
    edgellm_arena::hand_back(s_data, s_bytes);
    out->packed = packed;
    return nullptr;
  }
  out->B = static_cast<const uint8_t*>(placed.place(b_data, b_bytes));
  out->scales = static_cast<const uint16_t*>(placed.place(s_data, s_bytes));
  return nullptr;
}

// The number of CPUs this process may run on: the most threads onnxruntime's pool can use at once.
int64_t usable_cpus() {
  static const int64_t count = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return (int64_t)CPU_COUNT(&set);
    const unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? (int64_t)hw : (int64_t)1;
  }();
  return count;
}

// Work items per CPU (EDGELLM_KERNEL_TASKS_PER_CPU, default 1).
int64_t tasks_per_cpu() {
  static const int64_t count = [] {
    const char* v = std::getenv("EDGELLM_KERNEL_TASKS_PER_CPU");
    const long n = v ? std::strtol(v, nullptr, 10) : 1;
    return (int64_t)(n >= 1 && n <= 64 ? n : 1);
  }();
  return count;
}

// A decode step's heads go to the intra-op pool once the context holds this many positions (EDGELLM_ATTENTION_
// PARALLEL_FROM); below it one thread does them all, since handing out 9 tiny heads costs more than it saves.
int64_t attention_parallel_from() {
  static const int64_t from = [] {
    const char* v = std::getenv("EDGELLM_ATTENTION_PARALLEL_FROM");
    const long n = v ? std::strtol(v, nullptr, 10) : 256;
    return (int64_t)(n >= 0 ? n : 256);
  }();
  return from;
}

struct TensorShape {
  std::vector<int64_t> dims;
  int element_type = 0;
  int64_t elements() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
};

OrtStatus* shape_of(const OrtValue* value, TensorShape* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = GetTensorTypeAndShape::get(g_api)(value, &info)) return s;
  size_t count = 0;
  OrtStatus* s = GetDimensionsCount::get(g_api)(info, &count);
  if (!s) {
    out->dims.assign(count, 0);
    s = GetDimensions::get(g_api)(info, out->dims.data(), count);
  }
  if (!s) s = GetTensorElementType::get(g_api)(info, &out->element_type);
  ReleaseTensorTypeAndShapeInfo::get(g_api)(info);
  return s;
}

std::string dims_text(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

struct Kernel {
  std::string where;  // "MatMulQ8 node 'name'", for messages
  int64_t K = 0, N = 0;
  int bits = 0;  // the node's bits attribute (4 or 8); 0 for a matrix of Q8Mlp / Q8Layer (either, by its size)
  bool split = false;  // activation_bits=16 on 8-bit weights: A at ~15 bits as two int8 rows (q8_kernel.h)
  bool weights_checked = false;  // B and scales are constant initializers whose sizes were checked at load
  edgellm_arena::PlacedWeights placed;
  ConstantWeights constant;  // when checked at load: the weights as the kernel reads them

  // B must hold N*K uint8 (8 bits) or N*K/2 (4 bits), and scales N*K/32 fp16 (8 bits) or N*K/16 (4 bits: d and
  // minimum); `when` says at which step this was checked. *bits gets the width found; `want` (4 or 8) demands one.
  OrtStatus* check_weights(const OrtValue* b, const OrtValue* scales, const char* when, int* bits,
                           int want = 0) const {
    TensorShape bs, ss;
    if (OrtStatus* s = shape_of(b, &bs)) return s;
    if (OrtStatus* s = shape_of(scales, &ss)) return s;
    const int found = bs.elements() == N * K ? 8 : bs.elements() == N * K / 2 ? 4 : 0;
    if (bs.element_type != EDGELLM_ORT_UINT8 || found == 0 || (want && found != want))
      return error(ORT_INVALID_ARGUMENT, where + ": input B has shape " + dims_text(bs.dims) + " (" +
                                             std::to_string(bs.elements()) + " elements, type " +
                                             std::to_string(bs.element_type) + ") " + when + "; it must be uint8 with " +
                                             (want == 4 ? "" : "N*K = " + std::to_string(N * K) + " elements ([N, K/32, 32] "
                                              "as MatMulNBits stores bits=8, block_size=32)") +
                                             (want ? "" : " or ") +
                                             (want == 8 ? "" : "N*K/2 = " + std::to_string(N * K / 2) +
                                              " elements (4-bit blocks, [N, K/32, 16])") + "; re-convert the model");
    const int64_t per_block = found == 4 ? 2 : 1;
    if (ss.element_type != EDGELLM_ORT_FLOAT16 || ss.elements() != N * (K / 32) * per_block)
      return error(ORT_INVALID_ARGUMENT, where + ": input scales has shape " + dims_text(ss.dims) + " (" +
                                             std::to_string(ss.elements()) + " elements, type " + std::to_string(ss.element_type) + ") " + when +
                                             "; for " + std::to_string(found) + "-bit weights it must be float16 with " +
                                             (found == 4 ? "N*K/16 = " : "N*K/32 = ") +
                                             std::to_string(N * (K / 32) * per_block) + " elements; re-convert the model");
    *bits = found;
    return nullptr;
  }
};

// A [M, K] quantized for `w`'s kernel into `scratch` (grown as needed): int8 blocks for 8-bit weights, int16 ones
// for 4-bit weights (q4_kernel.h says why).
void quantize_for(const ConstantWeights& w, const float* A, int64_t M, int64_t K, std::vector<unsigned char>& scratch) {
  const bool four = w.bits == 4;
  const size_t bytes = four ? edgellm_q4_scratch_bytes(M, K) : edgellm_q8_scratch_bytes(M, K);
  if (scratch.size() < bytes) scratch.resize(bytes);
  if (four)
    edgellm_q4_quantize(A, M, K, scratch.data());
  else
    edgellm_q8_quantize(A, M, K, scratch.data());
}

// N weight rows as work items: contiguous ranges of 16-row units, at most tasks_per_cpu() per usable CPU.
int64_t work_items(int64_t N) {
  return std::min((N + kRowsPerUnit - 1) / kRowsPerUnit, usable_cpus() * tasks_per_cpu());
}

// Work item i of `items` over N rows: rows n0 .. n1 - 1 (empty when there are more items than units).
void item_rows(int64_t N, int64_t items, int64_t i, int64_t* n0, int64_t* n1) {
  const int64_t units = (N + kRowsPerUnit - 1) / kRowsPerUnit;
  *n0 = (units * i / items) * kRowsPerUnit;
  *n1 = std::min(N, (units * (i + 1) / items) * kRowsPerUnit);
}

struct Task {
  const void* scratch;
  int64_t M, K, N, tasks;
  ConstantWeights w;
  float* Y;
};

void run_range(const Task& t, int64_t n0, int64_t n1) {
  if (t.w.bits == 4) {
    if (t.w.packed)
      edgellm_q4_matmul_packed(t.scratch, t.M, t.K, t.w.packed, t.N, n0, n1, t.Y);
    else
      edgellm_q4_matmul(t.scratch, t.M, t.K, t.w.B, t.w.scales, t.N, n0, n1, t.Y);
  } else if (t.w.packed) {
    edgellm_q8_matmul_packed(t.scratch, t.M, t.K, t.w.packed, t.N, n0, n1, t.Y);
  } else {
    edgellm_q8_matmul(t.scratch, t.M, t.K, t.w.B, t.w.scales, t.N, n0, n1, t.Y);
  }
}

void run_task(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  int64_t n0 = 0, n1 = 0;
  item_rows(t.N, t.tasks, (int64_t)index, &n0, &n1);
  if (n0 < n1) run_range(t, n0, n1);
}

// Y = quantized A (already in `scratch`) times the weights, rows of N split in contiguous ranges (multiples of 16,
// the packed layout's tiles) over the intra-op pool.
OrtStatus* parallel_matmul(OrtKernelContext* context, const void* scratch, int64_t M, int64_t K, int64_t N,
                           const ConstantWeights& w, float* Y) {
  Task task;
  task.scratch = scratch;
  task.M = M;
  task.K = K;
  task.N = N;
  task.tasks = work_items(N);
  task.w = w;
  task.Y = Y;
  if (task.tasks <= 1) {
    run_range(task, 0, N);
    return nullptr;
  }
  // num_batch 0: each of the `tasks` indices is one work item that a pool thread takes whole.
  return KernelContext_ParallelFor::get(g_api)(context, run_task, (size_t)task.tasks, 0, &task);
}

OrtStatus* compute(const Kernel& k, OrtKernelContext* context) {
  const OrtValue *a = nullptr, *b = nullptr, *scales = nullptr;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, 0, &a)) return s;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, 1, &b)) return s;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, 2, &scales)) return s;
  int bits = k.constant.bits;
  if (!k.weights_checked)
    if (OrtStatus* s = k.check_weights(b, scales, "at the call", &bits, k.bits)) return s;

  TensorShape as;
  if (OrtStatus* s = shape_of(a, &as)) return s;
  if (as.dims.empty() || as.dims.back() != k.K)
    return error(ORT_INVALID_ARGUMENT, k.where + ": input A has shape " + dims_text(as.dims) +
                                           "; its last dimension must be K = " + std::to_string(k.K) +
                                           " (the node's K attribute); feed activations of width " +
                                           std::to_string(k.K));
  std::vector<int64_t> out_dims = as.dims;
  out_dims.back() = k.N;
  OrtValue* y = nullptr;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, 0, out_dims.data(), out_dims.size(), &y)) return s;
  const int64_t M = as.elements() / k.K;
  if (M == 0) return nullptr;

  void *a_data = nullptr, *b_data = nullptr, *s_data = nullptr, *y_data = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(a), &a_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(b), &b_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(scales), &s_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(y, &y_data)) return s;

  ConstantWeights w = k.constant;
  if (!k.weights_checked) {  // weights fed at run time: read where they are
    w.bits = bits;
    w.B = static_cast<const uint8_t*>(b_data);
    w.scales = static_cast<const uint16_t*>(s_data);
  }
  // One scratch buffer per calling thread, grown as needed: the activations quantized once for all workers.
  thread_local std::vector<unsigned char> scratch;
  if (k.split && w.bits == 8) {  // two int8 rows a row, then Y[m] = Y'[2m] + Y'[2m + 1]
    thread_local std::vector<float> parts;
    const size_t bytes = edgellm_q8_scratch_bytes(2 * M, k.K);
    if (scratch.size() < bytes) scratch.resize(bytes);
    if (parts.size() < (size_t)(2 * M * k.N)) parts.resize((size_t)(2 * M * k.N));
    edgellm_q8_quantize_split(static_cast<const float*>(a_data), M, k.K, scratch.data());
    if (OrtStatus* s = parallel_matmul(context, scratch.data(), 2 * M, k.K, k.N, w, parts.data())) return s;
    float* out = static_cast<float*>(y_data);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < k.N; ++n) out[m * k.N + n] = parts[2 * m * k.N + n] + parts[(2 * m + 1) * k.N + n];
    return nullptr;
  }
  quantize_for(w, static_cast<const float*>(a_data), M, k.K, scratch);
  return parallel_matmul(context, scratch.data(), M, k.K, k.N, w, static_cast<float*>(y_data));
}

OrtStatus* read_int(const OrtKernelInfo* info, const std::string& where, const char* name, int64_t* out,
                    const char* needs = "MatMulQ8 needs K, N, bits (8 or 4) and block_size=32 (copy them from the "
                                        "MatMulNBits node it replaces)") {
  if (OrtStatus* s = KernelInfoGetAttribute_int64::get(g_api)(info, name, out)) {
    ReleaseStatus::get(g_api)(s);
    return error(ORT_INVALID_GRAPH, where + ": the int attribute '" + name + "' is missing; " + needs);
  }
  return nullptr;
}

// "OP node 'NAME'" for messages; a name longer than 255 bytes: the node is described without it.
std::string node_where(const OrtKernelInfo* info, const char* op) {
  char name[256] = {0};
  size_t size = sizeof(name);
  std::string where = std::string(op) + " node";
  if (OrtStatus* s = KernelInfo_GetNodeName::get(g_api)(info, name, &size))
    ReleaseStatus::get(g_api)(s);
  else
    where += std::string(" '") + name + "'";
  return where;
}

OrtStatus* create_kernel(const OrtKernelInfo* info, void** out) {
  *out = nullptr;
  const std::string where = node_where(info, "MatMulQ8");

  int64_t K = 0, N = 0, bits = 0, block_size = 0;
  if (OrtStatus* s = read_int(info, where, "K", &K)) return s;
  if (OrtStatus* s = read_int(info, where, "N", &N)) return s;
  if (OrtStatus* s = read_int(info, where, "bits", &bits)) return s;
  if (OrtStatus* s = read_int(info, where, "block_size", &block_size)) return s;
  if (bits != 8 && bits != 4)
    return error(ORT_INVALID_GRAPH, where + ": bits=" + std::to_string(bits) +
                                        " is not supported (only 8, or 4 with a minimum per block); keep MatMulNBits "
                                        "for other widths");
  if (block_size != 32)
    return error(ORT_INVALID_GRAPH, where + ": block_size=" + std::to_string(block_size) +
                                        " is not supported (only 32); keep MatMulNBits for other block sizes");
  if (K <= 0 || K % 32 != 0 || N <= 0)
    return error(ORT_INVALID_GRAPH, where + ": K=" + std::to_string(K) + ", N=" + std::to_string(N) +
                                        " is invalid; K must be a positive multiple of 32 and N positive");

  Kernel* kernel = new (std::nothrow) Kernel;
  if (!kernel) return error(ORT_FAIL, where + ": out of memory");
  kernel->where = where;
  kernel->K = K;
  kernel->N = N;
  kernel->bits = (int)bits;
  int64_t activation_bits = 8;  // optional: 16 asks for ~15-bit activations on 8-bit weights
  if (OrtStatus* s = KernelInfoGetAttribute_int64::get(g_api)(info, "activation_bits", &activation_bits))
    ReleaseStatus::get(g_api)(s);
  if (activation_bits != 8 && activation_bits != 16) {
    delete kernel;
    return error(ORT_INVALID_GRAPH, where + ": activation_bits=" + std::to_string(activation_bits) +
                                        " is not supported (8, or 16 for ~15-bit activations)");
  }
  kernel->split = activation_bits == 16;
  const OrtValue *b = nullptr, *scales = nullptr;
  int b_const = 0, s_const = 0;
  OrtStatus* s = KernelInfoGetConstantInput_tensor::get(g_api)(info, 1, &b_const, &b);
  if (!s) s = KernelInfoGetConstantInput_tensor::get(g_api)(info, 2, &s_const, &scales);
  if (!s && b_const && s_const) {
    s = kernel->check_weights(b, scales, "at load", &kernel->constant.bits, kernel->bits);
    if (!s) s = prepare_weights(b, scales, N, K, where, kernel->placed, &kernel->constant);
    kernel->weights_checked = s == nullptr;
  }
  if (s) {
    delete kernel;
    return s;
  }
  *out = kernel;
  return nullptr;
}

// OrtCustomOp callbacks. Exceptions never cross into onnxruntime: anything thrown becomes an OrtStatus.
const char* EDGELLM_ORT_CALL op_name(const OrtCustomOp*) { return "MatMulQ8"; }
const char* EDGELLM_ORT_CALL op_provider(const OrtCustomOp*) { return nullptr; }  // CPU
int EDGELLM_ORT_CALL op_input_type(const OrtCustomOp*, size_t index) {
  return index == 1 ? EDGELLM_ORT_UINT8 : index == 2 ? EDGELLM_ORT_FLOAT16 : EDGELLM_ORT_FLOAT;
}
size_t EDGELLM_ORT_CALL op_input_count(const OrtCustomOp*) { return 3; }
int EDGELLM_ORT_CALL op_output_type(const OrtCustomOp*, size_t) { return EDGELLM_ORT_FLOAT; }
size_t EDGELLM_ORT_CALL op_output_count(const OrtCustomOp*) { return 1; }
int EDGELLM_ORT_CALL op_required(const OrtCustomOp*, size_t) { return EDGELLM_ORT_INPUT_OUTPUT_REQUIRED; }
int EDGELLM_ORT_CALL op_memory_type(const OrtCustomOp*, size_t) { return EDGELLM_ORT_MEM_TYPE_DEFAULT; }
int EDGELLM_ORT_CALL op_one(const OrtCustomOp*) { return 1; }
int EDGELLM_ORT_CALL op_start_version(const OrtCustomOp*) { return 1; }
int EDGELLM_ORT_CALL op_end_version(const OrtCustomOp*) { return 1 << 30; }
void EDGELLM_ORT_CALL op_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

OrtStatus* EDGELLM_ORT_CALL op_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  try {
    return create_kernel(info, kernel);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, std::string("MatMulQ8: ") + e.what());
  }
}

OrtStatus* EDGELLM_ORT_CALL op_compute(void* kernel, OrtKernelContext* context) {
  try {
    return compute(*static_cast<const Kernel*>(kernel), context);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, static_cast<const Kernel*>(kernel)->where + ": " + e.what());
  }
}


// ---------------------------------------------------------------------------------------------------------
// ai.edgellm::Q8Mlp: everything of a decoder layer after attention in one node, so a decode step runs 3 nodes
// per layer instead of 11 (onnxruntime spends microseconds per node, and a 135M model's step has ~340):
//   r  = attn @ Wo^T + residual                   (o_proj, then the skip add)
//   n  = rms_norm(r, gamma_post, eps_post)
//   g  = n @ Wgu^T; a = silu(g[:, :I]) * g[:, I:] (gate_up, SwiGLU)
//   r2 = a @ Wd^T + r                             (down_proj, then the skip add)
//   outputs: rms_norm(r2, gamma_next, eps_next) (the next layer's normed input, or the final norm) and r2.
// Inputs: attn [..., A], residual [..., H], Wo, So, gamma_post [H], Wgu, Sgu, Wd, Sd, gamma_next [H]
// (W* uint8 / S* float as MatMulQ8 takes them). Attributes: hidden H, intermediate I, attn A, eps_post, eps_next.
struct MlpKernel {
  std::string where;
  int64_t H = 0, I = 0, A = 0;
  float eps_post = 0.0f, eps_next = 0.0f;
  edgellm_arena::PlacedWeights placed;
  ConstantWeights weights[10];  // at the index of each matrix input (2, 5, 7), when constant
};

OrtStatus* read_float(const OrtKernelInfo* info, const std::string& where, const char* name, float* out,
                      const char* needs = "Q8Mlp needs eps_post and eps_next (the two norms' epsilon)") {
  if (OrtStatus* s = KernelInfoGetAttribute_float::get(g_api)(info, name, out)) {
    ReleaseStatus::get(g_api)(s);
    return error(ORT_INVALID_GRAPH, where + ": the float attribute '" + name + "' is missing; " + needs);
  }
  return nullptr;
}

// Checks the weight matrix at `input` (and its scales at input + 1) when they are constant, and places them in
// `placed` (`out` stays empty when they are fed at run time).
OrtStatus* check_matrix(const OrtKernelInfo* info, const std::string& where, size_t input, int64_t N, int64_t K,
                        edgellm_arena::PlacedWeights& placed, ConstantWeights* out) {
  const OrtValue *b = nullptr, *scales = nullptr;
  int b_const = 0, s_const = 0;
  OrtStatus* s = KernelInfoGetConstantInput_tensor::get(g_api)(info, input, &b_const, &b);
  if (!s) s = KernelInfoGetConstantInput_tensor::get(g_api)(info, input + 1, &s_const, &scales);
  if (s || !b_const || !s_const) return s;
  Kernel k;
  k.where = where + " (input " + std::to_string(input) + ")";
  k.K = K;
  k.N = N;
  if (OrtStatus* s = k.check_weights(b, scales, "at load", &out->bits)) return s;
  return prepare_weights(b, scales, N, K, k.where, placed, out);
}

// The matrix at `input` as the kernel reads it at this call: as placed at load, or as fed now (checked first).
OrtStatus* matrix_at_call(OrtKernelContext* context, const std::string& where, size_t input, int64_t N, int64_t K,
                          const ConstantWeights& placed, ConstantWeights* out) {
  *out = placed;
  if (placed.packed || placed.B) return nullptr;
  const OrtValue *b = nullptr, *scales = nullptr;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, input, &b)) return s;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, input + 1, &scales)) return s;
  Kernel k;
  k.where = where + " (input " + std::to_string(input) + ")";
  k.K = K;
  k.N = N;
  if (OrtStatus* s = k.check_weights(b, scales, "at the call", &out->bits)) return s;
  void *b_data = nullptr, *s_data = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(b), &b_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(scales), &s_data)) return s;
  out->B = static_cast<const uint8_t*>(b_data);
  out->scales = static_cast<const uint16_t*>(s_data);
  return nullptr;
}

// hidden, intermediate, attn, eps_post and eps_next, checked, into `k` (Q8Mlp's and Q8Layer's attributes).
OrtStatus* read_mlp(const OrtKernelInfo* info, const std::string& where, const char* op, MlpKernel* k) {
  const std::string needs = std::string(op) + " needs hidden, intermediate, attn, eps_post and eps_next (re-convert "
                                              "the model)";
  int64_t H = 0, I = 0, A = 0;
  float eps_post = 0.0f, eps_next = 0.0f;
  if (OrtStatus* s = read_int(info, where, "hidden", &H, needs.c_str())) return s;
  if (OrtStatus* s = read_int(info, where, "intermediate", &I, needs.c_str())) return s;
  if (OrtStatus* s = read_int(info, where, "attn", &A, needs.c_str())) return s;
  if (OrtStatus* s = read_float(info, where, "eps_post", &eps_post, needs.c_str())) return s;
  if (OrtStatus* s = read_float(info, where, "eps_next", &eps_next, needs.c_str())) return s;
  if (H <= 0 || I <= 0 || A <= 0 || H % 32 || I % 32 || A % 32)
    return error(ORT_INVALID_GRAPH, where + ": hidden=" + std::to_string(H) + ", intermediate=" + std::to_string(I) +
                                        ", attn=" + std::to_string(A) + " are invalid; each must be a positive "
                                        "multiple of 32");
  k->where = where;
  k->H = H;
  k->I = I;
  k->A = A;
  k->eps_post = eps_post;
  k->eps_next = eps_next;
  return nullptr;
}

OrtStatus* create_mlp(const OrtKernelInfo* info, void** out) {
  *out = nullptr;
  MlpKernel* kernel = new (std::nothrow) MlpKernel;
  if (!kernel) return error(ORT_FAIL, node_where(info, "Q8Mlp") + ": out of memory");
  OrtStatus* s = read_mlp(info, node_where(info, "Q8Mlp"), "Q8Mlp", kernel);
  const MlpKernel& k = *kernel;
  if (!s) s = check_matrix(info, k.where, 2, k.H, k.A, kernel->placed, &kernel->weights[2]);
  if (!s) s = check_matrix(info, k.where, 5, 2 * k.I, k.H, kernel->placed, &kernel->weights[5]);
  if (!s) s = check_matrix(info, k.where, 7, k.H, k.I, kernel->placed, &kernel->weights[7]);
  if (s) {
    delete kernel;
    return s;
  }
  *out = kernel;
  return nullptr;
}

OrtStatus* input_data(OrtKernelContext* context, size_t index, const MlpKernel& k, int64_t expected, void** data) {
  const OrtValue* value = nullptr;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, index, &value)) return s;
  TensorShape shape;
  if (OrtStatus* s = shape_of(value, &shape)) return s;
  if (expected >= 0 && shape.elements() != expected)
    return error(ORT_INVALID_ARGUMENT, k.where + ": input " + std::to_string(index) + " has shape " +
                                           dims_text(shape.dims) + ", expected " + std::to_string(expected) +
                                           " elements; re-convert the model");
  return GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(value), data);
}

// The layer tail (see Q8Mlp above) on M rows of attn [M, A] and residual [M, H]: writes out_norm and r, [M, H].
OrtStatus* mlp_math(const MlpKernel& k, OrtKernelContext* context, int64_t M, const float* attn, const float* residual,
                    const ConstantWeights& wo, const ConstantWeights& wgu, const ConstantWeights& wd,
                    const float* gamma_post, const float* gamma_next, float* out_norm, float* r) {
  thread_local std::vector<unsigned char> scratch;
  thread_local std::vector<float> work;  // gate_up / act, reused
  const size_t floats = (size_t)M * (size_t)(2 * k.I + std::max(k.I, k.H));
  if (work.size() < floats) work.resize(floats);
  float* gu = work.data();                      // [M, 2I]
  float* act = work.data() + (size_t)M * 2 * k.I;  // [M, I] activations, or [M, H] normed rows

  // o_proj, + residual
  quantize_for(wo, attn, M, k.A, scratch);
  if (OrtStatus* s = parallel_matmul(context, scratch.data(), M, k.A, k.H, wo, r)) return s;
  for (int64_t i = 0; i < M * k.H; ++i) r[i] += residual[i];
  // post-attention norm, gate_up, SwiGLU
  for (int64_t m = 0; m < M; ++m) edgellm_rms_norm(r + m * k.H, gamma_post, k.eps_post, act + m * k.H, k.H);
  quantize_for(wgu, act, M, k.H, scratch);
  if (OrtStatus* s = parallel_matmul(context, scratch.data(), M, k.H, 2 * k.I, wgu, gu)) return s;
  for (int64_t m = 0; m < M; ++m)
    edgellm_silu_mul(gu + m * 2 * k.I, gu + m * 2 * k.I + k.I, act + m * k.I, k.I);
  // down_proj, + residual, next norm
  quantize_for(wd, act, M, k.I, scratch);
  if (OrtStatus* s = parallel_matmul(context, scratch.data(), M, k.I, k.H, wd, gu)) return s;
  for (int64_t i = 0; i < M * k.H; ++i) r[i] += gu[i];
  for (int64_t m = 0; m < M; ++m) edgellm_rms_norm(r + m * k.H, gamma_next, k.eps_next, out_norm + m * k.H, k.H);
  return nullptr;
}

OrtStatus* compute_mlp(const MlpKernel& k, OrtKernelContext* context) {
  const OrtValue* attn = nullptr;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, 0, &attn)) return s;
  TensorShape as;
  if (OrtStatus* s = shape_of(attn, &as)) return s;
  if (as.dims.empty() || as.dims.back() != k.A)
    return error(ORT_INVALID_ARGUMENT, k.where + ": input attn has shape " + dims_text(as.dims) +
                                           "; its last dimension must be attn = " + std::to_string(k.A));
  const int64_t M = as.elements() / k.A;
  std::vector<int64_t> out_dims = as.dims;
  out_dims.back() = k.H;
  OrtValue *y_norm = nullptr, *y_res = nullptr;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, 0, out_dims.data(), out_dims.size(), &y_norm)) return s;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, 1, out_dims.data(), out_dims.size(), &y_res)) return s;
  if (M == 0) return nullptr;
  void* p[10] = {nullptr};
  const int64_t expected[10] = {-1, M * k.H, -1, -1, k.H, -1, -1, -1, -1, k.H};
  for (size_t i : {0, 1, 4, 9})
    if (OrtStatus* s = input_data(context, i, k, expected[i], &p[i])) return s;
  ConstantWeights wo, wgu, wd;  // as placed at load, or as fed at run time
  if (OrtStatus* s = matrix_at_call(context, k.where, 2, k.H, k.A, k.weights[2], &wo)) return s;
  if (OrtStatus* s = matrix_at_call(context, k.where, 5, 2 * k.I, k.H, k.weights[5], &wgu)) return s;
  if (OrtStatus* s = matrix_at_call(context, k.where, 7, k.H, k.I, k.weights[7], &wd)) return s;
  void *norm_data = nullptr, *res_data = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(y_norm, &norm_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(y_res, &res_data)) return s;
  return mlp_math(k, context, M, static_cast<const float*>(p[0]), static_cast<const float*>(p[1]), wo, wgu, wd,
                  static_cast<const float*>(p[4]), static_cast<const float*>(p[9]), static_cast<float*>(norm_data),
                  static_cast<float*>(res_data));
}

const char* EDGELLM_ORT_CALL mlp_name(const OrtCustomOp*) { return "Q8Mlp"; }
int EDGELLM_ORT_CALL mlp_input_type(const OrtCustomOp*, size_t index) {
  if (index == 2 || index == 5 || index == 7) return EDGELLM_ORT_UINT8;
  if (index == 3 || index == 6 || index == 8) return EDGELLM_ORT_FLOAT16;
  return EDGELLM_ORT_FLOAT;
}
size_t EDGELLM_ORT_CALL mlp_input_count(const OrtCustomOp*) { return 10; }
size_t EDGELLM_ORT_CALL mlp_output_count(const OrtCustomOp*) { return 2; }
void EDGELLM_ORT_CALL mlp_destroy(void* kernel) { delete static_cast<MlpKernel*>(kernel); }
OrtStatus* EDGELLM_ORT_CALL mlp_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  try {
    return create_mlp(info, kernel);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, std::string("Q8Mlp: ") + e.what());
  }
}
OrtStatus* EDGELLM_ORT_CALL mlp_compute(void* kernel, OrtKernelContext* context) {
  try {
    return compute_mlp(*static_cast<const MlpKernel*>(kernel), context);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, static_cast<const MlpKernel*>(kernel)->where + ": " + e.what());
  }
}

// ---------------------------------------------------------------------------------------------------------
// ai.edgellm::CachedAttention: GroupQueryAttention as edgellm's graphs use it (packed qkv, rotary not interleaved,
// no local window, KV cache buffers of fixed capacity bound in place as past and present), computed directly.
// Inputs: qkv [B, S, (H + 2 Hkv) D], past_key / past_value [B, Hkv, capacity, D], seqlens_k int32 [B] (the
// total length - 1 per sequence, as GroupQueryAttention takes it), cos_cache / sin_cache [positions, D/2].
// Outputs: [B, S, H D], present_key / present_value (the same buffers as past when bound so; copied if not).
// Attributes: num_heads H, kv_num_heads Hkv, scale. New keys/values go to positions total-S .. total-1.
struct AttentionKernel {
  std::string where;
  int64_t H = 0, Hkv = 0;
  float scale = 0.0f;
};

// num_heads, kv_num_heads and scale, checked, into `k` (CachedAttention's and Q8Layer's attributes).
OrtStatus* read_attention(const OrtKernelInfo* info, const std::string& where, const char* op, AttentionKernel* k) {
  const std::string needs = std::string(op) + " needs num_heads, kv_num_heads and scale (re-convert the model)";
  int64_t H = 0, Hkv = 0;
  float scale = 0.0f;
  if (OrtStatus* s = read_int(info, where, "num_heads", &H, needs.c_str())) return s;
  if (OrtStatus* s = read_int(info, where, "kv_num_heads", &Hkv, needs.c_str())) return s;
  if (OrtStatus* s = read_float(info, where, "scale", &scale, needs.c_str())) return s;
  if (H <= 0 || Hkv <= 0 || H % Hkv != 0 || !(scale > 0.0f))
    return error(ORT_INVALID_GRAPH, where + ": num_heads=" + std::to_string(H) + ", kv_num_heads=" + std::to_string(Hkv) +
                                        ", scale=" + std::to_string(scale) + " are invalid; num_heads must be a positive "
                                        "multiple of kv_num_heads and scale positive");
  k->where = where;
  k->H = H;
  k->Hkv = Hkv;
  k->scale = scale;
  return nullptr;
}

OrtStatus* create_attention(const OrtKernelInfo* info, void** out) {
  *out = nullptr;
  AttentionKernel parsed;
  if (OrtStatus* s = read_attention(info, node_where(info, "CachedAttention"), "CachedAttention", &parsed)) return s;
  AttentionKernel* kernel = new (std::nothrow) AttentionKernel(parsed);
  if (!kernel) return error(ORT_FAIL, parsed.where + ": out of memory");
  *out = kernel;
  return nullptr;
}

struct AttentionTask {
  const AttentionKernel* k;
  const float *qkv, *cos, *sin;
  float *keys, *values, *out;
  int64_t S, D, capacity, past, rows;  // one batch row at a time
};

void attend_task(void* data, size_t index) {
  const AttentionTask& t = *static_cast<const AttentionTask*>(data);
  const int64_t i = (int64_t)index / t.k->H, h = (int64_t)index % t.k->H;  // query row, head
  const int64_t pos = t.past + i, g = h / (t.k->H / t.k->Hkv), width = (t.k->H + 2 * t.k->Hkv) * t.D;
  thread_local std::vector<float> scratch;
  if ((int64_t)scratch.size() < pos + 1 + t.D) scratch.resize((size_t)(pos + 1 + t.D));
  float* q = scratch.data() + pos + 1;
  std::memcpy(q, t.qkv + i * width + h * t.D, sizeof(float) * (size_t)t.D);
  edgellm_rotary(q, t.D, t.cos + pos * (t.D / 2), t.sin + pos * (t.D / 2));
  edgellm_attend(q, t.keys + g * t.capacity * t.D, t.values + g * t.capacity * t.D, pos + 1, t.D, t.k->scale,
                 scratch.data(), t.out + i * t.k->H * t.D + h * t.D);
}

// One call's attention operands, checked: qkv [B, S, (H + 2 Hkv) D], the caches [B, Hkv, capacity, D] (past as
// fed, present as written: the same memory when bound in place), seqlens_k [B], cos / sin [positions, D/2], y [B, S, H D].
struct AttentionCall {
  int64_t B = 0, S = 0, D = 0, capacity = 0, positions = 0;
  const float *qkv = nullptr, *past_key = nullptr, *past_value = nullptr, *cos = nullptr, *sin = nullptr;
  float *keys = nullptr, *values = nullptr, *y = nullptr;
  const int32_t* seqlens = nullptr;
};

// The shapes of qkv (its dims) and of past_key, past_value, seqlens_k, cos, sin (`rest`) against the attributes.
OrtStatus* check_attention(const AttentionKernel& k, const std::vector<int64_t>& qd, const TensorShape rest[5],
                           AttentionCall* call) {
  const std::vector<int64_t>& kd = rest[0].dims;
  if (qd.size() != 3 || kd.size() != 4 || kd[1] != k.Hkv || rest[1].dims != kd || qd[0] != kd[0] ||
      qd[2] != (k.H + 2 * k.Hkv) * kd[3] || rest[2].elements() != kd[0] || rest[3].dims.size() != 2 ||
      rest[3].dims[1] * 2 != kd[3] || rest[4].dims != rest[3].dims)
    return error(ORT_INVALID_ARGUMENT, k.where + ": shapes qkv " + dims_text(qd) + ", past " + dims_text(kd) +
                                           ", seqlens_k " + dims_text(rest[2].dims) + ", cos " +
                                           dims_text(rest[3].dims) + " do not fit num_heads=" + std::to_string(k.H) +
                                           ", kv_num_heads=" + std::to_string(k.Hkv) + "; re-convert the model");
  call->B = qd[0];
  call->S = qd[1];
  call->D = kd[3];
  call->capacity = kd[2];
  call->positions = rest[3].dims[0];
  return nullptr;
}

// Every sequence's total length against the cache and rotary table, before anything is written.
OrtStatus* check_lengths(const AttentionKernel& k, const AttentionCall& c) {
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t total = (int64_t)c.seqlens[b] + 1, past = total - c.S;
    if (past < 0 || total > c.capacity || total > c.positions)
      return error(ORT_INVALID_ARGUMENT, k.where + ": sequence " + std::to_string(b) + " has total length " +
                                             std::to_string(total) + " for " + std::to_string(c.S) +
                                             " new tokens; it must be at least that and at most the cache (" +
                                             std::to_string(c.capacity) + ") and rotary table (" +
                                             std::to_string(c.positions) + ") sizes");
  }
  return nullptr;
}

// Present starts as past where the caches are not bound in place.
void start_present(const AttentionKernel& k, const AttentionCall& c) {
  const size_t cache_bytes = sizeof(float) * (size_t)(c.B * k.Hkv * c.capacity * c.D);
  if (c.keys != c.past_key) std::memcpy(c.keys, c.past_key, cache_bytes);
  if (c.values != c.past_value) std::memcpy(c.values, c.past_value, cache_bytes);
}

// Batch row b's new keys (rotated) and values into the caches; returns its heads' work (S * H items of attend_task).
AttentionTask store_new_kv(const AttentionKernel& k, const AttentionCall& c, int64_t b) {
  const int64_t S = c.S, D = c.D, capacity = c.capacity;
  const int64_t width = (k.H + 2 * k.Hkv) * D, past = (int64_t)c.seqlens[b] + 1 - S;
  const float* qkv = c.qkv + b * S * width;
  float* keys = c.keys + b * k.Hkv * capacity * D;
  float* values = c.values + b * k.Hkv * capacity * D;
  for (int64_t i = 0; i < S; ++i)
    for (int64_t g = 0; g < k.Hkv; ++g) {
      float* key = keys + (g * capacity + past + i) * D;
      std::memcpy(key, qkv + i * width + (k.H + g) * D, sizeof(float) * (size_t)D);
      edgellm_rotary(key, D, c.cos + (past + i) * (D / 2), c.sin + (past + i) * (D / 2));
      std::memcpy(values + (g * capacity + past + i) * D, qkv + i * width + (k.H + k.Hkv + g) * D,
                  sizeof(float) * (size_t)D);
    }
  return AttentionTask{&k, qkv, c.cos, c.sin, keys, values, c.y + b * S * k.H * D, S, D, capacity, past, S};
}

// A decode step on a short context: its 9 tiny heads cost less on one thread than handed out.
bool attend_on_one_thread(const AttentionCall& c, int64_t b) {
  return c.S == 1 && (int64_t)c.seqlens[b] < attention_parallel_from();
}

// Writes the new keys and values into the caches, then y: each query row attends to the cache up to its position.
OrtStatus* attention_math(const AttentionKernel& k, OrtKernelContext* context, const AttentionCall& c) {
  if (OrtStatus* s = check_lengths(k, c)) return s;
  start_present(k, c);
  for (int64_t b = 0; b < c.B; ++b) {
    AttentionTask task = store_new_kv(k, c, b);
    const size_t items = (size_t)(c.S * k.H);
    if (attend_on_one_thread(c, b)) {
      for (size_t i = 0; i < items; ++i) attend_task(&task, i);
    } else if (OrtStatus* s = KernelContext_ParallelFor::get(g_api)(context, attend_task, items, 0, &task)) {
      return s;
    }
  }
  return nullptr;
}

// past_key, past_value, seqlens_k, cos, sin: inputs first .. first + 4, and their shapes.
OrtStatus* attention_operands(OrtKernelContext* context, size_t first, TensorShape rest[5], const OrtValue* values[5]) {
  for (size_t i = 0; i < 5; ++i) {
    if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, first + i, &values[i])) return s;
    if (OrtStatus* s = shape_of(values[i], &rest[i])) return s;
  }
  return nullptr;
}

// Their data, and the present caches (outputs present_at, present_at + 1, shaped as past), into `c`.
OrtStatus* attention_data(OrtKernelContext* context, size_t present_at, const TensorShape rest[5],
                          const OrtValue* const values[5], AttentionCall* c) {
  OrtValue *pk = nullptr, *pv = nullptr;
  const std::vector<int64_t>& kd = rest[0].dims;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, present_at, kd.data(), 4, &pk)) return s;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, present_at + 1, kd.data(), 4, &pv)) return s;
  void* p[5] = {nullptr};
  for (size_t i = 0; i < 5; ++i)
    if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(values[i]), &p[i])) return s;
  void *kd_out = nullptr, *vd_out = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(pk, &kd_out)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(pv, &vd_out)) return s;
  c->past_key = static_cast<const float*>(p[0]);
  c->past_value = static_cast<const float*>(p[1]);
  c->seqlens = static_cast<const int32_t*>(p[2]);
  c->cos = static_cast<const float*>(p[3]);
  c->sin = static_cast<const float*>(p[4]);
  c->keys = static_cast<float*>(kd_out);
  c->values = static_cast<float*>(vd_out);
  return nullptr;
}

OrtStatus* compute_attention(const AttentionKernel& k, OrtKernelContext* context) {
  const OrtValue* qkv = nullptr;
  TensorShape qs, rest[5];
  const OrtValue* values[5] = {nullptr};
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, 0, &qkv)) return s;
  if (OrtStatus* s = shape_of(qkv, &qs)) return s;
  if (OrtStatus* s = attention_operands(context, 1, rest, values)) return s;
  AttentionCall c;
  if (OrtStatus* s = check_attention(k, qs.dims, rest, &c)) return s;
  std::vector<int64_t> out_dims = {c.B, c.S, k.H * c.D};
  OrtValue* y = nullptr;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, 0, out_dims.data(), 3, &y)) return s;
  if (OrtStatus* s = attention_data(context, 1, rest, values, &c)) return s;
  void *q_data = nullptr, *y_data = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(qkv), &q_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(y, &y_data)) return s;
  c.qkv = static_cast<const float*>(q_data);
  c.y = static_cast<float*>(y_data);
  return attention_math(k, context, c);
}

const char* EDGELLM_ORT_CALL attention_name(const OrtCustomOp*) { return "CachedAttention"; }
int EDGELLM_ORT_CALL attention_input_type(const OrtCustomOp*, size_t index) {
  return index == 3 ? EDGELLM_ORT_INT32 : EDGELLM_ORT_FLOAT;
}
size_t EDGELLM_ORT_CALL attention_input_count(const OrtCustomOp*) { return 6; }
size_t EDGELLM_ORT_CALL attention_output_count(const OrtCustomOp*) { return 3; }
void EDGELLM_ORT_CALL attention_destroy(void* kernel) { delete static_cast<AttentionKernel*>(kernel); }
OrtStatus* EDGELLM_ORT_CALL attention_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                             void** kernel) {
  try {
    return create_attention(info, kernel);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, std::string("CachedAttention: ") + e.what());
  }
}
OrtStatus* EDGELLM_ORT_CALL attention_compute(void* kernel, OrtKernelContext* context) {
  try {
    return compute_attention(*static_cast<const AttentionKernel*>(kernel), context);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, static_cast<const AttentionKernel*>(kernel)->where + ": " + e.what());
  }
}

// ---------------------------------------------------------------------------------------------------------
// ai.edgellm::Q8Layer: a whole decoder layer in one node (MatMulQ8 qkv, then CachedAttention, then Q8Mlp), so a
// decode step runs 30 nodes for SmolLM2-135M's layers instead of 90; onnxruntime spends ~5 us around each node,
// and the three nodes' inputs are looked up and checked once. Same math, same order: the logits are bit-identical
// to the three nodes'.
// Inputs: x [B, S, hidden] (the layer's normed input), residual [B, S, hidden], Wqkv, Sqkv, past_key, past_value,
// seqlens_k, cos_cache, sin_cache, Wo, So, gamma_post, Wgu, Sgu, Wd, Sd, gamma_next (as the three ops take them).
// Outputs: the next layer's normed input, the residual, present_key, present_value.
// Attributes: Q8Mlp's (hidden, intermediate, attn, eps_post, eps_next) and CachedAttention's (num_heads,
// kv_num_heads, scale).
struct LayerKernel {
  MlpKernel mlp;  // its weights (and the placed qkv) live in mlp.placed
  AttentionKernel attention;
  ConstantWeights qkv, wo, wgu, wd;  // when constant
  int64_t qkv_n = 0;                // (num_heads + 2 kv_num_heads) * head size
};

enum LayerInput : size_t { kX, kResidual, kWqkv, kSqkv, kPastKey, kPastValue, kSeqlens, kCos, kSin, kWo, kSo,
                           kGammaPost, kWgu, kSgu, kWd, kSd, kGammaNext, kLayerInputs };

OrtStatus* create_layer(const OrtKernelInfo* info, void** out) {
  *out = nullptr;
  const std::string where = node_where(info, "Q8Layer");
  LayerKernel* kernel = new (std::nothrow) LayerKernel;
  if (!kernel) return error(ORT_FAIL, where + ": out of memory");
  OrtStatus* s = read_mlp(info, where, "Q8Layer", &kernel->mlp);
  if (!s) s = read_attention(info, where, "Q8Layer", &kernel->attention);
  const MlpKernel& k = kernel->mlp;
  const int64_t heads = kernel->attention.H, kv_heads = kernel->attention.Hkv;
  if (!s && k.A % heads != 0)
    s = error(ORT_INVALID_GRAPH, where + ": attn=" + std::to_string(k.A) + " is not a multiple of num_heads=" +
                                     std::to_string(heads) + "; re-convert the model");
  if (!s) {
    kernel->qkv_n = (heads + 2 * kv_heads) * (k.A / heads);
    edgellm_arena::PlacedWeights& placed = kernel->mlp.placed;
    s = check_matrix(info, where, kWqkv, kernel->qkv_n, k.H, placed, &kernel->qkv);
    if (!s) s = check_matrix(info, where, kWo, k.H, k.A, placed, &kernel->wo);
    if (!s) s = check_matrix(info, where, kWgu, 2 * k.I, k.H, placed, &kernel->wgu);
    if (!s) s = check_matrix(info, where, kWd, k.H, k.I, placed, &kernel->wd);
  }
  if (s) {
    delete kernel;
    return s;
  }
  *out = kernel;
  return nullptr;
}

// Whether a decode step runs as one parallel region (EDGELLM_KERNEL_LAYER_REGION, default on; "0" hands out each
// matmul on its own, to measure what the region buys).
bool layer_region_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("EDGELLM_KERNEL_LAYER_REGION");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// One decode step of a Q8Layer (one row) as a single parallel region: onnxruntime's pool is handed the layer once
// instead of once per matmul (4 dispatches a layer, ~121 a token, each a wake-up and a join). The work is cut in
// phases (qkv, attention, o_proj, gate_up, down_proj); each phase's row ranges are claimed from an atomic counter,
// and a thread waits for a phase only after every unit of it has been claimed, by threads that are running it, so
// the region finishes however many of its items the pool runs at once (one thread alone does every unit). Each
// thread normalizes and quantizes a phase's one input row itself (576 to 1536 floats) rather than waiting for one
// to do it. Same kernels on the same rows in the same order: bit-identical to the matmul-at-a-time path.
struct LayerStep {
  enum Phase { kQkv, kAttend, kO, kGateUp, kDown, kPhases };
  const MlpKernel* k = nullptr;
  const AttentionKernel* attention = nullptr;
  const AttentionCall* call = nullptr;
  ConstantWeights w[kPhases];  // w[kAttend] unused
  int64_t K[kPhases] = {0}, N[kPhases] = {0}, tasks[kPhases] = {0};
  const void* x_quantized = nullptr;  // the layer's input row, quantized once before the region
  const float *residual = nullptr, *gamma_post = nullptr;
  float *qkv_out = nullptr, *attn = nullptr, *r = nullptr, *gate_up = nullptr, *down = nullptr;
  std::atomic<int64_t> claimed[kPhases], done[kPhases];

  float* out(int p) const {
    switch (p) {
      case kQkv: return qkv_out;
      case kO: return r;
      case kGateUp: return gate_up;
      default: return down;
    }
  }

  // Claims and runs phase p's units until none is left.
  void run(int p, const void* quantized) {
    for (int64_t i; (i = claimed[p].fetch_add(1, std::memory_order_relaxed)) < tasks[p];) {
      if (p == kAttend) {
        start_present(*attention, *call);
        AttentionTask task = store_new_kv(*attention, *call, 0);
        for (int64_t h = 0; h < attention->H; ++h) attend_task(&task, (size_t)h);
      } else {
        int64_t n0 = 0, n1 = 0;
        item_rows(N[p], tasks[p], i, &n0, &n1);
        if (n0 < n1) {
          Task t;
          t.scratch = quantized;
          t.M = 1;
          t.K = K[p];
          t.N = N[p];
          t.w = w[p];
          t.Y = out(p);
          run_range(t, n0, n1);
          if (p == kO)
            for (int64_t n = n0; n < n1; ++n) r[n] += residual[n];
        }
      }
      done[p].fetch_add(1, std::memory_order_release);
    }
  }

  void wait(int p) const {
    for (int spins = 0; done[p].load(std::memory_order_acquire) < tasks[p]; ++spins)
      if (spins < 4096) cpu_relax(); else std::this_thread::yield();
  }

  bool left(int p) const { return claimed[p].load(std::memory_order_relaxed) < tasks[p]; }

  // One item of the region: every phase in order, joining whatever work is left.
  void work() {
    thread_local std::vector<unsigned char> scratch;
    thread_local std::vector<float> row;
    if (row.size() < (size_t)std::max(k->H, k->I)) row.resize((size_t)std::max(k->H, k->I));
    run(kQkv, x_quantized);
    wait(kQkv);
    run(kAttend, nullptr);
    wait(kAttend);
    if (left(kO)) {
      quantize_for(w[kO], attn, 1, k->A, scratch);
      run(kO, scratch.data());
    }
    wait(kO);
    if (left(kGateUp)) {
      edgellm_rms_norm(r, gamma_post, k->eps_post, row.data(), k->H);
      quantize_for(w[kGateUp], row.data(), 1, k->H, scratch);
      run(kGateUp, scratch.data());
    }
    wait(kGateUp);
    if (left(kDown)) {
      edgellm_silu_mul(gate_up, gate_up + k->I, row.data(), k->I);
      quantize_for(w[kDown], row.data(), 1, k->I, scratch);
      run(kDown, scratch.data());
    }
  }
};

void layer_step_item(void* data, size_t) { static_cast<LayerStep*>(data)->work(); }

// The decode step (one row, attention on one thread) through LayerStep; writes out_norm and r, [hidden].
OrtStatus* layer_step(const LayerKernel& layer, OrtKernelContext* context, const AttentionCall& c,
                      const float* x, const float* residual, const ConstantWeights& qkv, const ConstantWeights& wo,
                      const ConstantWeights& wgu, const ConstantWeights& wd, const float* gamma_post,
                      const float* gamma_next, float* out_norm, float* r) {
  const MlpKernel& k = layer.mlp;
  thread_local std::vector<unsigned char> x_scratch;
  thread_local std::vector<float> work;
  const size_t floats = (size_t)(layer.qkv_n + 2 * k.I + k.H);
  if (work.size() < floats) work.resize(floats);
  quantize_for(qkv, x, 1, k.H, x_scratch);
  LayerStep step;
  step.k = &k;
  step.attention = &layer.attention;
  step.x_quantized = x_scratch.data();
  step.residual = residual;
  step.gamma_post = gamma_post;
  step.qkv_out = work.data();
  step.gate_up = work.data() + layer.qkv_n;
  step.down = step.gate_up + 2 * k.I;
  step.attn = c.y;
  step.r = r;
  const ConstantWeights weights[LayerStep::kPhases] = {qkv, ConstantWeights(), wo, wgu, wd};
  const int64_t K[LayerStep::kPhases] = {k.H, 0, k.A, k.H, k.I}, N[LayerStep::kPhases] = {layer.qkv_n, 0, k.H,
                                                                                          2 * k.I, k.H};
  for (int p = 0; p < LayerStep::kPhases; ++p) {
    step.w[p] = weights[p];
    step.K[p] = K[p];
    step.N[p] = N[p];
    step.tasks[p] = p == LayerStep::kAttend ? 1 : work_items(N[p]);
    step.claimed[p].store(0, std::memory_order_relaxed);
    step.done[p].store(0, std::memory_order_relaxed);
  }
  AttentionCall call = c;
  call.qkv = step.qkv_out;
  step.call = &call;
  if (OrtStatus* s = KernelContext_ParallelFor::get(g_api)(context, layer_step_item, (size_t)usable_cpus(), 0, &step))
    return s;
  for (int64_t i = 0; i < k.H; ++i) r[i] += step.down[i];
  edgellm_rms_norm(r, gamma_next, k.eps_next, out_norm, k.H);
  return nullptr;
}

OrtStatus* compute_layer(const LayerKernel& layer, OrtKernelContext* context) {
  const MlpKernel& k = layer.mlp;
  const OrtValue* x = nullptr;
  if (OrtStatus* s = KernelContext_GetInput::get(g_api)(context, kX, &x)) return s;
  TensorShape xs, rest[5];
  if (OrtStatus* s = shape_of(x, &xs)) return s;
  if (xs.dims.size() != 3 || xs.dims[2] != k.H)
    return error(ORT_INVALID_ARGUMENT, k.where + ": input x has shape " + dims_text(xs.dims) +
                                           "; it must be [batch, sequence, hidden = " + std::to_string(k.H) + "]");
  const int64_t M = xs.elements() / k.H;
  const OrtValue* cache[5] = {nullptr};
  if (OrtStatus* s = attention_operands(context, kPastKey, rest, cache)) return s;
  AttentionCall c;
  if (OrtStatus* s = check_attention(layer.attention, {xs.dims[0], xs.dims[1], layer.qkv_n}, rest, &c)) return s;
  void *x_data = nullptr, *residual = nullptr, *gamma_post = nullptr, *gamma_next = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(const_cast<OrtValue*>(x), &x_data)) return s;
  if (OrtStatus* s = input_data(context, kResidual, k, M * k.H, &residual)) return s;
  if (OrtStatus* s = input_data(context, kGammaPost, k, k.H, &gamma_post)) return s;
  if (OrtStatus* s = input_data(context, kGammaNext, k, k.H, &gamma_next)) return s;
  ConstantWeights qkv, wo, wgu, wd;  // as placed at load, or as fed at run time
  if (OrtStatus* s = matrix_at_call(context, k.where, kWqkv, layer.qkv_n, k.H, layer.qkv, &qkv)) return s;
  if (OrtStatus* s = matrix_at_call(context, k.where, kWo, k.H, k.A, layer.wo, &wo)) return s;
  if (OrtStatus* s = matrix_at_call(context, k.where, kWgu, 2 * k.I, k.H, layer.wgu, &wgu)) return s;
  if (OrtStatus* s = matrix_at_call(context, k.where, kWd, k.H, k.I, layer.wd, &wd)) return s;
  OrtValue *y_norm = nullptr, *y_res = nullptr;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, 0, xs.dims.data(), 3, &y_norm)) return s;
  if (OrtStatus* s = KernelContext_GetOutput::get(g_api)(context, 1, xs.dims.data(), 3, &y_res)) return s;
  if (OrtStatus* s = attention_data(context, 2, rest, cache, &c)) return s;
  void *norm_data = nullptr, *res_data = nullptr;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(y_norm, &norm_data)) return s;
  if (OrtStatus* s = GetTensorMutableData::get(g_api)(y_res, &res_data)) return s;

  thread_local std::vector<unsigned char> scratch;
  thread_local std::vector<float> work;  // qkv [M, qkv_n], then attention's output [M, attn]
  const size_t floats = (size_t)M * (size_t)(layer.qkv_n + k.A);
  if (work.size() < floats) work.resize(floats);
  float* qkv_out = work.data();
  float* attn = work.data() + (size_t)M * layer.qkv_n;
  if (M == 1 && usable_cpus() > 1 && layer_region_enabled() && attend_on_one_thread(c, 0)) {
    if (OrtStatus* s = check_lengths(layer.attention, c)) return s;
    c.y = attn;
    return layer_step(layer, context, c, static_cast<const float*>(x_data), static_cast<const float*>(residual),
                      qkv, wo, wgu, wd, static_cast<const float*>(gamma_post), static_cast<const float*>(gamma_next),
                      static_cast<float*>(norm_data), static_cast<float*>(res_data));
  }
  if (M > 0) {
    quantize_for(qkv, static_cast<const float*>(x_data), M, k.H, scratch);
    if (OrtStatus* s = parallel_matmul(context, scratch.data(), M, k.H, layer.qkv_n, qkv, qkv_out)) return s;
  }
  c.qkv = qkv_out;
  c.y = attn;
  if (OrtStatus* s = attention_math(layer.attention, context, c)) return s;
  if (M == 0) return nullptr;
  return mlp_math(k, context, M, attn, static_cast<const float*>(residual), wo, wgu, wd,
                  static_cast<const float*>(gamma_post), static_cast<const float*>(gamma_next),
                  static_cast<float*>(norm_data), static_cast<float*>(res_data));
}

const char* EDGELLM_ORT_CALL layer_name(const OrtCustomOp*) { return "Q8Layer"; }
int EDGELLM_ORT_CALL layer_input_type(const OrtCustomOp*, size_t index) {
  switch (index) {
    case kWqkv: case kWo: case kWgu: case kWd: return EDGELLM_ORT_UINT8;
    case kSqkv: case kSo: case kSgu: case kSd: return EDGELLM_ORT_FLOAT16;
    case kSeqlens: return EDGELLM_ORT_INT32;
    default: return EDGELLM_ORT_FLOAT;
  }
}
size_t EDGELLM_ORT_CALL layer_input_count(const OrtCustomOp*) { return kLayerInputs; }
size_t EDGELLM_ORT_CALL layer_output_count(const OrtCustomOp*) { return 4; }
void EDGELLM_ORT_CALL layer_destroy(void* kernel) { delete static_cast<LayerKernel*>(kernel); }
OrtStatus* EDGELLM_ORT_CALL layer_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  try {
    return create_layer(info, kernel);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, std::string("Q8Layer: ") + e.what());
  }
}
OrtStatus* EDGELLM_ORT_CALL layer_compute(void* kernel, OrtKernelContext* context) {
  try {
    return compute_layer(*static_cast<const LayerKernel*>(kernel), context);
  } catch (const std::exception& e) {
    return error(ORT_FAIL, static_cast<const LayerKernel*>(kernel)->mlp.where + ": " + e.what());
  }
}

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = EDGELLM_ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = op_input_type;
  op.GetInputTypeCount = op_input_count;
  op.GetOutputType = op_output_type;
  op.GetOutputTypeCount = op_output_count;
  op.KernelDestroy = op_destroy;
  op.GetInputCharacteristic = op_required;
  op.GetOutputCharacteristic = op_required;
  op.GetInputMemoryType = op_memory_type;
  op.GetVariadicInputMinArity = op_one;
  op.GetVariadicInputHomogeneity = op_one;
  op.GetVariadicOutputMinArity = op_one;
  op.GetVariadicOutputHomogeneity = op_one;
  op.CreateKernelV2 = op_create;
  op.KernelComputeV2 = op_compute;
  op.GetStartVersion = op_start_version;
  op.GetEndVersion = op_end_version;
  return op;
}

const OrtCustomOp g_op = make_op();

OrtCustomOp make_mlp_op() {
  OrtCustomOp op = make_op();
  op.GetName = mlp_name;
  op.GetInputType = mlp_input_type;
  op.GetInputTypeCount = mlp_input_count;
  op.GetOutputTypeCount = mlp_output_count;
  op.KernelDestroy = mlp_destroy;
  op.CreateKernelV2 = mlp_create;
  op.KernelComputeV2 = mlp_compute;
  return op;
}

const OrtCustomOp g_mlp_op = make_mlp_op();

OrtCustomOp make_attention_op() {
  OrtCustomOp op = make_op();
  op.GetName = attention_name;
  op.GetInputType = attention_input_type;
  op.GetInputTypeCount = attention_input_count;
  op.GetOutputTypeCount = attention_output_count;
  op.KernelDestroy = attention_destroy;
  op.CreateKernelV2 = attention_create;
  op.KernelComputeV2 = attention_compute;
  return op;
}

const OrtCustomOp g_attention_op = make_attention_op();

OrtCustomOp make_layer_op() {
  OrtCustomOp op = make_op();
  op.GetName = layer_name;
  op.GetInputType = layer_input_type;
  op.GetInputTypeCount = layer_input_count;
  op.GetOutputTypeCount = layer_output_count;
  op.KernelDestroy = layer_destroy;
  op.CreateKernelV2 = layer_create;
  op.KernelComputeV2 = layer_compute;
  return op;
}

const OrtCustomOp g_layer_op = make_layer_op();

// The domain outlives every session (onnxruntime keeps a pointer to it), so it is made once, never freed.
std::once_flag g_domain_once;
OrtCustomOpDomain* g_domain = nullptr;
OrtStatus* make_domain() {
  OrtStatus* s = CreateCustomOpDomain::get(g_api)("ai.edgellm", &g_domain);
  if (!s) s = CustomOpDomain_Add::get(g_api)(g_domain, &g_op);
  if (!s) s = CustomOpDomain_Add::get(g_api)(g_domain, &g_mlp_op);
  if (!s) s = CustomOpDomain_Add::get(g_api)(g_domain, &g_attention_op);
  if (!s) s = CustomOpDomain_Add::get(g_api)(g_domain, &g_layer_op);
  if (s) g_domain = nullptr;
  return s;
}

}  // namespace

extern "C" {

// The entry point SessionOptions.register_custom_ops_library calls.
EDGELLM_EXPORT OrtStatus* EDGELLM_ORT_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(EDGELLM_ORT_API_VERSION);
  if (!api) {
    // Every version has CreateStatus at slot 0: use the oldest table to say why we cannot load.
    const OrtApi* oldest = base->GetApi(1);
    if (!oldest) return nullptr;  // cannot even report; onnxruntime this old does not exist in practice
    const std::string message = std::string("libedgellm_ortops needs onnxruntime >= 1.17 (C API version 17); this is ") +
                                "onnxruntime " + base->GetVersionString() +
                                ": upgrade onnxruntime or set EDGELLM_KERNELS=0";
    return CreateStatus::get(oldest)(ORT_FAIL, message.c_str());
  }
  OrtStatus* created = nullptr;
  std::call_once(g_domain_once, [&] {  // kernels running in other sessions read g_api: it is written once
    g_api = api;
    created = make_domain();
  });
  if (created) return created;
  if (!g_domain) return error(ORT_FAIL, "libedgellm_ortops: the ai.edgellm domain could not be created earlier");
  return AddCustomOpDomain::get(g_api)(options, g_domain);
}

}  // extern "C"
