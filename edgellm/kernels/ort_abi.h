/* The few parts of onnxruntime's C ABI that ort_op.cc uses, declared by edgellm.
 *
 * onnxruntime's C API (include/onnxruntime/core/session/onnxruntime_c_api.h, MIT License, Microsoft) is a
 * stable ABI: `OrtApi` is a table of function pointers that only ever grows at its end, and `OrtCustomOp` a
 * struct whose `version` field tells onnxruntime which of its (also append-only) callbacks exist. No
 * package we can install ships that header, so this file declares, in our own words, only what we call:
 * the table *indices* of our functions and the `OrtCustomOp` field order. Indices and layout were read from
 * the header of API version 29 (onnxruntime 1.29.0); every function we use exists since API version 17
 * (KernelContext_ParallelFor is the newest), so we request version 17 and load on onnxruntime >= 1.17.
 * tests/test_kernels.py runs every one of these functions inside real onnxruntime; scripts/check_ort_abi.py
 * re-checks every slot and field against a given onnxruntime_c_api.h (run it when adding a function).
 */
#ifndef EDGELLM_ORT_ABI_H
#define EDGELLM_ORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#define EDGELLM_ORT_CALL __stdcall
#define EDGELLM_EXPORT __declspec(dllexport)
#else
#define EDGELLM_ORT_CALL
#define EDGELLM_EXPORT __attribute__((visibility("default")))
#endif

extern "C" {

/* The API version we request and put in OrtCustomOp::version. */
#define EDGELLM_ORT_API_VERSION 17

/* Opaque handles: onnxruntime owns them; we only pass pointers around. */
struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;
struct OrtApi; /* really an array of function pointers; see OrtFn below */

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2, ORT_RUNTIME_EXCEPTION = 6, ORT_INVALID_GRAPH = 10 };

/* ONNXTensorElementDataType: the two we use. */
enum { EDGELLM_ORT_FLOAT = 1, EDGELLM_ORT_UINT8 = 2, EDGELLM_ORT_INT32 = 6, EDGELLM_ORT_FLOAT16 = 10 };
/* OrtCustomOpInputOutputCharacteristic and OrtMemType: the default of each. */
enum { EDGELLM_ORT_INPUT_OUTPUT_REQUIRED = 0 };
enum { EDGELLM_ORT_MEM_TYPE_DEFAULT = 0 };

struct OrtApiBase {
  const OrtApi*(EDGELLM_ORT_CALL* GetApi)(uint32_t version);  /* NULL when the runtime is older than `version` */
  const char*(EDGELLM_ORT_CALL* GetVersionString)(void);
};

