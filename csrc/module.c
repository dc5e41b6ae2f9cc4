/* module.c — the CPython extension `lorafuse._C`: the only file that sees Python objects.
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

#include "dlpack_in.h"
#include "out_cache.h"

#include <signal.h>

#include "lorafuse/kernels.h"

#ifndef LORAFUSE_VERSION
#define LORAFUSE_VERSION "0.0.0"
#endif

/* ---------------------------------------------------------------- module state */

typedef struct {
    lf_pool *pool;
    int in_flight;     /* kernels running with the GIL released (read/written under the GIL) */
    lf_pool *retired;  /* a pool replaced while kernels were using it; freed when idle */
    lf_dlpack_exporters dlpack; /* torch's C exporter, found once torch is loaded */
    PyObject *getsignal, *default_int_handler; /* signal.getsignal, signal.default_int_handler */
    unsigned long main_thread;                 /* threading.main_thread().ident */
    lf_out_cache *outs;                        /* kept blocks for large outputs (out_cache.h) */
} lf_state;

static lf_state *state_of(PyObject *module) { return (lf_state *)PyModule_GetState(module); }

static void release_retired(lf_state *st) {
    if (st->retired && st->in_flight == 0) {
        lf_pool_destroy(st->retired);
        st->retired = NULL;
    }
}

/* Take the pool for one call: the pointer stays valid until pool_release (see set_num_threads). */
static lf_pool *pool_acquire(lf_state *st) {
    st->in_flight++;
    return st->pool;
}

static void pool_release(lf_state *st) {
    st->in_flight--;
    release_retired(st);
}

/* ---------------------------------------------------------------- Ctrl-C
 * A long kernel runs with the GIL released, so Python's SIGINT handler cannot raise until it
 * returns. For calls above LF_INTERRUPTIBLE_FLOPS made from the main thread while SIGINT has
 * Python's default handler, we install a handler that asks the kernels to stop at their next
 * cache block, then restore Python's and raise KeyboardInterrupt ourselves. A user's own
 * SIGINT handler is never replaced. */
#define LF_INTERRUPTIBLE_FLOPS 2e7

static void on_sigint(int sig) {
    (void)sig;
    lf_interrupt_request();
}

typedef struct {
    int installed;
    struct sigaction prev;
} sigint_guard;

static void guard_begin(lf_state *st, double flops, sigint_guard *g) {
    g->installed = 0;
    if (flops < LF_INTERRUPTIBLE_FLOPS || PyThread_get_thread_ident() != st->main_thread) return;
    PyObject *signum = PyLong_FromLong(SIGINT);
    PyObject *cur = signum ? PyObject_CallOneArg(st->getsignal, signum) : NULL;
    Py_XDECREF(signum);
    if (!cur) {
        PyErr_Clear();
        return;
    }
    const int is_default = cur == st->default_int_handler;
    Py_DECREF(cur);
    if (!is_default) return;
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_handler = on_sigint;
    sigemptyset(&ours.sa_mask);
    lf_interrupt_clear();
    g->installed = sigaction(SIGINT, &ours, &g->prev) == 0;
}

/* 1 if Ctrl-C arrived while the guard was up (KeyboardInterrupt is then set) */
static int guard_end(sigint_guard *g) {
    if (!g->installed) return 0;
    sigaction(SIGINT, &g->prev, NULL);
    const int hit = lf_interrupt_pending();
    lf_interrupt_clear();
    if (hit) PyErr_SetNone(PyExc_KeyboardInterrupt);
    return hit;
}

/* ---------------------------------------------------------------- errors */

static PyObject *raise_status(int status, const char *func) {
    switch (status) {
    case LF_ENOMEM: return PyErr_Format(PyExc_MemoryError, "%s: out of memory for workspace", func);
    case LF_EOVERFLOW: return PyErr_Format(PyExc_ValueError, "%s: sizes overflow int64", func);
    case LF_EISA: return PyErr_Format(PyExc_ValueError, "%s: ISA not supported by this CPU", func);
    case LF_EINTR: PyErr_SetNone(PyExc_KeyboardInterrupt); return NULL;
    case LF_EINTERNAL:
        return PyErr_Format(PyExc_RuntimeError, "%s: internal error in the kernels (a lorafuse bug, please report it)",
                            func);
    default: return PyErr_Format(PyExc_ValueError, "%s: invalid argument (status %d)", func, status);
    }
}

static const char *ndarray_type_name(PyObject *obj) { return Py_TYPE(obj)->tp_name; }

