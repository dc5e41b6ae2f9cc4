/* args.c — argument conversion and validation for lorafuse._C's entry points (declared in args.h).
 *
 * Inputs become float32 ndarrays (any strides; objects with __dlpack__ viewed in place, misaligned
 * ones copied); outputs are checked (C-contiguous, aligned, writable, shape) or allocated; shapes
 * are checked against each other with errors that name the argument and its expected shape;
 * outputs may not overlap inputs; the real-valued scalars, the dropout seed and pack_weight's
 * capsule are parsed. The arrays a call holds are kept in an lf_py_arr_list and dropped together.
 * A function that fails returns NULL or -1 with the Python exception set.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "args.h"
#include "dlpack_in.h"
#include "out_cache.h"
#include "lorafuse/validate.h"

#include <stdio.h>

/* ---------------------------------------------------------------- shape errors */

static const char *ndarray_type_name(PyObject *obj) { return Py_TYPE(obj)->tp_name; }

/* "(2, 3)" */
PyObject *lf_py_shape_str(PyArrayObject *a) {
    PyObject *t = PyTuple_New(PyArray_NDIM(a));
    if (!t) return NULL;
    for (int d = 0; d < PyArray_NDIM(a); d++)
        PyTuple_SET_ITEM(t, d, PyLong_FromSsize_t(PyArray_DIM(a, d)));
    PyObject *s = PyObject_Str(t);
    Py_DECREF(t);
    return s;
}

static void shape_error(const char *func, const char *name, const char *expected, PyArrayObject *a) {
    PyObject *s = lf_py_shape_str(a);
    if (s) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have shape %s, got %U", func, name, expected, s);
        Py_DECREF(s);
    }
}

/* ---------------------------------------------------------------- array conversion */

/* New reference to a float32 ndarray for obj, or NULL with TypeError naming `name`.
 * ndarrays are used as they are; objects with __dlpack__ (CPU torch tensors) are viewed in place
 * (dlpack_in.c). An output (`writable`) may not be a torch tensor that requires grad: writing
 * into it would bypass autograd. Misaligned inputs are copied (the kernels do aligned element
 * loads). */
static PyArrayObject *as_f32_arg(lf_state *st, PyObject *obj, const char *func, const char *name, int writable) {
    PyObject *arr = NULL;
    int kind;
    if (PyArray_Check(obj)) {
        Py_INCREF(obj);
        arr = obj;
    } else if ((kind = lf_dlpack_kind(&st->dlpack, obj)) != LF_DLPACK_NONE) {
        if (kind < 0) return NULL;
        int requires_grad = 0;
        arr = lf_array_from_dlpack(&st->dlpack, obj, kind, func, name, writable ? &requires_grad : NULL, NULL);
        if (!arr) return NULL;
        if (requires_grad) {
            Py_DECREF(arr);
            PyErr_Format(PyExc_TypeError, "%s: %s requires grad; outputs are written in place outside autograd "
                         "(pass a tensor that does not require grad)", func, name);
            return NULL;
        }
    } else {
        PyErr_Format(PyExc_TypeError,
                     "%s: %s must be a float32 numpy array or a CPU tensor with __dlpack__, got %s",
                     func, name, ndarray_type_name(obj));
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)arr;
    PyArray_Descr *d = PyArray_DESCR(a);
    if (d->type_num != NPY_FLOAT32 || PyArray_ISBYTESWAPPED(a)) {
        PyObject *ds = PyObject_Str((PyObject *)d);
        if (ds) {
            PyErr_Format(PyExc_TypeError, "%s: %s must be float32 (native byte order), got %U", func,
                         name, ds);
            Py_DECREF(ds);
        }
        Py_DECREF(arr);
        return NULL;
    }
    if (!PyArray_ISALIGNED(a)) {
        PyObject *c = PyArray_NewCopy(a, NPY_CORDER);
        Py_DECREF(arr);
        return (PyArrayObject *)c;
    }
    return a;
}

PyArrayObject *lf_py_as_f32(lf_state *st, PyObject *obj, const char *func, const char *name) {
    return as_f32_arg(st, obj, func, name, 0);
}

