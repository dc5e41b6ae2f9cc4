/* module.c — the CPython extension `lorafuse._C`: its entry points (lora_forward, lora_backward,
 * merge, dropout, pack_weight, the thread / ISA / output-cache settings; sgemm and hgemm are in hgemm.c,
 * the 4-bit storage in quant.c), the method table
 * and the module's life cycle. Argument conversion and checks are in args.c, the pool, Ctrl-C and
 * status-to-exception plumbing around a kernel call in runtime.c.
 *
 * Each entry point: parse arguments, validate every array (type, dtype, ndim, shapes against
 * each other, alignment, writability and aliasing of outputs), allocate missing outputs,
 * release the GIL, call kernels/, and map a nonzero status to a Python exception.
 * Inputs may be any float32 ndarray (any strides, negative included: the kernels read through
 * strides) or any object with __dlpack__ (e.g. a CPU torch tensor), converted zero-copy.
 * Outputs must be C-contiguous, aligned, writable float32 arrays that overlap no input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "args.h"
#include "dlpack_in.h"
#include "half.h"
#include "out_cache.h"
#include "runtime.h"

#include "lorafuse/kernels.h"

#ifndef LORAFUSE_VERSION
#define LORAFUSE_VERSION "0.0.0"
#endif

static lf_state *state_of(PyObject *module) { return (lf_state *)PyModule_GetState(module); }

/* 1 if a call whose x (g) has dtype dt goes to half.c: dt half precision, or float32 on a half or quantized
 * W ('mixed'). Else 0, and *oW is W converted once (kept in L) for the float32 path to read. */
static int goes_to_half(lf_state *st, lf_py_arr_list *L, lf_dtype dt, PyObject **oW) {
    if (dt != LF_DT_F32) return 1;
    lf_dtype wdt;
    PyArrayObject *w_arr;
    const int half = lf_py_half_weight(st, *oW, &wdt, &w_arr);
    if (!w_arr) return half;
    if (!lf_py_keep(L, w_arr)) /* the kept list is full (it holds only x here): read oW again below */
        PyErr_Clear();
    else if (!half)
        *oW = (PyObject *)w_arr;
    return half;
}

/* ---------------------------------------------------------------- packed weights */

static void packed_capsule_free(PyObject *cap) {
    lf_packed_weight_free(PyCapsule_GetPointer(cap, LF_PY_PACKED_NAME));
}

PyDoc_STRVAR(pack_weight_doc,
"pack_weight(W, fan_in_fan_out=False, for_backward=False) -> (packed, nbytes)\n\n"
"W (m, k) — (k, m) if fan_in_fan_out — packed into the GEMM panels lora_forward (for_backward\n"
"False) or lora_backward's dx (True) would pack on every call, for the current ISA. Pass it as\n"
"packed_w while W is unchanged; it keeps no reference to W and must not outlive W's contents.");

static PyObject *py_pack_weight(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "pack_weight";
    static char *kwlist[] = {"W", "fan_in_fan_out", "for_backward", NULL};
    PyObject *oW;
    int fifo = 0, for_backward = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|pp:pack_weight", kwlist, &oW, &fifo, &for_backward)) return NULL;
    lf_state *st = state_of(self);
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *W;
    lf_packed_b *pw = NULL;
    if (!(W = lf_py_keep(&L, lf_py_as_f32(st, oW, F, "W"))) ||
        lf_py_check_ndim(F, "W", W, 2, fifo ? "(k, m)" : "(m, k)"))
        goto fail;
    {
        npy_intp m, k;
        const lf_view vW = lf_py_weight_view(W, fifo, &m, &k);
        int status;
        Py_BEGIN_ALLOW_THREADS status = lf_pack_weight(vW, m, k, for_backward, &pw);
        Py_END_ALLOW_THREADS
        if (status) {
            lf_py_raise_status(status, F);
            goto fail;
        }
    }
    PyObject *cap = PyCapsule_New(pw, LF_PY_PACKED_NAME, packed_capsule_free);
    if (!cap) {
        lf_packed_weight_free(pw);
        goto fail;
    }
    lf_py_drop_all(&L);
    return Py_BuildValue("(Nn)", cap, (Py_ssize_t)lf_packed_weight_bytes(pw));
fail:
    lf_py_drop_all(&L);
    return NULL;
}