/* OrtCustomOp, every field in onnxruntime's order (through API version 29). */
struct OrtCustomOp {
  uint32_t version;
  void*(EDGELLM_ORT_CALL* CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char*(EDGELLM_ORT_CALL* GetName)(const OrtCustomOp* op);
  const char*(EDGELLM_ORT_CALL* GetExecutionProviderType)(const OrtCustomOp* op);
  int(EDGELLM_ORT_CALL* GetInputType)(const OrtCustomOp* op, size_t index);
  size_t(EDGELLM_ORT_CALL* GetInputTypeCount)(const OrtCustomOp* op);
  int(EDGELLM_ORT_CALL* GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t(EDGELLM_ORT_CALL* GetOutputTypeCount)(const OrtCustomOp* op);
  void(EDGELLM_ORT_CALL* KernelCompute)(void* kernel, OrtKernelContext* context);
  void(EDGELLM_ORT_CALL* KernelDestroy)(void* kernel);
  int(EDGELLM_ORT_CALL* GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  int(EDGELLM_ORT_CALL* GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  int(EDGELLM_ORT_CALL* GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int(EDGELLM_ORT_CALL* GetVariadicInputMinArity)(const OrtCustomOp* op);
  int(EDGELLM_ORT_CALL* GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int(EDGELLM_ORT_CALL* GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int(EDGELLM_ORT_CALL* GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  /* since version 16 */
  OrtStatus*(EDGELLM_ORT_CALL* CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                               void** kernel);
  OrtStatus*(EDGELLM_ORT_CALL* KernelComputeV2)(void* kernel, OrtKernelContext* context);
  /* since version 17 */
  OrtStatus*(EDGELLM_ORT_CALL* InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int(EDGELLM_ORT_CALL* GetStartVersion)(const OrtCustomOp* op);
  int(EDGELLM_ORT_CALL* GetEndVersion)(const OrtCustomOp* op);
  /* since version 18 and 20: left NULL */
  size_t(EDGELLM_ORT_CALL* GetMayInplace)(int** input_index, int** output_index);
  void(EDGELLM_ORT_CALL* ReleaseMayInplace)(int* input_index, int* output_index);
  size_t(EDGELLM_ORT_CALL* GetAliasMap)(int** input_index, int** output_index);
  void(EDGELLM_ORT_CALL* ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

/* OrtApi: slot numbers (0-based positions in the table) and the signature of each function we call. */
namespace edgellm_ort {

template <size_t Index, typename Fn>
struct OrtFn {
  static Fn get(const OrtApi* api) { return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[Index]); }
};

using CreateStatus = OrtFn<0, OrtStatus*(EDGELLM_ORT_CALL*)(int code, const char* msg)>;
using GetErrorMessage = OrtFn<2, const char*(EDGELLM_ORT_CALL*)(const OrtStatus* status)>;
using CreateCustomOpDomain = OrtFn<26, OrtStatus*(EDGELLM_ORT_CALL*)(const char* domain, OrtCustomOpDomain** out)>;
using CustomOpDomain_Add = OrtFn<27, OrtStatus*(EDGELLM_ORT_CALL*)(OrtCustomOpDomain* domain, const OrtCustomOp* op)>;
using AddCustomOpDomain = OrtFn<28, OrtStatus*(EDGELLM_ORT_CALL*)(OrtSessionOptions* options, OrtCustomOpDomain* domain)>;
using GetTensorMutableData = OrtFn<51, OrtStatus*(EDGELLM_ORT_CALL*)(OrtValue* value, void** out)>;
using GetTensorElementType = OrtFn<60, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtTensorTypeAndShapeInfo* info, int* out)>;
using GetDimensionsCount = OrtFn<61, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtTensorTypeAndShapeInfo* info, size_t* out)>;
using GetDimensions = OrtFn<62, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims,
                                                           size_t dims_length)>;
using GetTensorTypeAndShape = OrtFn<65, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtValue* value,
                                                                     OrtTensorTypeAndShapeInfo** out)>;
using KernelInfoGetAttribute_float = OrtFn<85, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtKernelInfo* info,
                                                                         const char* name, float* out)>;
using KernelInfoGetAttribute_int64 = OrtFn<86, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtKernelInfo* info,
                                                                            const char* name, int64_t* out)>;
using KernelContext_GetInput = OrtFn<90, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtKernelContext* context, size_t index,
                                                                      const OrtValue** out)>;
using KernelContext_GetOutput = OrtFn<91, OrtStatus*(EDGELLM_ORT_CALL*)(OrtKernelContext* context, size_t index,
                                                                       const int64_t* dims, size_t dim_count,
                                                                       OrtValue** out)>;
using ReleaseStatus = OrtFn<93, void(EDGELLM_ORT_CALL*)(OrtStatus* status)>;
using ReleaseTensorTypeAndShapeInfo = OrtFn<99, void(EDGELLM_ORT_CALL*)(OrtTensorTypeAndShapeInfo* info)>;
/* since version 15 */
using KernelInfo_GetNodeName = OrtFn<244, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtKernelInfo* info, char* out,
                                                                       size_t* size)>;
using KernelInfoGetConstantInput_tensor = OrtFn<249, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtKernelInfo* info,
                                                                                  size_t index, int* is_constant,
                                                                                  const OrtValue** out)>;
/* since version 17 */
using KernelContext_ParallelFor = OrtFn<274, OrtStatus*(EDGELLM_ORT_CALL*)(const OrtKernelContext* context,
                                                                          void (*fn)(void*, size_t), size_t total,
                                                                          size_t num_batch, void* user_data)>;

}  // namespace edgellm_ort

#endif
