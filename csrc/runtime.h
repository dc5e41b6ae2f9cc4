/* runtime.h — run-time plumbing of lorafuse._C (runtime.c): the module state, the thread pool a
 * call holds while its kernel runs, the Ctrl-C guard around long kernels, and kernel statuses
 * turned into Python exceptions.
 *
 * An entry point (module.c) runs a kernel as
 *
 *     lf_py_sigint_guard guard;
 *     lf_pool *pool = lf_py_kernel_begin(st, flops, &guard);
 *     int status;
 *     Py_BEGIN_ALLOW_THREADS status = lf_...(pool, ...);
 *     Py_END_ALLOW_THREADS
 *     if (lf_py_kernel_end(st, &guard, status, F)) goto fail;
 *
 * Everything declared here is called with the GIL held.
 */
#ifndef LORAFUSE_RUNTIME_H
#define LORAFUSE_RUNTIME_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>

#include "dlpack_in.h"
#include "lorafuse/kernels.h"

struct lf_out_cache; /* out_cache.h (which needs NumPy's headers) */

/* The module's state (PyModule_GetState): one per module object. */
typedef struct {
    lf_pool *pool;
    int in_flight;     /* kernels running with the GIL released (read/written under the GIL) */
    lf_pool *retired;  /* a pool replaced while kernels were using it; freed when idle */
    lf_dlpack_exporters dlpack; /* torch's C exporter, found once torch is loaded */
    PyObject *getsignal, *default_int_handler; /* signal.getsignal, signal.default_int_handler */
    unsigned long main_thread;                 /* threading.main_thread().ident */
    struct lf_out_cache *outs;                 /* kept blocks for large outputs (out_cache.h) */
    lf_forward_plan last_forward_plan;         /* the plan of the last lora_forward (any thread) */
    int has_forward_plan;                      /* 0 until a lora_forward has run */
    lf_backward_plan last_backward_plan;       /* the plan of the last lora_backward (any thread) */
    int has_backward_plan;                     /* 0 until a lora_backward has run */
} lf_state;

/* Ctrl-C handling of one kernel call, on the caller's stack from lf_py_kernel_begin to
 * lf_py_kernel_end. */
typedef struct {
    int installed;
    struct sigaction prev;
    lf_cancel cancel; /* this call's token: bound to the calling thread, SIGINT's target when installed */
} lf_py_sigint_guard;

/* Before a kernel call: arm Ctrl-C for calls of at least `flops` work (see runtime.c) and take
 * the pool, valid until lf_py_kernel_end. Never fails. */
lf_pool *lf_py_kernel_begin(lf_state *st, double flops, lf_py_sigint_guard *g);

/* After the call, with the GIL back: give the pool back and disarm Ctrl-C. 0 on success; -1 with
 * the Python exception set when Ctrl-C arrived (KeyboardInterrupt) or status is nonzero. */
int lf_py_kernel_end(lf_state *st, lf_py_sigint_guard *g, int status, const char *func);

/* Sets the exception for a nonzero kernel status (LF_E*); always returns NULL. */
PyObject *lf_py_raise_status(int status, const char *func);

/* The module's pool, ready for this process: in a fork()'s child first given workers of its own (lf_pool_after_fork;
 * the parent's in-flight count and retired pool dropped). Every use of st->pool goes through it (GIL held). */
lf_pool *lf_py_pool(lf_state *st);

/* Replace the pool by one of n threads (n checked by the caller; the same size: nothing to do).
 * 0, or -1 with the exception set (a pool replaced earlier is still in use, out of memory). */
int lf_py_pool_resize(lf_state *st, int n);

/* _C.last_forward_plan() / last_backward_plan() / clear_last_plans() (plans.c): the paths the last kernel
 * calls took. */
extern const char lf_py_last_forward_plan_doc[], lf_py_last_backward_plan_doc[];
PyObject *lf_py_last_forward_plan(PyObject *module, PyObject *noargs);
PyObject *lf_py_last_backward_plan(PyObject *module, PyObject *noargs);
extern const char lf_py_clear_last_plans_doc[];
PyObject *lf_py_clear_last_plans(PyObject *module, PyObject *noargs);

/* _C.sgemm, hgemm, hgemm_path (hgemm.c): the GEMM core on its own, on fp32 or bf16 / fp16 operands,
 * and the path hgemm takes; LF_PY_GEMM_METHODS: their entries of the module's method table. */
