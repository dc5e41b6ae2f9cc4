/* dlpack_in.c — DLPack (v0.8 unversioned ABI: capsule "dltensor") → ndarray view.
 *
 * The protocol: the producer's capsule owns a DLManagedTensor; a consumer that does not rename
 * the capsule to "used_dltensor" leaves the deleter to the capsule's destructor. We keep the
 * capsule itself as the array's base, so the producer's memory lives exactly as long as the
 * view, and the producer's destructor frees its DLManagedTensor. */
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include "dlpack_in.h"

#include <numpy/arrayobject.h>
#include <stdint.h>
#include <stdio.h>

/* The DLPack ABI (dlpack.h, stable since v0.6): only the fields read here. */
typedef struct {
    int32_t device_type; /* 1 = kDLCPU */
    int32_t device_id;
} dl_device;
typedef struct {
    uint8_t code; /* 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool */
    uint8_t bits;
    uint16_t lanes;
} dl_dtype;
typedef struct {
    void *data;
    dl_device device;
    int32_t ndim;
    dl_dtype dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL = C-contiguous */
    uint64_t byte_offset;
} dl_tensor;
typedef struct {
    dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(void *self);
} dl_managed_tensor;

enum { DL_CPU = 1, DL_INT = 0, DL_UINT = 1, DL_FLOAT = 2, DL_BFLOAT = 4, DL_COMPLEX = 5, DL_BOOL = 6 };

static int npy_type_of(dl_dtype t) {
    if (t.lanes != 1) return -1;
    switch (t.code) {
    case DL_FLOAT: return t.bits == 16 ? NPY_FLOAT16 : t.bits == 32 ? NPY_FLOAT32 : t.bits == 64 ? NPY_FLOAT64 : -1;
    case DL_INT:
        return t.bits == 8 ? NPY_INT8 : t.bits == 16 ? NPY_INT16 : t.bits == 32 ? NPY_INT32 : t.bits == 64 ? NPY_INT64 : -1;
    case DL_UINT:
        return t.bits == 8 ? NPY_UINT8 : t.bits == 16 ? NPY_UINT16 : t.bits == 32 ? NPY_UINT32
                                                                     : t.bits == 64 ? NPY_UINT64 : -1;
    case DL_COMPLEX: return t.bits == 64 ? NPY_COMPLEX64 : t.bits == 128 ? NPY_COMPLEX128 : -1;
    case DL_BOOL: return t.bits == 8 ? NPY_BOOL : -1;
    default: return -1;
    }
}