/* ---------------------------------------------------------------- lora_forward */

PyDoc_STRVAR(lora_forward_doc,
"lora_forward(x, W, A, B, scale, bias=None, out=None, u_out=None, dropout_p=0.0, seed=0,\n"
"             fan_in_fan_out=False, need_u=True, packed_w=None, plan=None) -> (y, u)\n\n"
"y = x·Wᵀ + bias + scale·(x̃·Aᵀ)·Bᵀ, u = x̃·Aᵀ. x (..., k); W (m, k) or (k, m) if fan_in_fan_out;\n"
"A (r, k); B (m, r); bias (m,). Returns y (..., m) and u (..., r), or (y, None) when need_u is\n"
"false (inference: u_out must then be None). packed_w: pack_weight(W, fan_in_fan_out) or None.\n"
"plan: (u_path, y_path) to run instead of the kernels' choice (see last_forward_plan), or None.");

static PyObject *py_lora_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "lora_forward";
    static char *kwlist[] = {"x", "W", "A", "B", "scale", "bias", "out", "u_out", "dropout_p",
                             "seed", "fan_in_fan_out", "need_u", "packed_w", "plan", NULL};
    PyObject *ox, *oW, *oA, *oB, *oscale, *obias = Py_None, *oy = Py_None, *ou = Py_None;
    PyObject *op = NULL, *oseed = NULL, *opacked = Py_None, *oplan = Py_None;
    int fifo = 0, need_u = 1;
    lf_forward_plan force;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|OOOOOppOO:lora_forward", kwlist, &ox, &oW, &oA, &oB, &oscale,
                                     &obias, &oy, &ou, &op, &oseed, &fifo, &need_u, &opacked, &oplan) ||
        (oplan != Py_None && lf_py_parse_forward_plan(oplan, F, &force)))
        return NULL;
    if (!need_u && ou != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: u_out given with need_u=False", F);
        return NULL;
    }
    lf_state *st = state_of(self);
    float scale, p = 0.0f;
    uint64_t seed = 0;
    if (lf_py_parse_scalars(oscale, op, oseed, F, &scale, &p, &seed)) return NULL;
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *x, *W, *A, *B, *bias = NULL, *y = NULL, *u = NULL, *x2, *y2, *u2 = NULL;
    lf_dtype xdt;
    if (!(x = lf_py_keep(&L, lf_py_as_typed(st, ox, F, "x", &xdt))) || lf_py_check_ndim(F, "x", x, 0, "(..., k)"))
        goto fail;
    if (goes_to_half(st, &L, xdt, &oW)) { /* a bf16 / fp16 or quantized base: half.c */
        const lf_py_forward_call call = {F, oW, oA, oB, obias, oy, ou, opacked, oplan, scale, p, seed, fifo, need_u,
                                         oplan != Py_None ? &force : NULL, NULL};
        PyObject *res = lf_py_lora_forward_half(st, &L, x, xdt, &call);
        lf_py_drop_all(&L);
        return res;
    }
    const npy_intp k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    npy_intp m, r;
    const lf_packed_b *pw;
    if (lf_py_parse_weights(st, F, &L, oW, oA, oB, fifo, k, &W, &A, &B, &m, &r) ||
        lf_py_parse_packed(opacked, F, W, fifo, 0, &pw))
        goto fail;
    if (obias != Py_None) {
        if (!(bias = lf_py_keep(&L, lf_py_as_f32(st, obias, F, "bias"))) ||
            lf_py_check_ndim(F, "bias", bias, 1, "(m,)") ||
            lf_py_check_dim(F, "bias", "(m,) with m from W", bias, 0, m))
            goto fail;
        if (!PyArray_IS_C_CONTIGUOUS(bias) &&
            !(bias = lf_py_keep(&L, (PyArrayObject *)PyArray_NewCopy(bias, NPY_CORDER))))
            goto fail;
    }
    y = lf_py_keep(&L, oy == Py_None ? lf_py_new_output(st, x, m) : lf_py_check_output(st, oy, F, "out", x, 0, m));
    if (need_u)
        u = lf_py_keep(&L, ou == Py_None ? lf_py_new_output(st, x, r)
                                         : lf_py_check_output(st, ou, F, "u_out", x, 0, r));
    if (!y || (need_u && !u)) goto fail;
    {
        PyArrayObject *ins[] = {x, W, A, B, bias};
        const char *names[] = {"x", "W", "A", "B", "bias"};
        if (lf_py_check_no_alias(F, "out", y, ins, names, 5) ||
            (u && lf_py_check_no_alias(F, "u_out", u, ins, names, 5)))
            goto fail;
        if (lf_py_overlaps(y, u)) {
            PyErr_Format(PyExc_ValueError, "%s: out and u_out overlap in memory", F);
            goto fail;
        }
    }
    if (!(x2 = lf_py_keep(&L, lf_py_flatten_2d(x, k))) || !(x2 = lf_py_keep(&L, lf_py_contiguous_if(x2, p > 0.0f))) ||
        !(y2 = lf_py_keep(&L, lf_py_flatten_2d(y, m))) || (u && !(u2 = lf_py_keep(&L, lf_py_flatten_2d(u, r)))))
        goto fail;
    {
        const npy_intp n = PyArray_DIM(x2, 0);
        const lf_view vx = lf_py_view2(x2), vW = lf_py_weight_view(W, fifo, NULL, NULL), vA = lf_py_view2(A),
                      vB = lf_py_view2(B);
        const float *pb = bias ? (const float *)PyArray_DATA(bias) : NULL;
        float *py = (float *)PyArray_DATA(y2), *pu = u ? (float *)PyArray_DATA(u2) : NULL;
        if (oplan != Py_None &&
            lf_py_plan_unfit(F, oplan, lf_forward_plan_unfit(force, n, r, vx, vW, vA, vB, p, need_u)))
            goto fail;
        lf_py_sigint_guard guard;
        lf_pool *pool = lf_py_kernel_begin(st, 2.0 * (double)n * (double)(k + r) * (double)m, &guard);
        int status;
        lf_forward_plan plan = {LF_U_NONE, LF_Y_MERGED};
        Py_BEGIN_ALLOW_THREADS status = lf_lora_forward_f32(pool, n, k, m, r, vx, vW, pb, vA, vB, scale, p, seed,
                                                            py, pu, pw, oplan != Py_None ? &force : NULL, &plan);
        Py_END_ALLOW_THREADS
        if (lf_py_kernel_end(st, &guard, status, F)) goto fail;
        st->last_forward_plan = plan;
        st->has_forward_plan = 1;
    }
    PyObject *res = PyTuple_Pack(2, (PyObject *)y, u ? (PyObject *)u : Py_None);
    lf_py_drop_all(&L);
    return res;