/* "(2, 3)" */
static PyObject *shape_str(PyArrayObject *a) {
    PyObject *t = PyTuple_New(PyArray_NDIM(a));
    if (!t) return NULL;
    for (int d = 0; d < PyArray_NDIM(a); d++)
        PyTuple_SET_ITEM(t, d, PyLong_FromSsize_t(PyArray_DIM(a, d)));
    PyObject *s = PyObject_Str(t);
    Py_DECREF(t);
    return s;
}

static void shape_error(const char *func, const char *name, const char *expected, PyArrayObject *a) {
    PyObject *s = shape_str(a);
    if (s) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have shape %s, got %U", func, name, expected, s);
        Py_DECREF(s);
    }
}

/* Run CALL (an expression giving a kernel status; it may use `pool`) with the GIL released,
 * the pool held and Ctrl-C armed for calls of at least FLOPS work; on failure the Python
 * exception is set and control jumps to the caller's `fail` label. */
#define RUN_KERNEL(FUNC, FLOPS, CALL)                          \
    do {                                                       \
        sigint_guard guard_;                                   \
        guard_begin(st, (FLOPS), &guard_);                     \
        lf_pool *pool = pool_acquire(st);                      \
        int status_;                                           \
        Py_BEGIN_ALLOW_THREADS status_ = (CALL);               \
        Py_END_ALLOW_THREADS pool_release(st);                 \
        if (guard_end(&guard_)) goto fail;                     \
        if (status_) {                                         \
            raise_status(status_, FUNC);                       \
            goto fail;                                         \
        }                                                      \
    } while (0)

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
        arr = lf_array_from_dlpack(&st->dlpack, obj, kind, func, name, writable ? &requires_grad : NULL);
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

static PyArrayObject *as_f32(lf_state *st, PyObject *obj, const char *func, const char *name) {
    return as_f32_arg(st, obj, func, name, 0);
}

/* lowest and one-past-highest byte touched by a */
static void byte_extent(PyArrayObject *a, char **lo, char **hi) {
    char *base = PyArray_BYTES(a);
    *lo = base;
    *hi = base;
    if (PyArray_SIZE(a) == 0) return;
    for (int d = 0; d < PyArray_NDIM(a); d++) {
        const npy_intp span = (PyArray_DIM(a, d) - 1) * PyArray_STRIDE(a, d);
        if (span < 0) *lo += span;
        else *hi += span;
    }
    *hi += PyArray_ITEMSIZE(a);
}

static int overlaps(PyArrayObject *a, PyArrayObject *b) {
    if (!a || !b || PyArray_SIZE(a) == 0 || PyArray_SIZE(b) == 0) return 0;
    char *alo, *ahi, *blo, *bhi;
    byte_extent(a, &alo, &ahi);
    byte_extent(b, &blo, &bhi);
    return alo < bhi && blo < ahi;
}

/* lf_view of a 2-D float32 array (strides in elements) */
static lf_view view2(PyArrayObject *a) {
    lf_view v = {(const float *)PyArray_DATA(a), 0, 0};
    v.rs = PyArray_STRIDE(a, 0) / (npy_intp)sizeof(float);
    v.cs = PyArray_STRIDE(a, 1) / (npy_intp)sizeof(float);
    return v;
}

/* Flatten leading dims of a (…, last) into (n, last): a view when the strides allow, else a
 * C-contiguous copy. New reference. */
static PyArrayObject *flatten_2d(PyArrayObject *a, npy_intp last) {
    npy_intp dims[2] = {0, last};
    npy_intp n = 1;
    for (int d = 0; d < PyArray_NDIM(a) - 1; d++) n *= PyArray_DIM(a, d);
    dims[0] = n;
    PyArray_Dims shape = {dims, 2};
    return (PyArrayObject *)PyArray_Newshape(a, &shape, NPY_CORDER);
}

/* A new C-contiguous float32 array with like's leading dims + (last,) (large ones from the
 * kept blocks of st->outs). */
static PyArrayObject *new_output(lf_state *st, PyArrayObject *like, npy_intp last) {
    npy_intp dims[NPY_MAXDIMS];
    const int nd = PyArray_NDIM(like);
    for (int d = 0; d < nd - 1; d++) dims[d] = PyArray_DIM(like, d);
    dims[nd - 1] = last;
    return lf_out_cache_array(st->outs, nd, dims);
}

static PyArrayObject *new_2d(lf_state *st, npy_intp rows, npy_intp cols) {
    const npy_intp dims[2] = {rows, cols};
    return lf_out_cache_array(st->outs, 2, dims);
}

