/* status_py.h — the one mapping of a kernel status (lorafuse/status.h) to a Python exception, used
 * by both extension modules: lorafuse._C (runtime.c, lf_py_raise_status) and lorafuse._C_cuda
 * (cuda_module.c). Header-only so that each module compiles it in without a shared object.
 *
 *   LF_EINVAL, LF_EOVERFLOW, LF_EISA -> ValueError (a bad argument, sizes, an ISA this CPU lacks)
 *   LF_ENOMEM                         -> MemoryError
 *   LF_EINTR                          -> KeyboardInterrupt (no message: Ctrl-C)
 *   LF_EINTERNAL, unknown codes       -> RuntimeError (a lorafuse bug)
 *   LF_ECUDA, LF_ECUBLAS              -> `device_error` (lorafuse._C_cuda.CudaError), RuntimeError if NULL
 * The message is "<entry>: <detail>": detail is the failing library's thread-local message
 * (lf_cuda_last_error()) when it has one, else lf_status_name(status).
 */
#ifndef LORAFUSE_STATUS_PY_H
#define LORAFUSE_STATUS_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "lorafuse/status.h"

/* Sets the exception for a nonzero status and returns NULL. detail may be NULL or "". */
static inline PyObject *lf_py_status_error(int status, const char *entry, const char *detail, PyObject *device_error) {
    PyObject *type;
    int known = 1;
    switch (status) {
    case LF_EINTR: PyErr_SetNone(PyExc_KeyboardInterrupt); return NULL;
    case LF_ENOMEM: type = PyExc_MemoryError; break;
    case LF_EINVAL:
    case LF_EOVERFLOW:
    case LF_EISA: type = PyExc_ValueError; break;
    case LF_ECUDA:
    case LF_ECUBLAS: type = device_error ? device_error : PyExc_RuntimeError; break;
    case LF_EINTERNAL: type = PyExc_RuntimeError; break;
    default: type = PyExc_RuntimeError; known = 0; break;
    }
    if (detail && detail[0]) return PyErr_Format(type, "%s: %s", entry, detail);
    if (!known) /* not a code of status.h (LF_OK included): show the number */
        return PyErr_Format(type, "%s: %s %d", entry, lf_status_name(status), status);
    return PyErr_Format(type, "%s: %s", entry, lf_status_name(status));
}

#endif /* LORAFUSE_STATUS_PY_H */