fail:
    lf_py_drop_all(&L);
    return NULL;
}

/* ---------------------------------------------------------------- lora_backward */

PyDoc_STRVAR(lora_backward_doc,
"lora_backward(g, x, u, W, A, B, scale, need_dx=True, dropout_p=0.0, seed=0, fan_in_fan_out=False,\n"
"              dx_out=None, dA_out=None, dB_out=None, packed_w=None, plan=None) -> (dx or None, dA, dB)\n\n"
"Adapter-only gradients: v = g·B, dB = scale·gᵀ·u, dA = scale·vᵀ·x̃, dx = g·W + scale·drop'(v·A).\n"
"packed_w: pack_weight(W, fan_in_fan_out, for_backward=True) or None. plan: (v_dB_path, dA_path,\n"
"dx_path) to run instead of the kernels' choice (see last_backward_plan), or None.");

static PyObject *py_lora_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "lora_backward";
    static char *kwlist[] = {"g", "x", "u", "W", "A", "B", "scale", "need_dx", "dropout_p", "seed",
                             "fan_in_fan_out", "dx_out", "dA_out", "dB_out", "packed_w", "plan", NULL};
    PyObject *og, *ox, *ou, *oW, *oA, *oB, *oscale, *op = NULL, *oseed = NULL;
    PyObject *odx = Py_None, *odA = Py_None, *odB = Py_None, *opacked = Py_None, *oplan = Py_None;
    int need_dx = 1, fifo = 0;
    lf_backward_plan force;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO|pOOpOOOOO:lora_backward", kwlist, &og, &ox, &ou, &oW, &oA,
                                     &oB, &oscale, &need_dx, &op, &oseed, &fifo, &odx, &odA, &odB, &opacked, &oplan) ||
        (oplan != Py_None && lf_py_parse_backward_plan(oplan, F, &force)))
        return NULL;
    lf_state *st = state_of(self);
    float scale, p = 0.0f;
    uint64_t seed = 0;
    if (lf_py_parse_scalars(oscale, op, oseed, F, &scale, &p, &seed)) return NULL;
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *g, *x, *u, *W, *A, *B, *dx = NULL, *dA, *dB, *g2, *x2, *u2, *dx2 = NULL;
    lf_dtype gdt;
    if (!(g = lf_py_keep(&L, lf_py_as_typed(st, og, F, "g", &gdt))) || lf_py_check_ndim(F, "g", g, 0, "(..., m)"))
        goto fail;
    if (goes_to_half(st, &L, gdt, &oW)) { /* a bf16 / fp16 or quantized base: half.c */
        const lf_py_backward_call call = {F, ox, ou, oW, oA, oB, odx, odA, odB, opacked, oplan, scale, p, seed, fifo,
                                          need_dx, oplan != Py_None ? &force : NULL, NULL, NULL, 0};
        PyObject *res = lf_py_lora_backward_half(st, &L, g, gdt, &call);
        lf_py_drop_all(&L);
        return res;
    }
    if (!(x = lf_py_keep(&L, lf_py_as_f32(st, ox, F, "x"))) || lf_py_check_ndim(F, "x", x, 0, "(..., k)")) goto fail;
    if (!(u = lf_py_keep(&L, lf_py_as_f32(st, ou, F, "u"))) || lf_py_check_ndim(F, "u", u, 0, "(..., r)")) goto fail;
    const npy_intp k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    npy_intp m, r;
    const lf_packed_b *pw;
    if (lf_py_parse_weights(st, F, &L, oW, oA, oB, fifo, k, &W, &A, &B, &m, &r) ||
        lf_py_parse_packed(opacked, F, W, fifo, 1, &pw))
        goto fail;
    if (lf_py_check_lead_dims(F, g, x, u, m, r)) goto fail;
    if (need_dx) {
        dx = lf_py_keep(&L, odx == Py_None ? lf_py_new_output(st, x, k)
                                           : lf_py_check_output(st, odx, F, "dx_out", x, 0, k));
        if (!dx) goto fail;
    }
    dA = lf_py_keep(&L, odA == Py_None ? lf_py_new_2d(st, r, k)
                                       : lf_py_check_output(st, odA, F, "dA_out", NULL, r, k));
    dB = lf_py_keep(&L, odB == Py_None ? lf_py_new_2d(st, m, r)
                                       : lf_py_check_output(st, odB, F, "dB_out", NULL, m, r));
    if (!dA || !dB) goto fail;
    {
        PyArrayObject *ins[] = {g, x, u, W, A, B};
        const char *names[] = {"g", "x", "u", "W", "A", "B"};
        PyArrayObject *outs[] = {dx, dA, dB};
        const char *onames[] = {"dx_out", "dA_out", "dB_out"};
        for (int i = 0; i < 3; i++) {
            if (outs[i] && lf_py_check_no_alias(F, onames[i], outs[i], ins, names, 6)) goto fail;
            for (int j = i + 1; j < 3; j++)
                if (outs[i] && outs[j] && lf_py_overlaps(outs[i], outs[j])) {
                    PyErr_Format(PyExc_ValueError, "%s: outputs %s and %s overlap in memory", F,
                                 onames[i], onames[j]);
                    goto fail;
                }
        }
    }
    if (!(g2 = lf_py_keep(&L, lf_py_flatten_2d(g, m))) || !(x2 = lf_py_keep(&L, lf_py_flatten_2d(x, k))) ||
        !(x2 = lf_py_keep(&L, lf_py_contiguous_if(x2, p > 0.0f))) || !(u2 = lf_py_keep(&L, lf_py_flatten_2d(u, r))))
        goto fail;
    if (dx && !(dx2 = lf_py_keep(&L, lf_py_flatten_2d(dx, k)))) goto fail;
    {
        const npy_intp n = PyArray_DIM(x2, 0);
        const lf_view vg = lf_py_view2(g2), vx = lf_py_view2(x2), vu = lf_py_view2(u2),
                      vW = lf_py_weight_view(W, fifo, NULL, NULL), vA = lf_py_view2(A), vB = lf_py_view2(B);
        float *pdx = dx2 ? (float *)PyArray_DATA(dx2) : NULL;
        float *pdA = (float *)PyArray_DATA(dA), *pdB = (float *)PyArray_DATA(dB);
        if (oplan != Py_None &&
            lf_py_plan_unfit(F, oplan, lf_backward_plan_unfit(force, r, vg, vx, vu, p, need_dx)))
            goto fail;
        lf_py_sigint_guard guard;
        lf_pool *pool = lf_py_kernel_begin(st, 2.0 * (double)n * (double)(m + r) * (double)(k + r), &guard);
        int status;
        lf_backward_plan plan = {LF_VB_SKINNY, LF_DA_SKINNY, LF_DX_NONE};
        Py_BEGIN_ALLOW_THREADS status = lf_lora_backward_f32(pool, n, k, m, r, vg, vx, vu, vW, vA, vB, scale, p,
                                                             seed, pdx, pdA, pdB, pw, oplan != Py_None ? &force : NULL, &plan);
        Py_END_ALLOW_THREADS
        if (lf_py_kernel_end(st, &guard, status, F)) goto fail;
        st->last_backward_plan = plan;
        st->has_backward_plan = 1;
    }
    PyObject *res = PyTuple_Pack(3, dx ? (PyObject *)dx : Py_None, (PyObject *)dA, (PyObject *)dB);
    lf_py_drop_all(&L);
    return res;
