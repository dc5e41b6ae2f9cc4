/* half.h — the bf16 / fp16 bodies of lorafuse._C.lora_forward and lora_backward (half.c), called by
 * module.c once it has parsed the call and found x (g) half precision; also of dora_forward and
 * dora_backward (a half base with DoRA's column scale, lf_col_scale). The structs carry what
 * module.c parsed; each function returns the call's result (a new reference) or NULL with the
 * exception set. Include after <numpy/arrayobject.h> and args.h. */
#ifndef LORAFUSE_HALF_H
#define LORAFUSE_HALF_H

typedef struct {
    const char *F;
    PyObject *oW, *oA, *oB, *obias, *oy, *ou, *opacked, *oplan;
    float scale, p;
    uint64_t seed;
    int fifo, need_u;
    const lf_forward_plan *force; /* NULL: the kernels' own plan */
    PyObject *ocol;               /* dora_forward's col_scale (the result then (y, u, z)), or NULL */
} lf_py_forward_call;

typedef struct {
    const char *F;
    PyObject *ox, *ou, *oW, *oA, *oB, *odx, *odA, *odB, *opacked, *oplan;
    float scale, p;
    uint64_t seed;
    int fifo, need_dx;
    const lf_backward_plan *force;
    PyObject *ocol, *oz; /* dora_backward's col_scale and z (the result then (dx, dA, dB, dc)), or NULL */
    int need_dc;
} lf_py_backward_call;

/* 1 and *dt if W is a quantized weight's handle (its elements' dtype) or an array / tensor of a half dtype:
 * the weights half.c computes on, a float32 x (g) then 'mixed'; else 0 (no exception set). arr (or NULL):
 * W as an ndarray (a new reference, or NULL for a handle or an object that is none), for the caller to reuse. */
int lf_py_half_weight(lf_state *st, PyObject *oW, lf_dtype *dt, PyArrayObject **arr);

/* DoRA's arguments, for dora_forward / dora_backward here and dora_grad_scale (dora.c); NULL with the exception
 * set (TypeError / ValueError naming them):
 *   lf_py_dora_col_scale: col_scale (m,) float32, C-contiguous (copied if it is not), kept in L; `expected` says
 *                         where m comes from, for the error
 *   lf_py_dora_z:         z float32 of g's shape, C-contiguous, kept in L */
PyArrayObject *lf_py_dora_col_scale(lf_state *st, lf_py_arr_list *L, const char *F, PyObject *ocol, npy_intp m,
                                    const char *expected);
PyArrayObject *lf_py_dora_z(lf_state *st, lf_py_arr_list *L, const char *F, PyObject *oz, PyArrayObject *g);

PyObject *lf_py_lora_forward_half(lf_state *st, lf_py_arr_list *L, PyArrayObject *x, lf_dtype xdt,
                                  const lf_py_forward_call *c);
PyObject *lf_py_lora_backward_half(lf_state *st, lf_py_arr_list *L, PyArrayObject *g, lf_dtype gdt,
                                   const lf_py_backward_call *c);

#endif