static const char *dtype_name(dl_dtype t) {
    static const char *names[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    return t.code < sizeof names / sizeof names[0] ? names[t.code] : "unknown";
}

/* torch.Tensor and torch.utils.dlpack.to_dlpack once torch is in sys.modules (never imported
 * here); 0 while it is not, -1 on error */
static int find_torch(lf_dlpack_exporters *ex) {
    if (ex->to_dlpack) return 1;
    PyObject *name = PyUnicode_InternFromString("torch");
    PyObject *torch = name ? PyImport_GetModule(name) : NULL;
    Py_XDECREF(name);
    if (!torch) return PyErr_Occurred() ? -1 : 0;
    PyObject *dl = PyImport_ImportModule("torch.utils.dlpack");
    ex->tensor_type = PyObject_GetAttrString(torch, "Tensor");
    ex->to_dlpack = dl ? PyObject_GetAttrString(dl, "to_dlpack") : NULL;
    Py_DECREF(torch);
    Py_XDECREF(dl);
    if (!ex->tensor_type || !ex->to_dlpack) {
        lf_dlpack_exporters_clear(ex);
        return -1;
    }
    return 1;
}

void lf_dlpack_exporters_clear(lf_dlpack_exporters *ex) {
    Py_CLEAR(ex->tensor_type);
    Py_CLEAR(ex->to_dlpack);
}

/* obj's capsule: torch tensors through to_dlpack (it exports tensors that require grad too;
 * *requires_grad tells), anything else through obj.__dlpack__() */
static PyObject *export_capsule(lf_dlpack_exporters *ex, PyObject *obj, int kind, int *requires_grad) {
    if (requires_grad) *requires_grad = 0;
    if (kind == LF_DLPACK_TORCH) {
        if (requires_grad) { /* asked for outputs only: each attribute read costs µs on cold caches */
            PyObject *rg = PyObject_GetAttrString(obj, "requires_grad");
            if (!rg) return NULL;
            *requires_grad = PyObject_IsTrue(rg) == 1;
            Py_DECREF(rg);
        }
        return PyObject_CallOneArg(ex->to_dlpack, obj);
    }
    return PyObject_CallMethod(obj, "__dlpack__", NULL);
}

int lf_dlpack_kind(lf_dlpack_exporters *ex, PyObject *obj) {
    const int have_torch = find_torch(ex);
    if (have_torch < 0) return -1;
    if (have_torch && PyObject_TypeCheck(obj, (PyTypeObject *)ex->tensor_type)) return LF_DLPACK_TORCH;
    return PyObject_HasAttrString(obj, "__dlpack__") ? LF_DLPACK_OTHER : LF_DLPACK_NONE;
}

/* TypeError "<func>: <name> (a <type>) cannot be read as a CPU array: <why>" */
static PyObject *refuse(PyObject *obj, const char *func, const char *name, const char *why) {
    PyErr_Format(PyExc_TypeError, "%s: %s (a %s) cannot be read as a CPU array: %s", func, name,
                 Py_TYPE(obj)->tp_name, why);
    return NULL;
}

PyObject *lf_array_from_dlpack(lf_dlpack_exporters *ex, PyObject *obj, int kind, const char *func, const char *name,
                               int *requires_grad, int *bfloat16) {
    if (bfloat16) *bfloat16 = 0;
    PyObject *capsule = export_capsule(ex, obj, kind, requires_grad);
    if (!capsule) { /* e.g. a sparse or meta tensor: the exporter's message, as a TypeError */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(PyExc_TypeError, "%s: %s (a %s) cannot be read as a CPU array: %S", func, name,
                     Py_TYPE(obj)->tp_name, value ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return NULL;
    }
    PyObject *arr = NULL;
    dl_managed_tensor *mt = PyCapsule_IsValid(capsule, "dltensor") ? PyCapsule_GetPointer(capsule, "dltensor") : NULL;
    if (!mt) {
        PyErr_Clear();
        refuse(obj, func, name, "its __dlpack__ did not return an unconsumed \"dltensor\" capsule");
        goto done;
    }
    const dl_tensor *t = &mt->dl_tensor;
    if (t->device.device_type != DL_CPU) {
        char why[64];
        snprintf(why, sizeof why, "it is on DLPack device type %d, not the CPU", (int)t->device.device_type);
        refuse(obj, func, name, why);
        goto done;
    }
    const int is_bf16 = t->dtype.code == DL_BFLOAT && t->dtype.bits == 16 && t->dtype.lanes == 1;
    const int type_num = is_bf16 && bfloat16 ? NPY_UINT16 : npy_type_of(t->dtype); /* bf16: its bits */
    if (is_bf16 && bfloat16) *bfloat16 = 1;
    if (type_num < 0) {
        char why[80];
        snprintf(why, sizeof why, "its dtype (%s%d x%d) has no NumPy equivalent", dtype_name(t->dtype),
                 (int)t->dtype.bits, (int)t->dtype.lanes);
        refuse(obj, func, name, why);
        goto done;
    }
    if (t->ndim < 0 || t->ndim > NPY_MAXDIMS) {
        refuse(obj, func, name, "too many dimensions");
        goto done;
    }
    npy_intp dims[NPY_MAXDIMS], strides[NPY_MAXDIMS];
    const npy_intp item = (npy_intp)t->dtype.bits / 8;
    npy_intp contiguous = item;
    for (int d = t->ndim - 1; d >= 0; d--) {
        dims[d] = (npy_intp)t->shape[d];
        strides[d] = t->strides ? (npy_intp)t->strides[d] * item : contiguous;
        contiguous *= dims[d];
    }
    PyArray_Descr *descr = PyArray_DescrFromType(type_num);
    arr = descr ? PyArray_NewFromDescr(&PyArray_Type, descr, t->ndim, dims, strides,
                                       t->data ? (char *)t->data + t->byte_offset : NULL, NPY_ARRAY_WRITEABLE, NULL)
                : NULL;
    if (arr) {
        Py_INCREF(capsule);
        if (PyArray_SetBaseObject((PyArrayObject *)arr, capsule) < 0) Py_CLEAR(arr);
    }
done:
    Py_DECREF(capsule);
    return arr;
}