fail:
    lf_py_drop_all(&L);
    return NULL;
}

/* ---------------------------------------------------------------- merge */

PyDoc_STRVAR(merge_doc,
"merge(W, A, B, scale, fan_in_fan_out=False)\n\n"
"In place: W += scale·B·A, or Wᵀ (stored (k, m)) += scale·(B·A)ᵀ when fan_in_fan_out.\n"
"Pass -scale to unmerge.");

static PyObject *py_merge(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "merge";
    static char *kwlist[] = {"W", "A", "B", "scale", "fan_in_fan_out", NULL};
    PyObject *oW, *oA, *oB, *oscale;
    int fifo = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|p:merge", kwlist, &oW, &oA, &oB, &oscale, &fifo))
        return NULL;
    lf_state *st = state_of(self);
    float scale;
    if (lf_py_parse_scale(oscale, F, "scale", &scale)) return NULL;
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *A, *B, *W;
    if (!(A = lf_py_keep(&L, lf_py_as_f32(st, oA, F, "A"))) || lf_py_check_ndim(F, "A", A, 2, "(r, k)")) goto fail;
    if (!(B = lf_py_keep(&L, lf_py_as_f32(st, oB, F, "B"))) || lf_py_check_ndim(F, "B", B, 2, "(m, r)")) goto fail;
    const npy_intp r = PyArray_DIM(A, 0), k = PyArray_DIM(A, 1), m = PyArray_DIM(B, 0);
    if (lf_py_check_dim(F, "B", "(m, r) with r = A.shape[0]", B, 1, r)) goto fail;
    if (!(W = lf_py_keep(&L, lf_py_check_output(st, oW, F, "W", NULL, fifo ? k : m, fifo ? m : k)))) goto fail;
    {
        PyArrayObject *ins[] = {A, B};
        const char *names[] = {"A", "B"};
        if (lf_py_check_no_alias(F, "W", W, ins, names, 2)) goto fail;
    }
    {
        /* W (m,k) += s·B·A   or   Wᵀ (k,m) += s·Aᵀ·Bᵀ */
        lf_view vA = lf_py_view2(A), vB = lf_py_view2(B);
        lf_view left = fifo ? (lf_view){vA.p, vA.cs, vA.rs} : vB;
        lf_view right = fifo ? (lf_view){vB.p, vB.cs, vB.rs} : vA;
        const npy_intp M = fifo ? k : m, N = fifo ? m : k;
        float *pw = (float *)PyArray_DATA(W);
        lf_py_sigint_guard guard;
        lf_pool *pool = lf_py_kernel_begin(st, 0.0, &guard);
        int status;
        Py_BEGIN_ALLOW_THREADS status = lf_sgemm(pool, M, N, r, scale, left, right, 1.0f, NULL, pw, N);
        Py_END_ALLOW_THREADS
        if (lf_py_kernel_end(st, &guard, status, F)) goto fail;
    }
    lf_py_drop_all(&L);
    Py_RETURN_NONE;
fail:
    lf_py_drop_all(&L);
    return NULL;
}

