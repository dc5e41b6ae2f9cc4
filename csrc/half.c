/* half.c — lora_forward and lora_backward of lorafuse._C on a bf16 / fp16 base (kernels.h
 * lf_lora_forward_half / lf_lora_backward_half): module.c parses the call and comes here when x (g
 * in the backward) is half precision.
 *
 * Inputs: torch tensors (bfloat16 or float16 through DLPack, viewed in place) or NumPy float16
 * arrays — or x and g float32 with W a quantized weight's handle (_C.q4_weight, _C.q8_weight; 'mixed',
 * lora_half.c); the adapters A and B float32 or the base's dtype, bias float32 or the base's dtype; any
 * strides. Results are new NumPy arrays: y and dx in the base's dtype, dA and dB in the adapters',
 * u float32 — bfloat16 ones as uint16 arrays of the bits (NumPy has no bfloat16: the caller views
 * them, torch.from_numpy(a).view(torch.bfloat16)). out=, dx_out=, dA_out=, dB_out= and packed_w
 * are fp32-only features: given with a half base they are refused with ValueError.
 * dora_forward / dora_backward (module.c) come here with DoRA's column scale col_scale (m,) float32: x, g
 * half, A and B float32; the forward also returns z̃ (..., m) float32, the backward dc (m,) float32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "args.h"
#include "half.h"

/* New reference to operand `name` (ndim 2) converted and checked to be of dtype `want`, or of
 * `want` or float32 when alt_f32; NULL with TypeError / ValueError */
static PyArrayObject *typed_arg(lf_state *st, lf_py_arr_list *L, const char *F, PyObject *obj, const char *name,
                                int ndim, const char *shape, lf_dtype want, int alt_f32, lf_dtype *dt) {
    PyArrayObject *a = lf_py_keep(L, lf_py_as_typed(st, obj, F, name, dt));
    if (!a || lf_py_check_ndim(F, name, a, ndim, shape)) return NULL;
    if (*dt != want && !(alt_f32 && *dt == LF_DT_F32)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be %s%s with a %s base, got %s", F, name, lf_py_dtype_name(want),
                     alt_f32 ? " or float32" : "", lf_py_dtype_name(want), lf_py_dtype_name(*dt));
        return NULL;
    }
    return a;
}

int lf_py_half_weight(lf_state *st, PyObject *oW, lf_dtype *dt, PyArrayObject **arr) {
    lf_tview t;
    int64_t rows, cols;
    if (arr) *arr = NULL;
    if (lf_py_qweight_handle(oW, &t, &rows, &cols)) {
        *dt = t.dtype;
        return 1;
    }
    PyArrayObject *w = lf_py_as_typed(st, oW, "W", "W", dt);
    if (!w) {
        PyErr_Clear(); /* not an array: the caller's own parsing names what is wrong */
        return 0;
    }
    if (arr)
        *arr = w;
    else
        Py_DECREF(w);
    return *dt == LF_DT_BF16 || *dt == LF_DT_F16;
}

/* W (m, k) — (k, m) with fan_in_fan_out —, A (r, k), B (m, r): W of the base's dtype (or a quantized
 * weight's handle, _C.q4_weight / q8_weight, its elements of the base's dtype), A and B one dtype (float32
 * or the base's); a float32 x (g) on a half or quantized W: mixed, the base's dtype W's. -1 with the
 * exception set */
