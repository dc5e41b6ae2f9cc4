/* qweight.c — lorafuse._C.q4_weight and q8_weight: a stored 4-bit or 8-bit weight (bitsandbytes' storage,
 * kernels/include/lorafuse/quant.h) checked once and held, with references to its arrays, in a capsule that
 * lora_forward / lora_backward take as W (lf_py_qweight_handle; half.c reads it). The arguments are parsed
 * as quant.c parses them (quant_args.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "args.h"
#include "quant_args.h"
#include "runtime.h"

#include "lorafuse/quant.h"

/* A quantized weight checked once, for lora_forward / lora_backward's W (lf_py_qweight_handle): the
 * struct the kernels read, the dtype its elements are rounded to, and the arrays its pointers point into
 * (owned references: the capsule keeps them alive). _C.q4_weight and _C.q8_weight make them. */
#define QWEIGHT_HANDLE_NAME "lorafuse.qweight"
typedef struct {
    lf_qweight w;
    lf_dtype dt;
    PyObject *arrs[4];
} qweight_handle;

static void qweight_handle_free(PyObject *cap) {
    qweight_handle *h = PyCapsule_GetPointer(cap, QWEIGHT_HANDLE_NAME);
    if (!h) return;
    for (int i = 0; i < 4; i++) Py_XDECREF(h->arrs[i]);
    PyMem_Free(h);
}

int lf_py_qweight_handle(PyObject *obj, lf_tview *W, int64_t *rows, int64_t *cols) {
    if (!PyCapsule_IsValid(obj, QWEIGHT_HANDLE_NAME)) return 0;
    const qweight_handle *h = PyCapsule_GetPointer(obj, QWEIGHT_HANDLE_NAME);
    *rows = h->w.rows;
    *cols = h->w.cols;
    *W = (lf_tview){.rs = h->w.cols, .cs = 1, .dtype = h->dt, .qw = &h->w}; /* W (rows, cols) as stored */
    return 1;
}

/* The capsule owning h (h->w filled and checked, h->dt set): h->dt must be a half dtype; arrs[0..3] (or
 * NULL) are referenced. Frees h and returns NULL with an exception set on failure. */
static PyObject *new_qweight_handle(const char *F, qweight_handle *h, PyArrayObject *arrs[4]) {
    if (h->dt == LF_DT_F32) {
        PyErr_Format(PyExc_ValueError, "%s: dtype must be 'bfloat16' or 'float16' (the fused kernels' half base)", F);
        PyMem_Free(h);
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        Py_XINCREF(arrs[i]);
        h->arrs[i] = (PyObject *)arrs[i];
    }
    PyObject *cap = PyCapsule_New(h, QWEIGHT_HANDLE_NAME, qweight_handle_free);
    if (!cap) {
        for (int i = 0; i < 4; i++) Py_XDECREF(h->arrs[i]);
        PyMem_Free(h);
    }
    return cap;
}

const char lf_py_q4_weight_doc[] =
    "q4_weight(data, absmax, shape, blocksize, quant_type, dtype='bfloat16', nested_absmax=None,\n"
    "          nested_code=None, nested_blocksize=256, offset=0.0) -> handle\n\n"
    "A 4-bit weight W (rows, cols) = (out_features, in_features), given as dequant_4bit takes it, checked\n"
    "once and held (its arrays referenced) as an opaque handle that lora_forward / lora_backward take as\n"
    "W: the fused LoRA kernels on a bf16 / fp16 base then read W's 4-bit codes, its elements\n"
    "code·absmax rounded to dtype ('bfloat16' or 'float16': x's dtype, or the compute dtype of a float32\n"
    "x — the base product then on x rounded to it and rounded itself), dequantized inside the GEMM's\n"
    "packing or, for a few tokens, a block at a time in cache. The handle reads the arrays as they are\n"
    "when used: it is valid while their contents stay those of one weight.";