/* ---------------------------------------------------------------- dropout */

PyDoc_STRVAR(dropout_doc,
"dropout(x, dropout_p, seed) -> x̃\n\n"
"x̃ = x ⊙ mask / (1-p) with the exact counter-based mask the LoRA kernels regenerate.");

static PyObject *py_dropout(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "dropout";
    static char *kwlist[] = {"x", "dropout_p", "seed", NULL};
    PyObject *ox, *op, *oseed;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:dropout", kwlist, &ox, &op, &oseed)) return NULL;
    lf_state *st = state_of(self);
    float p;
    uint64_t seed;
    if (lf_py_parse_dropout(op, oseed, F, &p, &seed)) return NULL;
    PyArrayObject *x = lf_py_as_f32(st, ox, F, "x"), *xc = NULL, *out = NULL;
    if (!x) return NULL;
    if (lf_py_check_ndim(F, "x", x, 2, "(n, k)") || !(xc = lf_py_contiguous_if(x, 1))) goto done;
    out = lf_py_new_2d(st, PyArray_DIM(xc, 0), PyArray_DIM(xc, 1));
    if (!out) goto done;
    {
        const npy_intp n = PyArray_DIM(xc, 0), k = PyArray_DIM(xc, 1);
        const float *px = (const float *)PyArray_DATA(xc);
        float *po = (float *)PyArray_DATA(out);
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = lf_dropout_f32(n, k, px, p, seed, po);
        Py_END_ALLOW_THREADS
        if (status) {
            lf_py_raise_status(status, F);
            Py_CLEAR(out);
        }
    }
done:
    Py_XDECREF(x);
    Py_XDECREF(xc);
    return (PyObject *)out;
}

