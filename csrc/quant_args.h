/* quant_args.h — what quant.c and qweight.c share to read a stored weight's arguments (Python objects) into an
 * lf_qweight. Include after <numpy/arrayobject.h>, args.h and runtime.h. */
#ifndef LORAFUSE_QUANT_ARGS_H
#define LORAFUSE_QUANT_ARGS_H

#include "lorafuse/quant.h"

/* The arguments describing a stored 4-bit weight that dequant_4bit, q4gemm and q4_weight share. */
typedef struct {
    PyObject *data, *absmax, *shape, *nested_absmax, *nested_code;
    long long blocksize, nested_blocksize;
    const char *quant_type;
    double offset;
} lf_py_q4_args;

/* An input of NumPy type `type` (native order), as a C-contiguous aligned array (copied if it is not one);
 * NULL with TypeError naming it and `what` (the dtype expected) */
PyArrayObject *lf_py_quant_input(lf_state *st, PyObject *obj, const char *F, const char *name, int type,
                                 const char *what);
/* 'float32' / 'bfloat16' / 'float16'; -1 with ValueError otherwise */
int lf_py_parse_qdtype(const char *F, const char *s, lf_dtype *dt);
/* *w from q (its pointers into arrays kept in L; arrs[0..3] = data, absmax, nested_absmax, nested_code, the
 * last two NULL when not nested), checked with lf_qweight_unfit. 0, or -1 with TypeError / ValueError naming
 * the argument. */
int lf_py_parse_q4(lf_state *st, const char *F, lf_py_arr_list *L, const lf_py_q4_args *q, lf_qweight *w,
                   PyArrayObject *arrs[4]);

#endif
