/* lorafuse — compile-time proof that kernels/cuda/cublaslt_decls.h matches the real <cublasLt.h>.
 * Compiled (never linked) by tests/test_cuda_build.py when the real header is available. */
#include <cstddef>
#include <type_traits>
#include <cublasLt.h>
#define LORAFUSE_DECLS_NAMESPACE lfdecls
#include "cublaslt_decls.h"

#define SAME(name) static_assert((int)(name) == (int)(lfdecls::name), #name " differs from <cublasLt.h>")
SAME(CUBLAS_STATUS_SUCCESS);
SAME(CUBLAS_STATUS_NOT_INITIALIZED);
SAME(CUBLAS_STATUS_ALLOC_FAILED);
SAME(CUBLAS_STATUS_INVALID_VALUE);
SAME(CUBLAS_STATUS_ARCH_MISMATCH);
SAME(CUBLAS_STATUS_MAPPING_ERROR);
SAME(CUBLAS_STATUS_EXECUTION_FAILED);
SAME(CUBLAS_STATUS_INTERNAL_ERROR);
SAME(CUBLAS_STATUS_NOT_SUPPORTED);
SAME(CUBLAS_STATUS_LICENSE_ERROR);
SAME(CUBLAS_OP_N);
SAME(CUBLAS_OP_T);
SAME(CUBLAS_OP_C);
SAME(CUBLAS_COMPUTE_32F);
SAME(CUBLAS_COMPUTE_32F_FAST_TF32);
SAME(CUBLASLT_MATMUL_DESC_SCALE_TYPE);
SAME(CUBLASLT_MATMUL_DESC_POINTER_MODE);
SAME(CUBLASLT_MATMUL_DESC_TRANSA);
SAME(CUBLASLT_MATMUL_DESC_TRANSB);
SAME(CUBLASLT_MATMUL_DESC_EPILOGUE);
SAME(CUBLASLT_MATMUL_DESC_BIAS_POINTER);
SAME(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE);
SAME(CUBLASLT_EPILOGUE_DEFAULT);
SAME(CUBLASLT_EPILOGUE_BIAS);
SAME(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES);
SAME(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES);
SAME(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES);
SAME(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES);
SAME(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES);

#define SAME_SIZE(T) static_assert(sizeof(T) == sizeof(lfdecls::T), "sizeof " #T " differs from <cublasLt.h>")
SAME_SIZE(cublasLtMatmulAlgo_t);
SAME_SIZE(cublasLtMatmulHeuristicResult_t);
SAME_SIZE(cublasStatus_t);
#define SAME_OFF(T, f) static_assert(offsetof(T, f) == offsetof(lfdecls::T, f), "offset of " #T "." #f " differs")
SAME_OFF(cublasLtMatmulHeuristicResult_t, algo);
SAME_OFF(cublasLtMatmulHeuristicResult_t, workspaceSize);
SAME_OFF(cublasLtMatmulHeuristicResult_t, state);
SAME_OFF(cublasLtMatmulHeuristicResult_t, wavesCount);
// the descriptors: pointers on both sides (the declarations' pointees are incomplete, their sizes the library's)
#define HANDLE(T) static_assert(std::is_pointer<T>::value && std::is_pointer<lfdecls::T>::value, #T " is no pointer")
HANDLE(cublasLtHandle_t);
HANDLE(cublasLtMatrixLayout_t);
HANDLE(cublasLtMatmulDesc_t);
HANDLE(cublasLtMatmulPreference_t);

int lorafuse_check_cublaslt_decls_dummy;