/* ---------------------------------------------------------------- threads and ISA */

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg) {
    lf_state *st = state_of(self);
    const long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) return PyErr_Format(PyExc_ValueError, "set_num_threads: n must be in [1, 1024], got %ld", n);
    if (lf_py_pool_resize(st, (int)n)) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(lf_pool_threads(lf_py_pool(state_of(self))));
}

static PyObject *py_threading_backend(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    lf_state *st = state_of(self);
    return PyUnicode_FromString(lf_pool_uses_openmp(lf_py_pool(st)) ? "openmp (the process's libgomp, e.g. torch's)"
                                                                : "pthreads (lorafuse's own workers)");
}

/* ---------------------------------------------------------------- kept output blocks */

static PyObject *py_set_output_cache_limit(PyObject *self, PyObject *arg) {
    if (!PyLong_Check(arg) || PyBool_Check(arg))
        return PyErr_Format(PyExc_TypeError, "set_output_cache_limit: max_bytes must be an int, got %s",
                            Py_TYPE(arg)->tp_name);
    int overflow;
    const long long n = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (overflow || n < 0)
        return PyErr_Format(PyExc_ValueError, "set_output_cache_limit: max_bytes must be in [0, 2**63), got %R", arg);
    return PyLong_FromSize_t(lf_out_cache_set_limit(state_of(self)->outs, (size_t)n));
}