static int parse_weights(lf_state *st, lf_py_arr_list *L, const char *F, PyObject *oW, PyObject *oA, PyObject *oB,
                         int fifo, npy_intp k, lf_dtype xdt, lf_tview *W, lf_tview *A, lf_tview *B, npy_intp *m,
                         npy_intp *r) {
    lf_dtype dw, da, db, wdt = xdt;
    PyArrayObject *w = NULL, *a, *b;
    int64_t qw_rows = 0, qw_cols = 0;
    const int qw = lf_py_qweight_handle(oW, W, &qw_rows, &qw_cols);
    const lf_dtype base = xdt == LF_DT_F32 && lf_py_half_weight(st, oW, &wdt, NULL) ? wdt : xdt; /* mixed */
    if (qw && fifo) {
        PyErr_Format(PyExc_ValueError,
                     "%s: a quantized W is (out_features, in_features) as stored: fan_in_fan_out must be False", F);
        return -1;
    }
    if (qw && W->dtype != base) {
        PyErr_Format(PyExc_TypeError,
                     "%s: the quantized W's elements are %s but x is %s: make the handle with dtype=x's dtype", F,
                     lf_py_dtype_name(W->dtype), lf_py_dtype_name(base));
        return -1;
    }
    if (qw && qw_cols != k) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the quantized W must be (m, k) with k = x.shape[-1] = %ld, got (%ld, %ld)", F, (long)k,
                     (long)qw_rows, (long)qw_cols);
        return -1;
    }
    *m = (npy_intp)qw_rows; /* a dense W's m comes from lf_py_check_weight_dims */
    if ((!qw && !(w = typed_arg(st, L, F, oW, "W", 2, fifo ? "(k, m)" : "(m, k)", base, 0, &dw))) ||
        !(a = typed_arg(st, L, F, oA, "A", 2, "(r, k)", base, 1, &da)) ||
        !(b = typed_arg(st, L, F, oB, "B", 2, "(m, r)", base, 1, &db)))
        return -1;
    if (da != db) {
        PyErr_Format(PyExc_TypeError, "%s: A and B must have one dtype, got A %s and B %s", F, lf_py_dtype_name(da),
                     lf_py_dtype_name(db));
        return -1;
    }
    if (base != xdt && da != LF_DT_F32) {
        PyErr_Format(PyExc_TypeError, "%s: with a float32 x on a half or quantized W the adapters must be float32, got %s", F,
                     lf_py_dtype_name(da));
        return -1;
    }
    if (lf_py_check_weight_dims(F, w, a, b, fifo, k, m, r)) return -1;
    if (!qw) *W = lf_py_tview2(w, base);
    if (fifo) *W = (lf_tview){W->p, W->cs, W->rs, base, NULL};
    *A = lf_py_tview2(a, da);
    *B = lf_py_tview2(b, db);
    return 0;
}

/* -1 with ValueError if an fp32-only argument was given */
static int refuse_given(const char *F, PyObject *const *objs, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (objs[i] != Py_None) {
            PyErr_Format(PyExc_ValueError, "%s: %s is not taken with a bfloat16 / float16 base (float32 only); pass None",
                         F, names[i]);
            return -1;
        }
    return 0;
}

/* A new C-contiguous array: lead dims of `like` (NULL: none) then `last` — dims d0 (when like is
 * NULL) — of dtype dt (bfloat16 as uint16 bits) */
static PyArrayObject *new_typed(PyArrayObject *like, npy_intp d0, npy_intp last, lf_dtype dt) {
    npy_intp dims[NPY_MAXDIMS];
    int nd = 2;
    if (like) {
        nd = PyArray_NDIM(like);
        for (int d = 0; d < nd - 1; d++) dims[d] = PyArray_DIM(like, d);
    } else {
        dims[0] = d0;
    }
    dims[nd - 1] = last;
    const int type = dt == LF_DT_F32 ? NPY_FLOAT32 : dt == LF_DT_BF16 ? NPY_UINT16 : NPY_FLOAT16;
    return (PyArrayObject *)PyArray_SimpleNew(nd, dims, type);
}

PyArrayObject *lf_py_dora_col_scale(lf_state *st, lf_py_arr_list *L, const char *F, PyObject *ocol, npy_intp m,
                                    const char *expected) {
    PyArrayObject *col = lf_py_keep(L, lf_py_as_f32(st, ocol, F, "col_scale"));
    if (!col || lf_py_check_ndim(F, "col_scale", col, 1, "(m,)") || lf_py_check_dim(F, "col_scale", expected, col, 0, m))
        return NULL;
    return PyArray_IS_C_CONTIGUOUS(col) ? col : lf_py_keep(L, (PyArrayObject *)PyArray_NewCopy(col, NPY_CORDER));
}

PyArrayObject *lf_py_dora_z(lf_state *st, lf_py_arr_list *L, const char *F, PyObject *oz, PyArrayObject *g) {
    PyArrayObject *z = lf_py_keep(L, lf_py_as_f32(st, oz, F, "z"));
    if (!z) return NULL;
    if (!PyArray_SAMESHAPE(z, g)) {
        PyObject *gs = lf_py_shape_str(g), *zs = lf_py_shape_str(z);
        if (gs && zs) PyErr_Format(PyExc_ValueError, "%s: z must have g's shape %U, got %U", F, gs, zs);
        Py_XDECREF(gs);
        Py_XDECREF(zs);
        return NULL;
    }
    return lf_py_keep(L, lf_py_contiguous_if(z, 1));
}

/* DoRA's col_scale (m,) float32 as a C-contiguous array kept in L (lf_py_dora_col_scale), after checking that the
 * adapters are float32; NULL with TypeError / ValueError */
static PyArrayObject *col_scale_arg(lf_state *st, lf_py_arr_list *L, const char *F, PyObject *ocol, lf_tview A,
                                    npy_intp m) {
    if (A.dtype != LF_DT_F32) {
        PyErr_Format(PyExc_TypeError, "%s: A and B must be float32 (DoRA's fp32 adapters), got %s", F,
                     lf_py_dtype_name(A.dtype));
        return NULL;
    }
    return lf_py_dora_col_scale(st, L, F, ocol, m, "(m,) with m from W");
}