const char *lf_py_dtype_name(lf_dtype dt) {
    return dt == LF_DT_F32 ? "float32" : dt == LF_DT_BF16 ? "bfloat16" : dt == LF_DT_F16 ? "float16" : "unknown";
}

/* New reference to the ndarray of an input that may be float32, float16 or bfloat16 (hgemm's, a
 * half-precision LoRA layer's) and its dtype (*dt), or NULL with TypeError naming F and name.
 * bfloat16, which NumPy lacks, comes as a uint16 array of its bits (dlpack_in.c). */
PyArrayObject *lf_py_as_typed(lf_state *st, PyObject *obj, const char *F, const char *name, lf_dtype *dt) {
    PyObject *arr;
    int bf16 = 0, kind;
    if (PyArray_Check(obj)) {
        Py_INCREF(obj);
        arr = obj;
    } else if ((kind = lf_dlpack_kind(&st->dlpack, obj)) != LF_DLPACK_NONE) {
        if (kind < 0 || !(arr = lf_array_from_dlpack(&st->dlpack, obj, kind, F, name, NULL, &bf16))) return NULL;
    } else {
        PyErr_Format(PyExc_TypeError,
                     "%s: %s must be a float32 / float16 numpy array or a CPU tensor with __dlpack__ (float32, "
                     "float16 or bfloat16), got %s", F, name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)arr;
    const int type_num = PyArray_DESCR(a)->type_num;
    if (bf16) {
        *dt = LF_DT_BF16;
    } else if ((type_num == NPY_FLOAT32 || type_num == NPY_FLOAT16) && !PyArray_ISBYTESWAPPED(a)) {
        *dt = type_num == NPY_FLOAT32 ? LF_DT_F32 : LF_DT_F16;
    } else {
        PyObject *ds = PyObject_Str((PyObject *)PyArray_DESCR(a));
        if (ds) {
            PyErr_Format(PyExc_TypeError, "%s: %s must be float32, float16 or bfloat16 (native byte order), got %U",
                         F, name, ds);
            Py_DECREF(ds);
        }
        Py_DECREF(arr);
        return NULL;
    }
    if (!PyArray_ISALIGNED(a)) { /* the kernels read whole elements (and pairs of bf16 by memcpy) */
        PyObject *c = PyArray_NewCopy(a, NPY_CORDER);
        Py_DECREF(arr);
        return (PyArrayObject *)c;
    }
    return a;
}

/* The element strides (rs, cs) of a 2-D array, a size-1 dim's stride given its C-order value (cs = 1,
 * rs = cols·cs): such a stride is never used to address an element, NumPy's contiguity flags ignore it
 * (a (1, k) array of strides (4, 4) or (400, 4) is "C-contiguous", so lf_py_contiguous_if copies nothing)
 * and torch 2.6 and 2.7 export 1 there through DLPack (2.13: the C-order value), while the kernels test
 * x.rs == k for a packed row. */
static void strides2(PyArrayObject *a, int64_t *rs, int64_t *cs) {
    const npy_intp item = PyArray_ITEMSIZE(a);
    *cs = PyArray_DIM(a, 1) == 1 ? 1 : PyArray_STRIDE(a, 1) / item;
    *rs = PyArray_DIM(a, 0) == 1 ? PyArray_DIM(a, 1) * *cs : PyArray_STRIDE(a, 0) / item;
}

/* the kernel's view of a 2-D operand: strides in elements of its dtype */
lf_tview lf_py_tview2(PyArrayObject *a, lf_dtype dt) {
    lf_tview v = {PyArray_DATA(a), 0, 0, dt, NULL};
    strides2(a, &v.rs, &v.cs);
    return v;
}

/* the one overlap rule (lorafuse/validate.h) on the byte extents of two arrays */
static lf_extent array_extent(PyArrayObject *a) {
    return lf_strided_extent(PyArray_BYTES(a), PyArray_NDIM(a), PyArray_DIMS(a), PyArray_STRIDES(a),
                             PyArray_ITEMSIZE(a));
}

int lf_py_overlaps(PyArrayObject *a, PyArrayObject *b) {
    return a && b && lf_extents_overlap(array_extent(a), array_extent(b));
}

/* lf_view of a 2-D float32 array (strides in elements) */
lf_view lf_py_view2(PyArrayObject *a) {
    lf_view v = {(const float *)PyArray_DATA(a), 0, 0};
    strides2(a, &v.rs, &v.cs);
    return v;
}

/* Flatten leading dims of a (…, last) into (n, last): a view when the strides allow, else a
 * C-contiguous copy. New reference. */
PyArrayObject *lf_py_flatten_2d(PyArrayObject *a, npy_intp last) {
    npy_intp dims[2] = {0, last};
    npy_intp n = 1;
    for (int d = 0; d < PyArray_NDIM(a) - 1; d++) n *= PyArray_DIM(a, d);
    dims[0] = n;
    PyArray_Dims shape = {dims, 2};
    return (PyArrayObject *)PyArray_Newshape(a, &shape, NPY_CORDER);
}

/* A new C-contiguous float32 array with like's leading dims + (last,) (large ones from the
 * kept blocks of st->outs). */
PyArrayObject *lf_py_new_output(lf_state *st, PyArrayObject *like, npy_intp last) {
    npy_intp dims[NPY_MAXDIMS];
    const int nd = PyArray_NDIM(like);
    for (int d = 0; d < nd - 1; d++) dims[d] = PyArray_DIM(like, d);
    dims[nd - 1] = last;
    return lf_out_cache_array(st->outs, nd, dims);
}

PyArrayObject *lf_py_new_2d(lf_state *st, npy_intp rows, npy_intp cols) {
    const npy_intp dims[2] = {rows, cols};
    return lf_out_cache_array(st->outs, 2, dims);
}

/* Output check: float32, C-contiguous, aligned, writable, shape == lead dims of `like` + (last,)
 * (like == NULL: shape (d0, last)). Returns new reference or NULL. */
PyArrayObject *lf_py_check_output(lf_state *st, PyObject *obj, const char *func, const char *name,
                                  PyArrayObject *like, npy_intp d0, npy_intp last) {
    PyArrayObject *o = as_f32_arg(st, obj, func, name, 1);
    if (!o) return NULL;
    if (o != (PyArrayObject *)obj && PyArray_Check(obj) && !PyArray_ISALIGNED((PyArrayObject *)obj)) {
        Py_DECREF(o);
        PyErr_Format(PyExc_ValueError, "%s: %s must be aligned (results would be lost in a copy)",
                     func, name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(o)) {
        Py_DECREF(o);
        PyErr_Format(PyExc_ValueError, "%s: %s must be C-contiguous", func, name);
        return NULL;
    }
    if (!PyArray_ISWRITEABLE(o)) {
        Py_DECREF(o);
        PyErr_Format(PyExc_ValueError, "%s: %s is read-only", func, name);
        return NULL;
    }
    int ok;
    if (like) {
        ok = PyArray_NDIM(o) == PyArray_NDIM(like);
        for (int d = 0; ok && d < PyArray_NDIM(like) - 1; d++)
            ok = PyArray_DIM(o, d) == PyArray_DIM(like, d);
        ok = ok && PyArray_DIM(o, PyArray_NDIM(o) - 1) == last;
    } else {
        ok = PyArray_NDIM(o) == 2 && PyArray_DIM(o, 0) == d0 && PyArray_DIM(o, 1) == last;
    }
    if (!ok) {
        char expected[96];
        if (like) snprintf(expected, sizeof expected, "(..., %ld) with the input's leading dims", (long)last);
        else snprintf(expected, sizeof expected, "(%ld, %ld)", (long)d0, (long)last);
        shape_error(func, name, expected, o);
        Py_DECREF(o);
        return NULL;
    }
    return o;
}

int lf_py_check_ndim(const char *func, const char *name, PyArrayObject *a, int ndim, const char *what) {
    if (ndim > 0 ? PyArray_NDIM(a) == ndim : PyArray_NDIM(a) >= 1) return 0;
    shape_error(func, name, what, a);
    return -1;
}

int lf_py_check_dim(const char *func, const char *name, const char *expected, PyArrayObject *a,
                    int axis, npy_intp want) {
    if (PyArray_DIM(a, axis) == want) return 0;
    shape_error(func, name, expected, a);
    return -1;
}

/* x for dropout must be C-contiguous (mask index = flat offset): copy if it is not. */
PyArrayObject *lf_py_contiguous_if(PyArrayObject *a, int needed) {
    if (!needed || PyArray_IS_C_CONTIGUOUS(a)) {
        Py_INCREF(a);
        return a;
    }
    return (PyArrayObject *)PyArray_NewCopy(a, NPY_CORDER);
}

/* Reject an output that overlaps any of the inputs. */
int lf_py_check_no_alias(const char *func, const char *oname, PyArrayObject *o, PyArrayObject **ins,
                         const char **names, int nin) {
    for (int i = 0; i < nin; i++) {
        if (lf_py_overlaps(o, ins[i])) {
            PyErr_Format(PyExc_ValueError, "%s: output %s overlaps input %s in memory", func, oname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

/* W as the kernels read it, (m, k): a (k, m) array with fan_in_fan_out (Conv1D stores Wᵀ) is
 * read transposed; *m and *k get its sizes when not NULL */
lf_view lf_py_weight_view(PyArrayObject *W, int fifo, npy_intp *m, npy_intp *k) {
    const lf_view v = lf_py_view2(W);
    if (m) *m = PyArray_DIM(W, fifo ? 1 : 0);
    if (k) *k = PyArray_DIM(W, fifo ? 0 : 1);
    return fifo ? (lf_view){v.p, v.cs, v.rs} : v;
}

/* ---------------------------------------------------------------- scalars */

int lf_py_parse_scale(PyObject *obj, const char *func, const char *name, float *out) {
    if (!PyNumber_Check(obj) || PyBool_Check(obj) || PyComplex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be a real number, got %s", func, name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)v;
    return 0;
}

int lf_py_parse_dropout(PyObject *pobj, PyObject *seedobj, const char *func, float *p, uint64_t *seed) {
    if (lf_py_parse_scale(pobj, func, "dropout_p", p)) return -1;
    if (!(*p >= 0.0f && *p < 1.0f)) {
        PyErr_Format(PyExc_ValueError, "%s: dropout_p must be in [0, 1), got %R", func, pobj);
        return -1;
    }
    if (!PyLong_Check(seedobj)) {
        PyErr_Format(PyExc_TypeError, "%s: seed must be an int, got %s", func, Py_TYPE(seedobj)->tp_name);
        return -1;
    }
    *seed = PyLong_AsUnsignedLongLong(seedobj);
    if (PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "%s: seed must be in [0, 2**64), got %R", func, seedobj);
        return -1;
    }
    return 0;
}

/* scale, and the optional dropout_p / seed (NULL: 0) */
int lf_py_parse_scalars(PyObject *oscale, PyObject *op, PyObject *oseed, const char *func, float *scale,
                        float *p, uint64_t *seed) {
    if (lf_py_parse_scale(oscale, func, "scale", scale)) return -1;
    PyObject *zero = PyLong_FromLong(0);
    if (!zero) return -1;
    const int rc = lf_py_parse_dropout(op ? op : zero, oseed ? oseed : zero, func, p, seed);
    Py_DECREF(zero);
    return rc;
}

/* ---------------------------------------------------------------- the arrays of one call */

/* Keep a (a new reference, or NULL with the error set) for lf_py_drop_all; NULL + RuntimeError when full. */
PyArrayObject *lf_py_keep(lf_py_arr_list *l, PyArrayObject *a) {
    if (!a) return NULL;
    if (l->n == LF_PY_MAX_ARRS) {
        Py_DECREF(a);
        PyErr_SetString(PyExc_RuntimeError, "lorafuse: internal error, too many arrays kept in one call");
        return NULL;
    }
    l->a[l->n++] = a;
    return a;
}

void lf_py_drop_all(lf_py_arr_list *l) {
    for (int i = 0; i < l->n; i++) Py_XDECREF(l->a[i]);
    l->n = 0;
}

/* ---------------------------------------------------------------- weights */

/* W (m,k) — (k,m) with fan_in_fan_out —, A (r,k), B (m,r) for x's k; the arrays go into L. */
int lf_py_parse_weights(lf_state *st, const char *F, lf_py_arr_list *L, PyObject *oW, PyObject *oA, PyObject *oB,
                        int fifo, npy_intp k, PyArrayObject **W, PyArrayObject **A, PyArrayObject **B,
                        npy_intp *m, npy_intp *r) {
    if (!(*W = lf_py_keep(L, lf_py_as_f32(st, oW, F, "W"))) ||
        lf_py_check_ndim(F, "W", *W, 2, fifo ? "(k, m)" : "(m, k)"))
        return -1;
    if (!(*A = lf_py_keep(L, lf_py_as_f32(st, oA, F, "A"))) || lf_py_check_ndim(F, "A", *A, 2, "(r, k)")) return -1;
    if (!(*B = lf_py_keep(L, lf_py_as_f32(st, oB, F, "B"))) || lf_py_check_ndim(F, "B", *B, 2, "(m, r)")) return -1;
    return lf_py_check_weight_dims(F, *W, *A, *B, fifo, k, m, r);
}

int lf_py_check_weight_dims(const char *F, PyArrayObject *W, PyArrayObject *A, PyArrayObject *B, int fifo,
                            npy_intp k, npy_intp *m, npy_intp *r) {
    if (W) *m = PyArray_DIM(W, fifo ? 1 : 0);
    *r = PyArray_DIM(A, 0);
    if ((W && lf_py_check_dim(F, "W", fifo ? "(k, m) with k = x.shape[-1]" : "(m, k) with k = x.shape[-1]", W,
                              fifo ? 0 : 1, k)) ||
        lf_py_check_dim(F, "A", "(r, k) with k = x.shape[-1]", A, 1, k) ||
        lf_py_check_dim(F, "B", "(m, r) with m, r from W and A", B, 0, *m) ||
        lf_py_check_dim(F, "B", "(m, r) with m, r from W and A", B, 1, *r))
        return -1;
    return 0;
}

/* g (..., m) and u (..., r) with x's leading dims (lora_backward); -1 with ValueError */
int lf_py_check_lead_dims(const char *F, PyArrayObject *g, PyArrayObject *x, PyArrayObject *u, npy_intp m,
                          npy_intp r) {
    int ok = PyArray_NDIM(g) == PyArray_NDIM(x) && PyArray_NDIM(u) == PyArray_NDIM(x) &&
             PyArray_DIM(g, PyArray_NDIM(g) - 1) == m && PyArray_DIM(u, PyArray_NDIM(u) - 1) == r;
    for (int d = 0; ok && d < PyArray_NDIM(x) - 1; d++)
        ok = PyArray_DIM(g, d) == PyArray_DIM(x, d) && PyArray_DIM(u, d) == PyArray_DIM(x, d);
    if (ok) return 0;
    PyObject *sg = lf_py_shape_str(g), *su = lf_py_shape_str(u), *sx = lf_py_shape_str(x);
    if (sg && su && sx)
        PyErr_Format(PyExc_ValueError,
                     "%s: g must have shape (..., m=%ld) and u (..., r=%ld) with x's leading "
                     "dims; got g %U, u %U, x %U", F, (long)m, (long)r, sg, su, sx);
    Py_XDECREF(sg);
    Py_XDECREF(su);
    Py_XDECREF(sx);
    return -1;
}

/* The packed W in `obj` (None: NULL, no error); -1 with an exception when obj is not one of
 * pack_weight's capsules or was packed from another array, view or direction of W. */
int lf_py_parse_packed(PyObject *obj, const char *F, PyArrayObject *W, int fifo, int for_backward,
                       const lf_packed_b **out) {
    *out = NULL;
    if (obj == Py_None) return 0;
    if (!PyCapsule_IsValid(obj, LF_PY_PACKED_NAME)) {
        PyErr_Format(PyExc_TypeError, "%s: packed_w must be the result of pack_weight() or None, got %s", F,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const lf_packed_b *pw = PyCapsule_GetPointer(obj, LF_PY_PACKED_NAME);
    npy_intp m, k;
    const lf_view vW = lf_py_weight_view(W, fifo, &m, &k);
    if (!lf_packed_weight_matches(pw, vW, m, k, for_backward)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: packed_w was not packed from this W (same array, strides, fan_in_fan_out) with "
                     "for_backward=%s", F, for_backward ? "True" : "False");
        return -1;
    }
    *out = pw;
    return 0;
}