static PyObject *py_output_cache_stats(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    const lf_out_cache_stats s = lf_out_cache_get_stats(state_of(self)->outs);
    return Py_BuildValue("{s:n,s:n,s:l,s:n,s:l,s:L,s:L}", "limit", (Py_ssize_t)s.limit, "held_bytes",
                         (Py_ssize_t)s.held_bytes, "held_blocks", s.held_blocks, "lent_bytes", (Py_ssize_t)s.lent_bytes,
                         "lent_blocks", s.lent_blocks, "hits", s.hits, "misses", s.misses);
}

static int isa_from_name(const char *name, lf_isa *out) {
    for (*out = LF_ISA_GENERIC; *out <= LF_ISA_AMX_BF16; (*out)++)
        if (!strcmp(name, lf_isa_name(*out))) return 0;
    return -1;
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyUnicode_Check(arg))
        return PyErr_Format(PyExc_TypeError, "set_isa: expected a str, got %s", Py_TYPE(arg)->tp_name);
    lf_isa isa;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (isa_from_name(name, &isa))
        return PyErr_Format(PyExc_ValueError, "set_isa: expected 'generic', 'avx2', 'avx512', 'avx512_bf16' or 'amx_bf16', got %R", arg);
    if (lf_set_isa(isa))
        return PyErr_Format(PyExc_ValueError, "set_isa: this CPU does not support %s (best: %s)", name,
                            lf_isa_name(lf_cpu_best_isa()));
    Py_RETURN_NONE;
}

static PyObject *py_get_isa(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    (void)self;
    return PyUnicode_FromString(lf_isa_name(lf_get_isa()));
}

static PyObject *py_cpu_isa(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    (void)self;
    return PyUnicode_FromString(lf_isa_name(lf_cpu_best_isa()));
}