PyObject *lf_py_q4_weight(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "q4_weight";
    static char *kwlist[] = {"data", "absmax", "shape", "blocksize", "quant_type", "dtype", "nested_absmax",
                             "nested_code", "nested_blocksize", "offset", NULL};
    lf_py_q4_args q = {.nested_absmax = Py_None, .nested_code = Py_None, .nested_blocksize = 256, .offset = 0.0};
    const char *sdtype = "bfloat16";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOLs|sOOLd:q4_weight", kwlist, &q.data, &q.absmax, &q.shape,
                                     &q.blocksize, &q.quant_type, &sdtype, &q.nested_absmax, &q.nested_code,
                                     &q.nested_blocksize, &q.offset))
        return NULL;
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *arrs[4];
    PyObject *cap = NULL;
    qweight_handle *h = PyMem_Calloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    if (lf_py_parse_qdtype(F, sdtype, &h->dt) || lf_py_parse_q4(PyModule_GetState(self), F, &L, &q, &h->w, arrs))
        PyMem_Free(h);
    else
        cap = new_qweight_handle(F, h, arrs);
    lf_py_drop_all(&L);
    return cap;
}

const char lf_py_q8_weight_doc[] =
    "q8_weight(CB, SCB, dtype='bfloat16') -> handle\n\n"
    "An 8-bit weight W (rows, cols) = (out_features, in_features) in bitsandbytes' LLM.int8 storage\n"
    "(lorafuse/quant.h): CB int8 (rows, cols) C-contiguous codes, SCB float32 (rows,) row scales; checked\n"
    "once and held as the handle lora_forward / lora_backward take as W, like q4_weight's. Its elements\n"
    "CB·(SCB·fl(1/127)) are rounded to dtype ('bfloat16' or 'float16': x's dtype), as bitsandbytes'\n"
    "Linear8bitLt computes in training (MatMul8bitFp); dequantized inside the GEMM's packing or, for a\n"
    "few tokens, a block at a time in cache. A float32 x is computed as for q4_weight (x rounded to\n"
    "dtype), which is not bitsandbytes' arithmetic for such x (it computes it in float32).";

PyObject *lf_py_q8_weight(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "q8_weight";
    static char *kwlist[] = {"CB", "SCB", "dtype", NULL};
    PyObject *ocb, *oscb;
    const char *sdtype = "bfloat16";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|s:q8_weight", kwlist, &ocb, &oscb, &sdtype)) return NULL;
    lf_state *st = PyModule_GetState(self);
    lf_py_arr_list L = {{0}, 0};
    PyObject *cap = NULL;
    PyArrayObject *cb, *scb;
    qweight_handle *h = PyMem_Calloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    if (lf_py_parse_qdtype(F, sdtype, &h->dt) || !(cb = lf_py_keep(&L, lf_py_quant_input(st, ocb, F, "CB", NPY_INT8, "int8"))) ||
        !(scb = lf_py_keep(&L, lf_py_quant_input(st, oscb, F, "SCB", NPY_FLOAT32, "float32"))))
        goto fail;
    if (PyArray_NDIM(cb) != 2 || PyArray_NDIM(scb) != 1 || PyArray_DIM(scb, 0) != PyArray_DIM(cb, 0)) {
        PyErr_Format(PyExc_ValueError, "%s: CB must be 2-D (rows, cols) and SCB 1-D (rows,) with one scale per row",
                     F);
        goto fail;
    }
    lf_qweight *w = &h->w;
    w->type = LF_Q8_ROW;
    w->data = PyArray_DATA(cb);
    w->nbytes = PyArray_SIZE(cb);
    w->rows = PyArray_DIM(cb, 0);
    w->cols = PyArray_DIM(cb, 1);
    w->blocksize = w->cols > 0 ? w->cols : 1;
    w->absmax = PyArray_DATA(scb);
    w->n_absmax = PyArray_SIZE(scb);
    const char *why = lf_qweight_unfit(w);
    if (why) {
        PyErr_Format(PyExc_ValueError, "%s: %s", F, why);
        goto fail;
    }
    PyArrayObject *arrs[4] = {cb, scb, NULL, NULL};
    cap = new_qweight_handle(F, h, arrs);
    lf_py_drop_all(&L);
    return cap;
fail:
    PyMem_Free(h);
    lf_py_drop_all(&L);
    return NULL;
}