/* a forced plan's 'augmented' path with DoRA's column scale: -1 with ValueError */
static int refuse_augmented(const char *F, PyObject *oplan, int augmented) {
    return lf_py_plan_unfit(F, oplan, augmented ? "DoRA's base product is rounded alone: y 'split' or 'decode', "
                                                  "dx 'masked'" : NULL);
}

PyObject *lf_py_lora_forward_half(lf_state *st, lf_py_arr_list *L, PyArrayObject *x, lf_dtype xdt,
                                  const lf_py_forward_call *c) {
    const char *F = c->F;
    {
        PyObject *const given[] = {c->oy, c->opacked};
        const char *const names[] = {"out", "packed_w"};
        if (refuse_given(F, given, names, 2)) return NULL;
    }
    const npy_intp k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    npy_intp m, r;
    lf_tview W, A, B, bias = {NULL, 0, 1, LF_DT_F32, NULL};
    if (parse_weights(st, L, F, c->oW, c->oA, c->oB, c->fifo, k, xdt, &W, &A, &B, &m, &r)) return NULL;
    PyArrayObject *ab = NULL, *y, *u = NULL, *x2, *y2, *u2 = NULL;
    if (c->obias != Py_None) {
        lf_dtype dbias;
        if (!(ab = typed_arg(st, L, F, c->obias, "bias", 1, "(m,)", W.dtype, 1, &dbias)) ||
            lf_py_check_dim(F, "bias", "(m,) with m from W", ab, 0, m))
            return NULL;
        bias = (lf_tview){PyArray_DATA(ab), 0, PyArray_STRIDE(ab, 0) / PyArray_ITEMSIZE(ab), dbias, NULL};
    }
    PyArrayObject *col = NULL, *z = NULL;
    if (c->ocol && (!(col = col_scale_arg(st, L, F, c->ocol, A, m)) ||
                    (c->need_u && !(z = lf_py_keep(L, lf_py_new_output(st, x, m))))))
        return NULL;
    if (!(y = lf_py_keep(L, new_typed(x, 0, m, xdt)))) return NULL;
    if (c->need_u &&
        !(u = lf_py_keep(L, c->ou == Py_None ? lf_py_new_output(st, x, r)
                                              : lf_py_check_output(st, c->ou, F, "u_out", x, 0, r))))
        return NULL;
    if (u) {
        PyArrayObject *ins[] = {x, ab};
        const char *names[] = {"x", "bias"};
        if (lf_py_check_no_alias(F, "u_out", u, ins, names, ab ? 2 : 1)) return NULL;
    }
    const int mixed = xdt == LF_DT_F32; /* rows of a float32 x are narrowed in place: contiguous */
    if (!(x2 = lf_py_keep(L, lf_py_flatten_2d(x, k))) ||
        !(x2 = lf_py_keep(L, lf_py_contiguous_if(x2, c->p > 0.0f || mixed))) ||
        !(y2 = lf_py_keep(L, lf_py_flatten_2d(y, m))) || (u && !(u2 = lf_py_keep(L, lf_py_flatten_2d(u, r)))))
        return NULL;
    const npy_intp n = PyArray_DIM(x2, 0);
    const lf_tview vx = lf_py_tview2(x2, xdt);
    if (c->force && (lf_py_plan_unfit(F, c->oplan, lf_forward_plan_unfit_half(*c->force, n, vx, W, r)) ||
                     (col && refuse_augmented(F, c->oplan, c->force->y == LF_Y_AUGMENTED))))
        return NULL;
    const lf_col_scale cs = {col ? PyArray_DATA(col) : NULL, z ? PyArray_DATA(z) : NULL, NULL};
    lf_py_sigint_guard guard;
    lf_pool *pool = lf_py_kernel_begin(st, 2.0 * (double)n * (double)(k + r) * (double)m, &guard);
    lf_forward_plan plan = {LF_U_GEMM, LF_Y_SPLIT};
    int status;
    Py_BEGIN_ALLOW_THREADS status =
        lf_lora_forward_half(pool, n, k, m, r, vx, W, bias, A, B, c->scale, c->p, c->seed, col ? &cs : NULL,
                             PyArray_DATA(y2), u ? PyArray_DATA(u2) : NULL, c->force, &plan);
    Py_END_ALLOW_THREADS
    if (lf_py_kernel_end(st, &guard, status, F)) return NULL;
    st->last_forward_plan = plan;
    st->has_forward_plan = 1;
    PyObject *uo = u ? (PyObject *)u : Py_None;
    return col ? PyTuple_Pack(3, (PyObject *)y, uo, z ? (PyObject *)z : Py_None) : PyTuple_Pack(2, (PyObject *)y, uo);
}