static PyMethodDef methods[] = {
    {"lora_forward", (PyCFunction)(void (*)(void))py_lora_forward, METH_VARARGS | METH_KEYWORDS, lora_forward_doc},
    {"last_forward_plan", lf_py_last_forward_plan, METH_NOARGS, lf_py_last_forward_plan_doc},
    {"last_backward_plan", lf_py_last_backward_plan, METH_NOARGS, lf_py_last_backward_plan_doc},
    {"clear_last_plans", lf_py_clear_last_plans, METH_NOARGS, lf_py_clear_last_plans_doc},
    {"lora_backward", (PyCFunction)(void (*)(void))py_lora_backward, METH_VARARGS | METH_KEYWORDS, lora_backward_doc},
    {"merge", (PyCFunction)(void (*)(void))py_merge, METH_VARARGS | METH_KEYWORDS, merge_doc},
    {"pack_weight", (PyCFunction)(void (*)(void))py_pack_weight, METH_VARARGS | METH_KEYWORDS, pack_weight_doc},
    LF_PY_GEMM_METHODS, /* sgemm, hgemm, hgemm_path (hgemm.c) */
    LF_PY_DORA_METHODS, /* dora_forward, dora_backward, dora_grad_scale (dora.c) */
    LF_PY_QUANT_METHODS, /* dequant_4bit, quant_4bit, double_quant, quant_tables (quant.c) */
    LF_PY_Q4GEMM_METHODS, /* q4gemm, q4gemm_path (quant.c) */
    {"dropout", (PyCFunction)(void (*)(void))py_dropout, METH_VARARGS | METH_KEYWORDS, dropout_doc},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads used by the kernels."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"threading_backend", py_threading_backend, METH_NOARGS,
     "threading_backend() -> where parallel regions run: the loaded OpenMP runtime or pthreads"},
    {"set_output_cache_limit", py_set_output_cache_limit, METH_O,
     "set_output_cache_limit(max_bytes) -> old limit: most bytes of freed output blocks kept for reuse (0: none)."},
    {"output_cache_stats", py_output_cache_stats, METH_NOARGS,
     "output_cache_stats() -> dict: limit, held/lent bytes and blocks, hits, misses."},
    {"set_isa", py_set_isa, METH_O, "set_isa(name): force 'generic', 'avx2', 'avx512', 'avx512_bf16' or 'amx_bf16'."},
    {"get_isa", py_get_isa, METH_NOARGS, "get_isa() -> the micro-kernel ISA in use"},
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "cpu_isa() -> the best ISA this CPU supports"},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m) {
    lf_state *st = state_of(m);
    st->pool = lf_pool_create(1);
    st->outs = lf_out_cache_new(LF_OUT_CACHE_DEFAULT_BYTES);
    if (!st->pool || !st->outs) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *sig = PyImport_ImportModule("signal"), *thr = PyImport_ImportModule("threading");
    if (!sig || !thr) {
        Py_XDECREF(sig);
        Py_XDECREF(thr);
        return -1;
    }
    st->getsignal = PyObject_GetAttrString(sig, "getsignal");
    st->default_int_handler = PyObject_GetAttrString(sig, "default_int_handler");
    PyObject *main = PyObject_CallMethod(thr, "main_thread", NULL);
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    Py_DECREF(sig);
    Py_DECREF(thr);
    Py_XDECREF(main);
    if (!st->getsignal || !st->default_int_handler || !ident) {
        Py_XDECREF(ident);
        return -1;
    }
    st->main_thread = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    if (PyErr_Occurred()) return -1;
    if (PyModule_AddIntConstant(m, "interruptible", 1)) return -1;
    return PyModule_AddStringConstant(m, "__version__", LORAFUSE_VERSION);
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    lf_state *st = state_of(m);
    if (st) {
        Py_VISIT(st->dlpack.tensor_type);
        Py_VISIT(st->dlpack.to_dlpack);
        Py_VISIT(st->getsignal);
        Py_VISIT(st->default_int_handler);
    }
    return 0;
}

static int module_clear(PyObject *m) {
    lf_state *st = state_of(m);
    if (st) {
        lf_dlpack_exporters_clear(&st->dlpack);
        Py_CLEAR(st->getsignal);
        Py_CLEAR(st->default_int_handler);
    }
    return 0;
}

static void module_free(void *mp) {
    lf_state *st = state_of((PyObject *)mp);
    if (!st) return;
    module_clear((PyObject *)mp);
    lf_pool_destroy(st->pool);
    lf_pool_destroy(st->retired);
    st->pool = st->retired = NULL;
    lf_out_cache_release(st->outs); /* blocks still lent out free themselves when their arrays die */
    st->outs = NULL;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, module_exec}, {0, NULL}};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "lorafuse._C", "lorafuse C kernels (fp32 CPU)", sizeof(lf_state),
    methods, slots, module_traverse, module_clear, module_free,
};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    return PyModuleDef_Init(&moduledef);
}
