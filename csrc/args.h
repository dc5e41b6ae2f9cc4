/* args.h — argument conversion and validation for lorafuse._C's entry points (args.c): Python
 * objects to float32 ndarrays and kernel views, shape / output / aliasing checks with errors that
 * name the argument, the scalar arguments, pack_weight's capsule, and the list of arrays one call
 * holds. On failure a function returns NULL (pointers) or -1 (int; 0 on success) with the Python
 * exception set; lf_py_overlaps (0 or 1), the views and lf_py_drop_all cannot fail. Each function's
 * contract is commented at its definition.
 *
 * Include after <numpy/arrayobject.h> (each file sets up NumPy's C API its own way).
 */
#ifndef LORAFUSE_ARGS_H
#define LORAFUSE_ARGS_H

#include <stdint.h>

#include "lorafuse/kernels.h"
#include "runtime.h"

/* The name of pack_weight's capsules (module.c makes them, lf_py_parse_packed reads them). */
#define LF_PY_PACKED_NAME "lorafuse.packed_weight"

/* The arrays one call holds (new references), dropped together by lf_py_drop_all. */
#define LF_PY_MAX_ARRS 24
typedef struct {
    PyArrayObject *a[LF_PY_MAX_ARRS];
    int n;
} lf_py_arr_list;

PyArrayObject *lf_py_keep(lf_py_arr_list *l, PyArrayObject *a);
void lf_py_drop_all(lf_py_arr_list *l);

/* inputs */
PyArrayObject *lf_py_as_f32(lf_state *st, PyObject *obj, const char *func, const char *name);
PyArrayObject *lf_py_as_typed(lf_state *st, PyObject *obj, const char *F, const char *name, lf_dtype *dt);
lf_tview lf_py_tview2(PyArrayObject *a, lf_dtype dt);
const char *lf_py_dtype_name(lf_dtype dt); /* "float32", "bfloat16", "float16" */
PyArrayObject *lf_py_contiguous_if(PyArrayObject *a, int needed);
PyArrayObject *lf_py_flatten_2d(PyArrayObject *a, npy_intp last);
lf_view lf_py_view2(PyArrayObject *a);
lf_view lf_py_weight_view(PyArrayObject *W, int fifo, npy_intp *m, npy_intp *k);
int lf_py_parse_weights(lf_state *st, const char *F, lf_py_arr_list *L, PyObject *oW, PyObject *oA, PyObject *oB,
                        int fifo, npy_intp k, PyArrayObject **W, PyArrayObject **A, PyArrayObject **B,
                        npy_intp *m, npy_intp *r);
/* W (m, k) — (k, m) with fifo —, A (r, k), B (m, r) (2-D, checked) against each other and x's k; m, r out
 * (W NULL: a 4-bit W already checked, *m given) */
int lf_py_check_weight_dims(const char *F, PyArrayObject *W, PyArrayObject *A, PyArrayObject *B, int fifo,
                            npy_intp k, npy_intp *m, npy_intp *r);
int lf_py_parse_packed(PyObject *obj, const char *F, PyArrayObject *W, int fifo, int for_backward,
                       const lf_packed_b **out);

/* shapes */
int lf_py_check_ndim(const char *func, const char *name, PyArrayObject *a, int ndim, const char *what);
int lf_py_check_dim(const char *func, const char *name, const char *expected, PyArrayObject *a, int axis,
                    npy_intp want);
PyObject *lf_py_shape_str(PyArrayObject *a);
int lf_py_check_lead_dims(const char *F, PyArrayObject *g, PyArrayObject *x, PyArrayObject *u, npy_intp m,
                          npy_intp r);

/* outputs */
PyArrayObject *lf_py_new_output(lf_state *st, PyArrayObject *like, npy_intp last);
PyArrayObject *lf_py_new_2d(lf_state *st, npy_intp rows, npy_intp cols);
PyArrayObject *lf_py_check_output(lf_state *st, PyObject *obj, const char *func, const char *name,
                                  PyArrayObject *like, npy_intp d0, npy_intp last);
int lf_py_overlaps(PyArrayObject *a, PyArrayObject *b);
int lf_py_check_no_alias(const char *func, const char *oname, PyArrayObject *o, PyArrayObject **ins,
                         const char **names, int nin);

/* scalars */
int lf_py_parse_scale(PyObject *obj, const char *func, const char *name, float *out);
int lf_py_parse_dropout(PyObject *pobj, PyObject *seedobj, const char *func, float *p, uint64_t *seed);
int lf_py_parse_scalars(PyObject *oscale, PyObject *op, PyObject *oseed, const char *func, float *scale,
                        float *p, uint64_t *seed);

/* GEMM calls (hgemm.c; sgemm, hgemm and quant.c's q4gemm): see runtime.h lf_py_parse_alpha_beta */
PyObject *lf_py_gemm_run(lf_state *st, const char *F, lf_py_arr_list *L, npy_intp M, npy_intp N, npy_intp K,
                         float alpha, lf_tview va, lf_tview vb, PyArrayObject **ins, const char **names, int nin,
                         PyObject *obias, PyObject *oc, float beta);

#endif