/* Output check: float32, C-contiguous, aligned, writable, shape == lead dims of `like` + (last,)
 * (like == NULL: shape (d0, last)). Returns new reference or NULL. */
static PyArrayObject *check_output(lf_state *st, PyObject *obj, const char *func, const char *name,
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

static int check_ndim(const char *func, const char *name, PyArrayObject *a, int ndim, const char *what) {
    if (ndim > 0 ? PyArray_NDIM(a) == ndim : PyArray_NDIM(a) >= 1) return 0;
    shape_error(func, name, what, a);
    return -1;
}

static int check_dim(const char *func, const char *name, const char *expected, PyArrayObject *a,
                     int axis, npy_intp want) {
    if (PyArray_DIM(a, axis) == want) return 0;
    shape_error(func, name, expected, a);
    return -1;
}

static int parse_scale(PyObject *obj, const char *func, const char *name, float *out) {
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

static int parse_dropout(PyObject *pobj, PyObject *seedobj, const char *func, float *p, uint64_t *seed) {
    if (parse_scale(pobj, func, "dropout_p", p)) return -1;
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
static int parse_scalars(PyObject *oscale, PyObject *op, PyObject *oseed, const char *func, float *scale,
                         float *p, uint64_t *seed) {
    if (parse_scale(oscale, func, "scale", scale)) return -1;
    PyObject *zero = PyLong_FromLong(0);
    if (!zero) return -1;
    const int rc = parse_dropout(op ? op : zero, oseed ? oseed : zero, func, p, seed);
    Py_DECREF(zero);
    return rc;
}

/* x for dropout must be C-contiguous (mask index = flat offset): copy if it is not. */
static PyArrayObject *contiguous_if(PyArrayObject *a, int needed) {
    if (!needed || PyArray_IS_C_CONTIGUOUS(a)) {
        Py_INCREF(a);
        return a;
    }
    return (PyArrayObject *)PyArray_NewCopy(a, NPY_CORDER);
}

#define MAX_ARRS 16
typedef struct {
    PyArrayObject *a[MAX_ARRS];
    int n;
} arr_list;

/* Keep a (a new reference, or NULL with the error set) for drop_all; NULL + RuntimeError when full. */
static PyArrayObject *keep(arr_list *l, PyArrayObject *a) {
    if (!a) return NULL;
    if (l->n == MAX_ARRS) {
        Py_DECREF(a);
        PyErr_SetString(PyExc_RuntimeError, "lorafuse: internal error, too many arrays kept in one call");
        return NULL;
    }
    l->a[l->n++] = a;
    return a;
}

static void drop_all(arr_list *l) {
    for (int i = 0; i < l->n; i++) Py_XDECREF(l->a[i]);
    l->n = 0;
}

/* Reject an output that overlaps any of the inputs. */
static int check_no_alias(const char *func, const char *oname, PyArrayObject *o, PyArrayObject **ins,
                          const char **names, int nin) {
    for (int i = 0; i < nin; i++) {
        if (overlaps(o, ins[i])) {
            PyErr_Format(PyExc_ValueError, "%s: output %s overlaps input %s in memory", func, oname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

/* W as the kernels read it, (m, k): a (k, m) array with fan_in_fan_out (Conv1D stores Wᵀ) is
 * read transposed; *m and *k get its sizes when not NULL */
static lf_view weight_view(PyArrayObject *W, int fifo, npy_intp *m, npy_intp *k) {
    const lf_view v = view2(W);
    if (m) *m = PyArray_DIM(W, fifo ? 1 : 0);
    if (k) *k = PyArray_DIM(W, fifo ? 0 : 1);
    return fifo ? (lf_view){v.p, v.cs, v.rs} : v;
}

/* W (m,k) — (k,m) with fan_in_fan_out —, A (r,k), B (m,r) for x's k; the arrays go into L. */
static int parse_weights(lf_state *st, const char *F, arr_list *L, PyObject *oW, PyObject *oA, PyObject *oB,
                         int fifo, npy_intp k, PyArrayObject **W, PyArrayObject **A, PyArrayObject **B,
                         npy_intp *m, npy_intp *r) {
    if (!(*W = keep(L, as_f32(st, oW, F, "W"))) || check_ndim(F, "W", *W, 2, fifo ? "(k, m)" : "(m, k)"))
        return -1;
    if (!(*A = keep(L, as_f32(st, oA, F, "A"))) || check_ndim(F, "A", *A, 2, "(r, k)")) return -1;
    if (!(*B = keep(L, as_f32(st, oB, F, "B"))) || check_ndim(F, "B", *B, 2, "(m, r)")) return -1;
    *m = PyArray_DIM(*W, fifo ? 1 : 0);
    *r = PyArray_DIM(*A, 0);
    if (check_dim(F, "W", fifo ? "(k, m) with k = x.shape[-1]" : "(m, k) with k = x.shape[-1]", *W,
                  fifo ? 0 : 1, k) ||
        check_dim(F, "A", "(r, k) with k = x.shape[-1]", *A, 1, k) ||
        check_dim(F, "B", "(m, r) with m, r from W and A", *B, 0, *m) ||
        check_dim(F, "B", "(m, r) with m, r from W and A", *B, 1, *r))
        return -1;
    return 0;
}

/* ---------------------------------------------------------------- packed weights */

static const char PACKED_NAME[] = "lorafuse.packed_weight";


static void packed_capsule_free(PyObject *cap) {
    lf_packed_weight_free(PyCapsule_GetPointer(cap, PACKED_NAME));
}

/* The packed W in `obj` (None: NULL, no error); -1 with an exception when obj is not one of
 * pack_weight's capsules or was packed from another array, view or direction of W. */
static int parse_packed(PyObject *obj, const char *F, PyArrayObject *W, int fifo, int for_backward,
                        const lf_packed_b **out) {
    *out = NULL;
    if (obj == Py_None) return 0;
    if (!PyCapsule_IsValid(obj, PACKED_NAME)) {
        PyErr_Format(PyExc_TypeError, "%s: packed_w must be the result of pack_weight() or None, got %s", F,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const lf_packed_b *pw = PyCapsule_GetPointer(obj, PACKED_NAME);
    npy_intp m, k;
    const lf_view vW = weight_view(W, fifo, &m, &k);
    if (!lf_packed_weight_matches(pw, vW, m, k, for_backward)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: packed_w was not packed from this W (same array, strides, fan_in_fan_out) with "
                     "for_backward=%s", F, for_backward ? "True" : "False");
        return -1;
    }
    *out = pw;
    return 0;
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
    arr_list L = {{0}, 0};
    PyArrayObject *W;
    lf_packed_b *pw = NULL;
    if (!(W = keep(&L, as_f32(st, oW, F, "W"))) || check_ndim(F, "W", W, 2, fifo ? "(k, m)" : "(m, k)")) goto fail;
    {
        npy_intp m, k;
        const lf_view vW = weight_view(W, fifo, &m, &k);
        int status;
        Py_BEGIN_ALLOW_THREADS status = lf_pack_weight(vW, m, k, for_backward, &pw);
        Py_END_ALLOW_THREADS
        if (status) {
            raise_status(status, F);
            goto fail;
        }
    }
    PyObject *cap = PyCapsule_New(pw, PACKED_NAME, packed_capsule_free);
    if (!cap) {
        lf_packed_weight_free(pw);
        goto fail;
    }
    drop_all(&L);
    return Py_BuildValue("(Nn)", cap, (Py_ssize_t)lf_packed_weight_bytes(pw));
fail:
    drop_all(&L);
    return NULL;
}

/* ---------------------------------------------------------------- lora_forward */

PyDoc_STRVAR(lora_forward_doc,
"lora_forward(x, W, A, B, scale, bias=None, out=None, u_out=None, dropout_p=0.0, seed=0,\n"
"             fan_in_fan_out=False, need_u=True, packed_w=None) -> (y, u)\n\n"
"y = x·Wᵀ + bias + scale·(x̃·Aᵀ)·Bᵀ, u = x̃·Aᵀ. x (..., k); W (m, k) or (k, m) if fan_in_fan_out;\n"
"A (r, k); B (m, r); bias (m,). Returns y (..., m) and u (..., r), or (y, None) when need_u is\n"
"false (inference: u_out must then be None). packed_w: pack_weight(W, fan_in_fan_out) or None.");

static PyObject *py_lora_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "lora_forward";
    static char *kwlist[] = {"x", "W", "A", "B", "scale", "bias", "out", "u_out", "dropout_p",
                             "seed", "fan_in_fan_out", "need_u", "packed_w", NULL};
    PyObject *ox, *oW, *oA, *oB, *oscale, *obias = Py_None, *oy = Py_None, *ou = Py_None;
    PyObject *op = NULL, *oseed = NULL, *opacked = Py_None;
    int fifo = 0, need_u = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|OOOOOppO:lora_forward", kwlist, &ox, &oW, &oA,
                                     &oB, &oscale, &obias, &oy, &ou, &op, &oseed, &fifo, &need_u, &opacked))
        return NULL;
    if (!need_u && ou != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: u_out given with need_u=False", F);
        return NULL;
    }
    lf_state *st = state_of(self);
    float scale, p = 0.0f;
    uint64_t seed = 0;
    if (parse_scalars(oscale, op, oseed, F, &scale, &p, &seed)) return NULL;
    arr_list L = {{0}, 0};
    PyArrayObject *x, *W, *A, *B, *bias = NULL, *y = NULL, *u = NULL, *x2, *y2, *u2 = NULL;
    if (!(x = keep(&L, as_f32(st, ox, F, "x"))) || check_ndim(F, "x", x, 0, "(..., k)")) goto fail;
    const npy_intp k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    npy_intp m, r;
    const lf_packed_b *pw;
    if (parse_weights(st, F, &L, oW, oA, oB, fifo, k, &W, &A, &B, &m, &r) || parse_packed(opacked, F, W, fifo, 0, &pw))
        goto fail;
    if (obias != Py_None) {
        if (!(bias = keep(&L, as_f32(st, obias, F, "bias"))) || check_ndim(F, "bias", bias, 1, "(m,)") ||
            check_dim(F, "bias", "(m,) with m from W", bias, 0, m))
            goto fail;
        if (!PyArray_IS_C_CONTIGUOUS(bias) && !(bias = keep(&L, (PyArrayObject *)PyArray_NewCopy(bias, NPY_CORDER))))
            goto fail;
    }
    y = keep(&L, oy == Py_None ? new_output(st, x, m) : check_output(st, oy, F, "out", x, 0, m));
    if (need_u)
        u = keep(&L, ou == Py_None ? new_output(st, x, r) : check_output(st, ou, F, "u_out", x, 0, r));
    if (!y || (need_u && !u)) goto fail;
    {
        PyArrayObject *ins[] = {x, W, A, B, bias};
        const char *names[] = {"x", "W", "A", "B", "bias"};
        if (check_no_alias(F, "out", y, ins, names, 5) || (u && check_no_alias(F, "u_out", u, ins, names, 5)))
            goto fail;
        if (overlaps(y, u)) {
            PyErr_Format(PyExc_ValueError, "%s: out and u_out overlap in memory", F);
            goto fail;
        }
    }
    if (!(x2 = keep(&L, flatten_2d(x, k))) || !(x2 = keep(&L, contiguous_if(x2, p > 0.0f))) ||
        !(y2 = keep(&L, flatten_2d(y, m))) || (u && !(u2 = keep(&L, flatten_2d(u, r)))))
        goto fail;
    {
        const npy_intp n = PyArray_DIM(x2, 0);
        const lf_view vx = view2(x2), vW = weight_view(W, fifo, NULL, NULL), vA = view2(A), vB = view2(B);
        const float *pb = bias ? (const float *)PyArray_DATA(bias) : NULL;
        float *py = (float *)PyArray_DATA(y2), *pu = u ? (float *)PyArray_DATA(u2) : NULL;
        RUN_KERNEL(F, 2.0 * (double)n * (double)(k + r) * (double)m,
                   lf_lora_forward_f32(pool, n, k, m, r, vx, vW, pb, vA, vB, scale, p, seed, py, pu, pw));
    }
    PyObject *res = PyTuple_Pack(2, (PyObject *)y, u ? (PyObject *)u : Py_None);
    drop_all(&L);
    return res;
fail:
    drop_all(&L);
    return NULL;
}

/* ---------------------------------------------------------------- lora_backward */

PyDoc_STRVAR(lora_backward_doc,
"lora_backward(g, x, u, W, A, B, scale, need_dx=True, dropout_p=0.0, seed=0, fan_in_fan_out=False,\n"
"              dx_out=None, dA_out=None, dB_out=None, packed_w=None) -> (dx or None, dA, dB)\n\n"
"Adapter-only gradients: v = g·B, dB = scale·gᵀ·u, dA = scale·vᵀ·x̃, dx = g·W + scale·drop'(v·A).\n"
"packed_w: pack_weight(W, fan_in_fan_out, for_backward=True) or None.");

static PyObject *py_lora_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "lora_backward";
    static char *kwlist[] = {"g", "x", "u", "W", "A", "B", "scale", "need_dx", "dropout_p", "seed",
                             "fan_in_fan_out", "dx_out", "dA_out", "dB_out", "packed_w", NULL};
    PyObject *og, *ox, *ou, *oW, *oA, *oB, *oscale, *op = NULL, *oseed = NULL;
    PyObject *odx = Py_None, *odA = Py_None, *odB = Py_None, *opacked = Py_None;
    int need_dx = 1, fifo = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO|pOOpOOOO:lora_backward", kwlist, &og, &ox, &ou,
                                     &oW, &oA, &oB, &oscale, &need_dx, &op, &oseed, &fifo, &odx, &odA,
                                     &odB, &opacked))
        return NULL;
    lf_state *st = state_of(self);
    float scale, p = 0.0f;
    uint64_t seed = 0;
    if (parse_scalars(oscale, op, oseed, F, &scale, &p, &seed)) return NULL;
    arr_list L = {{0}, 0};
    PyArrayObject *g, *x, *u, *W, *A, *B, *dx = NULL, *dA, *dB, *g2, *x2, *u2, *dx2 = NULL;
    if (!(g = keep(&L, as_f32(st, og, F, "g"))) || check_ndim(F, "g", g, 0, "(..., m)")) goto fail;
    if (!(x = keep(&L, as_f32(st, ox, F, "x"))) || check_ndim(F, "x", x, 0, "(..., k)")) goto fail;
    if (!(u = keep(&L, as_f32(st, ou, F, "u"))) || check_ndim(F, "u", u, 0, "(..., r)")) goto fail;
    const npy_intp k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    npy_intp m, r;
    const lf_packed_b *pw;
    if (parse_weights(st, F, &L, oW, oA, oB, fifo, k, &W, &A, &B, &m, &r) || parse_packed(opacked, F, W, fifo, 1, &pw))
        goto fail;
    /* g and u must share x's leading dims */
    {
        int ok = PyArray_NDIM(g) == PyArray_NDIM(x) && PyArray_NDIM(u) == PyArray_NDIM(x) &&
                 PyArray_DIM(g, PyArray_NDIM(g) - 1) == m && PyArray_DIM(u, PyArray_NDIM(u) - 1) == r;
        for (int d = 0; ok && d < PyArray_NDIM(x) - 1; d++)
            ok = PyArray_DIM(g, d) == PyArray_DIM(x, d) && PyArray_DIM(u, d) == PyArray_DIM(x, d);
        if (!ok) {
            PyObject *sg = shape_str(g), *su = shape_str(u), *sx = shape_str(x);
            if (sg && su && sx)
                PyErr_Format(PyExc_ValueError,
                             "%s: g must have shape (..., m=%ld) and u (..., r=%ld) with x's leading "
                             "dims; got g %U, u %U, x %U", F, (long)m, (long)r, sg, su, sx);
            Py_XDECREF(sg);
            Py_XDECREF(su);
            Py_XDECREF(sx);
            goto fail;
        }
    }
    if (need_dx) {
        dx = keep(&L, odx == Py_None ? new_output(st, x, k) : check_output(st, odx, F, "dx_out", x, 0, k));
        if (!dx) goto fail;
    }
    dA = keep(&L, odA == Py_None ? new_2d(st, r, k)
                                 : check_output(st, odA, F, "dA_out", NULL, r, k));
    dB = keep(&L, odB == Py_None ? new_2d(st, m, r)
                                 : check_output(st, odB, F, "dB_out", NULL, m, r));
    if (!dA || !dB) goto fail;
    {
        PyArrayObject *ins[] = {g, x, u, W, A, B};
        const char *names[] = {"g", "x", "u", "W", "A", "B"};
        PyArrayObject *outs[] = {dx, dA, dB};
        const char *onames[] = {"dx_out", "dA_out", "dB_out"};
        for (int i = 0; i < 3; i++) {
            if (outs[i] && check_no_alias(F, onames[i], outs[i], ins, names, 6)) goto fail;
            for (int j = i + 1; j < 3; j++)
                if (outs[i] && outs[j] && overlaps(outs[i], outs[j])) {
                    PyErr_Format(PyExc_ValueError, "%s: outputs %s and %s overlap in memory", F,
                                 onames[i], onames[j]);
                    goto fail;
                }
        }
    }
    if (!(g2 = keep(&L, flatten_2d(g, m))) || !(x2 = keep(&L, flatten_2d(x, k))) ||
        !(x2 = keep(&L, contiguous_if(x2, p > 0.0f))) || !(u2 = keep(&L, flatten_2d(u, r))))
        goto fail;
    if (dx && !(dx2 = keep(&L, flatten_2d(dx, k)))) goto fail;
    {
        const npy_intp n = PyArray_DIM(x2, 0);
        const lf_view vg = view2(g2), vx = view2(x2), vu = view2(u2), vW = weight_view(W, fifo, NULL, NULL),
                      vA = view2(A), vB = view2(B);
        float *pdx = dx2 ? (float *)PyArray_DATA(dx2) : NULL;
        float *pdA = (float *)PyArray_DATA(dA), *pdB = (float *)PyArray_DATA(dB);
        RUN_KERNEL(F, 2.0 * (double)n * (double)(m + r) * (double)(k + r),
                   lf_lora_backward_f32(pool, n, k, m, r, vg, vx, vu, vW, vA, vB, scale, p, seed, pdx,
                                          pdA, pdB, pw));
    }
    PyObject *res = PyTuple_Pack(3, dx ? (PyObject *)dx : Py_None, (PyObject *)dA, (PyObject *)dB);
    drop_all(&L);
    return res;
fail:
    drop_all(&L);
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
    if (parse_scale(oscale, F, "scale", &scale)) return NULL;
    arr_list L = {{0}, 0};
    PyArrayObject *A, *B, *W;
    if (!(A = keep(&L, as_f32(st, oA, F, "A"))) || check_ndim(F, "A", A, 2, "(r, k)")) goto fail;
    if (!(B = keep(&L, as_f32(st, oB, F, "B"))) || check_ndim(F, "B", B, 2, "(m, r)")) goto fail;
    const npy_intp r = PyArray_DIM(A, 0), k = PyArray_DIM(A, 1), m = PyArray_DIM(B, 0);
    if (check_dim(F, "B", "(m, r) with r = A.shape[0]", B, 1, r)) goto fail;
    if (!(W = keep(&L, check_output(st, oW, F, "W", NULL, fifo ? k : m, fifo ? m : k)))) goto fail;
    {
        PyArrayObject *ins[] = {A, B};
        const char *names[] = {"A", "B"};
        if (check_no_alias(F, "W", W, ins, names, 2)) goto fail;
    }
    {
        /* W (m,k) += s·B·A   or   Wᵀ (k,m) += s·Aᵀ·Bᵀ */
        lf_view vA = view2(A), vB = view2(B);
        lf_view left = fifo ? (lf_view){vA.p, vA.cs, vA.rs} : vB;
        lf_view right = fifo ? (lf_view){vB.p, vB.cs, vB.rs} : vA;
        const npy_intp M = fifo ? k : m, N = fifo ? m : k;
        float *pw = (float *)PyArray_DATA(W);
        RUN_KERNEL(F, 0.0,
                   lf_sgemm(pool, M, N, r, scale, left, right, 1.0f, NULL, pw, N));
    }
    drop_all(&L);
    Py_RETURN_NONE;
fail:
    drop_all(&L);
    return NULL;
}

/* ---------------------------------------------------------------- sgemm */

PyDoc_STRVAR(sgemm_doc,
"sgemm(a, b, alpha=1.0, bias=None, out=None) -> c\n\n"
"c (M, N) = alpha·a (M, K)·b (K, N) + bias (N,): lorafuse's packed GEMM on its own.");

static PyObject *py_sgemm(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "sgemm";
    static char *kwlist[] = {"a", "b", "alpha", "bias", "out", NULL};
    PyObject *oa, *ob, *oalpha = NULL, *obias = Py_None, *oc = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOO:sgemm", kwlist, &oa, &ob, &oalpha, &obias, &oc))
        return NULL;
    lf_state *st = state_of(self);
    float alpha = 1.0f;
    if (oalpha && parse_scale(oalpha, F, "alpha", &alpha)) return NULL;
    arr_list L = {{0}, 0};
    PyArrayObject *a, *b, *bias = NULL, *c;
    if (!(a = keep(&L, as_f32(st, oa, F, "a"))) || check_ndim(F, "a", a, 2, "(M, K)")) goto fail;
    if (!(b = keep(&L, as_f32(st, ob, F, "b"))) || check_ndim(F, "b", b, 2, "(K, N)")) goto fail;
    const npy_intp M = PyArray_DIM(a, 0), K = PyArray_DIM(a, 1), N = PyArray_DIM(b, 1);
    if (check_dim(F, "b", "(K, N) with K = a.shape[1]", b, 0, K)) goto fail;
    if (obias != Py_None) {
        if (!(bias = keep(&L, as_f32(st, obias, F, "bias"))) || check_ndim(F, "bias", bias, 1, "(N,)") ||
            check_dim(F, "bias", "(N,) with N = b.shape[1]", bias, 0, N))
            goto fail;
        if (!PyArray_IS_C_CONTIGUOUS(bias) && !(bias = keep(&L, (PyArrayObject *)PyArray_NewCopy(bias, NPY_CORDER))))
            goto fail;
    }
    c = keep(&L, oc == Py_None ? new_2d(st, M, N)
                               : check_output(st, oc, F, "out", NULL, M, N));
    if (!c) goto fail;
    {
        PyArrayObject *ins[] = {a, b, bias};
        const char *names[] = {"a", "b", "bias"};
        if (check_no_alias(F, "out", c, ins, names, 3)) goto fail;
        const float *pb = bias ? (const float *)PyArray_DATA(bias) : NULL;
        lf_view va = view2(a), vb = view2(b);
        float *pc = (float *)PyArray_DATA(c);
        RUN_KERNEL(F, 2.0 * (double)M * (double)N * (double)K,
                   lf_sgemm(pool, M, N, K, alpha, va, vb, 0.0f, pb, pc, N));
    }
    Py_INCREF(c);
    drop_all(&L);
    return (PyObject *)c;
fail:
    drop_all(&L);
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
    if (parse_dropout(op, oseed, F, &p, &seed)) return NULL;
    PyArrayObject *x = as_f32(st, ox, F, "x"), *xc = NULL, *out = NULL;
    if (!x) return NULL;
    if (check_ndim(F, "x", x, 2, "(n, k)") || !(xc = contiguous_if(x, 1))) goto done;
    out = new_2d(st, PyArray_DIM(xc, 0), PyArray_DIM(xc, 1));
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
            raise_status(status, F);
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
    if (lf_pool_threads(st->pool) == n) Py_RETURN_NONE;
    release_retired(st);
    if (st->retired) /* a pool replaced earlier is still in use by a running kernel */
        return PyErr_Format(PyExc_RuntimeError, "set_num_threads: kernels are still running");
    lf_pool *fresh = lf_pool_create((int)n);
    if (!fresh) return PyErr_NoMemory();
    st->retired = st->pool; /* freed as soon as no kernel holds it */
    st->pool = fresh;
    release_retired(st);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(lf_pool_threads(state_of(self)->pool));
}

static PyObject *py_threading_backend(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    lf_state *st = state_of(self);
    return PyUnicode_FromString(lf_pool_uses_openmp(st->pool) ? "openmp (the process's libgomp, e.g. torch's)"
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
    if (!strcmp(name, "generic")) *out = LF_ISA_GENERIC;
    else if (!strcmp(name, "avx2")) *out = LF_ISA_AVX2;
    else if (!strcmp(name, "avx512")) *out = LF_ISA_AVX512;
    else return -1;
    return 0;
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyUnicode_Check(arg))
        return PyErr_Format(PyExc_TypeError, "set_isa: expected a str, got %s", Py_TYPE(arg)->tp_name);
    lf_isa isa;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (isa_from_name(name, &isa))
        return PyErr_Format(PyExc_ValueError, "set_isa: expected 'generic', 'avx2' or 'avx512', got %R", arg);
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
    {"lora_backward", (PyCFunction)(void (*)(void))py_lora_backward, METH_VARARGS | METH_KEYWORDS, lora_backward_doc},
    {"merge", (PyCFunction)(void (*)(void))py_merge, METH_VARARGS | METH_KEYWORDS, merge_doc},
    {"pack_weight", (PyCFunction)(void (*)(void))py_pack_weight, METH_VARARGS | METH_KEYWORDS, pack_weight_doc},
    {"sgemm", (PyCFunction)(void (*)(void))py_sgemm, METH_VARARGS | METH_KEYWORDS, sgemm_doc},
    {"dropout", (PyCFunction)(void (*)(void))py_dropout, METH_VARARGS | METH_KEYWORDS, dropout_doc},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads used by the kernels."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"threading_backend", py_threading_backend, METH_NOARGS,
     "threading_backend() -> where parallel regions run: the loaded OpenMP runtime or pthreads"},
    {"set_output_cache_limit", py_set_output_cache_limit, METH_O,
     "set_output_cache_limit(max_bytes) -> old limit: most bytes of freed output blocks kept for reuse (0: none)."},
    {"output_cache_stats", py_output_cache_stats, METH_NOARGS,
     "output_cache_stats() -> dict: limit, held/lent bytes and blocks, hits, misses."},
    {"set_isa", py_set_isa, METH_O, "set_isa(name): force 'generic', 'avx2' or 'avx512'."},
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
