/* dlpack_in.h — read a DLPack producer (a CPU torch tensor, or anything with __dlpack__) as an
 * ndarray viewing the same memory, without numpy.from_dlpack's Python round trip. */
#ifndef LORAFUSE_DLPACK_IN_H
#define LORAFUSE_DLPACK_IN_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Exporters looked up once: torch.Tensor and torch.utils.dlpack.to_dlpack (a C function, ~10×
 * cheaper than Tensor.__dlpack__, which is Python code) — NULL until torch has been imported. */
typedef struct {
    PyObject *tensor_type;
    PyObject *to_dlpack;
} lf_dlpack_exporters;

/* How obj can be read through DLPack: LF_DLPACK_TORCH (a torch tensor, told by its type without
 * an attribute lookup), LF_DLPACK_OTHER (anything else with __dlpack__), LF_DLPACK_NONE; -1 with
 * an exception set */
enum { LF_DLPACK_NONE = 0, LF_DLPACK_OTHER = 1, LF_DLPACK_TORCH = 2 };
int lf_dlpack_kind(lf_dlpack_exporters *ex, PyObject *obj);

/* New reference to an ndarray (any dtype the capsule holds; the caller checks it) viewing obj's
 * memory, the DLPack capsule kept alive as its base; or NULL with TypeError naming func and name
 * (non-CPU device, lanes ≠ 1, unsupported dtype, exporter error). kind: lf_dlpack_kind(obj), not
 * NONE. requires_grad: NULL, or set to 1 for a torch tensor that requires grad (the caller
 * decides whether it may be written). bfloat16: NULL (a bfloat16 capsule is refused: NumPy has no
 * such dtype), or set to 1 when the capsule holds bfloat16, returned as a uint16 array of its bits. */
PyObject *lf_array_from_dlpack(lf_dlpack_exporters *ex, PyObject *obj, int kind, const char *func, const char *name,
                               int *requires_grad, int *bfloat16);

void lf_dlpack_exporters_clear(lf_dlpack_exporters *ex);

#endif