extern const char lf_py_sgemm_doc[], lf_py_hgemm_doc[], lf_py_hgemm_path_doc[];
PyObject *lf_py_sgemm(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_hgemm(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_hgemm_path(PyObject *module, PyObject *args, PyObject *kw);
#define LF_PY_KW_METHOD(name) {#name, (PyCFunction)(void (*)(void))lf_py_##name, METH_VARARGS | METH_KEYWORDS, lf_py_##name##_doc}
#define LF_PY_GEMM_METHODS LF_PY_KW_METHOD(sgemm), LF_PY_KW_METHOD(hgemm), LF_PY_KW_METHOD(hgemm_path)
/* hgemm.c, shared with q4gemm (quant.c). lf_py_parse_alpha_beta: alpha, beta of a GEMM call (beta 0 or 1;
 * beta = 1 needs out and no bias); -1 with ValueError / TypeError. lf_py_gemm_run (args.h): c (M, N) =
 * beta·out + alpha·a·b (+ bias) for the views va (M, K), vb (K, N) — bias parsed, out made or checked (no
 * overlap with ins[0..nin) or bias), the kernel run — a new reference to c, or NULL with the exception set. */
int lf_py_parse_alpha_beta(const char *F, PyObject *oalpha, PyObject *obeta, PyObject *oc, PyObject *obias,
                           float *alpha, float *beta);

/* _C.dora_forward, dora_backward (dora.c): the half-base kernels with DoRA's column scale, and dora_grad_scale (the
 * float32 layer's pass over g); LF_PY_DORA_METHODS: their entries of the module's method table. */
extern const char lf_py_dora_forward_doc[], lf_py_dora_backward_doc[], lf_py_dora_grad_scale_doc[];
PyObject *lf_py_dora_forward(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_dora_backward(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_dora_grad_scale(PyObject *module, PyObject *args, PyObject *kw);
#define LF_PY_DORA_METHODS LF_PY_KW_METHOD(dora_forward), LF_PY_KW_METHOD(dora_backward), LF_PY_KW_METHOD(dora_grad_scale)

/* _C.dequant_4bit, quant_4bit, double_quant, quant_tables (quant.c): bitsandbytes' 4-bit weight storage
 * (lorafuse/quant.h); LF_PY_QUANT_METHODS: their entries of the module's method table. */
extern const char lf_py_dequant_4bit_doc[], lf_py_quant_4bit_doc[], lf_py_double_quant_doc[], lf_py_quant_tables_doc[];
PyObject *lf_py_dequant_4bit(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_quant_4bit(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_double_quant(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_quant_tables(PyObject *module, PyObject *noargs);
/* _C.q4gemm, q4gemm_path (quant.c): a GEMM on a 4-bit weight dequantized while packed; LF_PY_Q4GEMM_METHODS:
 * their entries of the module's method table. */
extern const char lf_py_q4gemm_doc[], lf_py_q4gemm_path_doc[];
PyObject *lf_py_q4gemm(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_q4gemm_path(PyObject *module, PyObject *args, PyObject *kw);
/* _C.q4_weight, q8_weight (qweight.c): a checked 4-bit / 8-bit weight as lora_forward / lora_backward's W.
 * lf_py_qweight_handle: 1 and *W the weight (rows, cols) as stored (rs = cols, cs = 1, .qw set; valid while
 * obj lives) if obj is such a handle, else 0. */
extern const char lf_py_q4_weight_doc[], lf_py_q8_weight_doc[];
PyObject *lf_py_q4_weight(PyObject *module, PyObject *args, PyObject *kw);
PyObject *lf_py_q8_weight(PyObject *module, PyObject *args, PyObject *kw);
int lf_py_qweight_handle(PyObject *obj, lf_tview *W, int64_t *rows, int64_t *cols);
#define LF_PY_Q4GEMM_METHODS LF_PY_KW_METHOD(q4gemm), LF_PY_KW_METHOD(q4gemm_path), LF_PY_KW_METHOD(q4_weight), \
    LF_PY_KW_METHOD(q8_weight)
#define LF_PY_QUANT_METHODS \
    LF_PY_KW_METHOD(dequant_4bit), LF_PY_KW_METHOD(quant_4bit), LF_PY_KW_METHOD(double_quant), \
    {"quant_tables", lf_py_quant_tables, METH_NOARGS, lf_py_quant_tables_doc}

/* plan= of lora_forward / lora_backward (plans.c): the tuple of path names as a plan. 0, or -1
 * with TypeError / ValueError set (not a tuple of the right length, an unknown name). */
int lf_py_parse_forward_plan(PyObject *obj, const char *func, lf_forward_plan *plan);
int lf_py_parse_backward_plan(PyObject *obj, const char *func, lf_backward_plan *plan);
/* -1 with ValueError naming the plan and `why` (lf_*_plan_unfit's sentence) when why != NULL, else 0. */
int lf_py_plan_unfit(const char *func, PyObject *obj, const char *why);

#endif