PyObject *lf_py_lora_backward_half(lf_state *st, lf_py_arr_list *L, PyArrayObject *g, lf_dtype gdt,
                                   const lf_py_backward_call *c) {
    const char *F = c->F;
    {
        PyObject *const given[] = {c->odx, c->odA, c->odB, c->opacked};
        const char *const names[] = {"dx_out", "dA_out", "dB_out", "packed_w"};
        if (refuse_given(F, given, names, 4)) return NULL;
    }
    lf_dtype dt;
    PyArrayObject *x, *u, *dx = NULL, *dA, *dB, *g2, *x2, *u2, *dx2 = NULL;
    if (!(x = typed_arg(st, L, F, c->ox, "x", 0, "(..., k)", gdt, 0, &dt))) return NULL;
    if (!(u = lf_py_keep(L, lf_py_as_f32(st, c->ou, F, "u"))) || lf_py_check_ndim(F, "u", u, 0, "(..., r)"))
        return NULL;
    const npy_intp k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    npy_intp m, r;
    lf_tview W, A, B;
    if (parse_weights(st, L, F, c->oW, c->oA, c->oB, c->fifo, k, gdt, &W, &A, &B, &m, &r) ||
        lf_py_check_lead_dims(F, g, x, u, m, r))
        return NULL;
    PyArrayObject *col = NULL, *z = NULL, *dc = NULL;
    if (c->ocol) {
        const npy_intp dims1[1] = {m};
        if (!(col = col_scale_arg(st, L, F, c->ocol, A, m))) return NULL;
        if (c->need_dc) {
            if (!(z = lf_py_dora_z(st, L, F, c->oz, g)) ||
                !(dc = lf_py_keep(L, (PyArrayObject *)PyArray_SimpleNew(1, dims1, NPY_FLOAT32))))
                return NULL;
        }
    }
    if ((c->need_dx && !(dx = lf_py_keep(L, new_typed(x, 0, k, gdt)))) ||
        !(dA = lf_py_keep(L, new_typed(NULL, r, k, A.dtype))) || !(dB = lf_py_keep(L, new_typed(NULL, m, r, A.dtype))))
        return NULL;
    if (!(g2 = lf_py_keep(L, lf_py_flatten_2d(g, m))) || !(g2 = lf_py_keep(L, lf_py_contiguous_if(g2, gdt == LF_DT_F32))) ||
        !(x2 = lf_py_keep(L, lf_py_flatten_2d(x, k))) ||
        !(x2 = lf_py_keep(L, lf_py_contiguous_if(x2, c->p > 0.0f || gdt == LF_DT_F32))) ||
        !(u2 = lf_py_keep(L, lf_py_flatten_2d(u, r))) ||
        (dx && !(dx2 = lf_py_keep(L, lf_py_flatten_2d(dx, k)))))
        return NULL;
    const npy_intp n = PyArray_DIM(x2, 0);
    const lf_tview vg = lf_py_tview2(g2, gdt), vx = lf_py_tview2(x2, gdt);
    if (c->force &&
        (lf_py_plan_unfit(F, c->oplan, lf_backward_plan_unfit_half(*c->force, vg, vx, r, c->p, c->need_dx)) ||
         (col && refuse_augmented(F, c->oplan, c->force->dx == LF_DX_AUGMENTED))))
        return NULL;
    const lf_col_scale cs = {col ? PyArray_DATA(col) : NULL, z ? PyArray_DATA(z) : NULL, dc ? PyArray_DATA(dc) : NULL};
    lf_py_sigint_guard guard;
    lf_pool *pool = lf_py_kernel_begin(st, 2.0 * (double)n * (double)(m + r) * (double)(k + r), &guard);
    lf_backward_plan plan = {LF_VB_GEMM, LF_DA_GEMM, LF_DX_NONE};
    int status;
    Py_BEGIN_ALLOW_THREADS status = lf_lora_backward_half(
        pool, n, k, m, r, vg, vx, lf_py_view2(u2), W, A, B, c->scale, c->p, c->seed, col ? &cs : NULL,
        dx2 ? PyArray_DATA(dx2) : NULL, PyArray_DATA(dA), PyArray_DATA(dB), c->force, &plan);
    Py_END_ALLOW_THREADS
    if (lf_py_kernel_end(st, &guard, status, F)) return NULL;
    st->last_backward_plan = plan;
    st->has_backward_plan = 1;
    PyObject *dxo = dx ? (PyObject *)dx : Py_None;
    return col ? PyTuple_Pack(4, dxo, (PyObject *)dA, (PyObject *)dB, dc ? (PyObject *)dc : Py_None)
               : PyTuple_Pack(3, dxo, (PyObject *)dA, (PyObject *)dB);
}
