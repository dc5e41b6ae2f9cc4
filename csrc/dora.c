/* dora.c — lorafuse._C.dora_forward and dora_backward: the fused LoRA kernels on a bf16 / fp16 base with
 * DoRA's column scale c = μ/ν (kernels.h lf_col_scale; python/lorafuse/dora.py, DoraHalfFunction): the
 * arguments parsed here, the body shared with lora_forward / lora_backward's half path (half.c). x and g
 * bfloat16 or float16 (torch tensors through DLPack, or NumPy float16), W of their dtype, A, B and
 * col_scale float32, bias float32 or the base's dtype; no dropout (DoRA with dropout stays in Python).
 * dora_grad_scale: the float32 layer's pass over g (g ⊙ c and Σ g ⊙ z̃ at once; lf_dora_grad_f32).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "args.h"
#include "half.h"
#include "runtime.h"

/* What both entries share once their arguments are parsed: scale, x (g) as an array of a half dtype (float32 is
 * a TypeError: DoRA's mixed case is not fused), then half.c's forward (fc) or backward (bc) body with the scale
 * filled in. The call's result, or NULL with the exception set */
static PyObject *run_half(PyObject *self, const char *F, PyObject *oscale, PyObject *obj, const char *name,
                          const char *shape, lf_py_forward_call *fc, lf_py_backward_call *bc) {
    lf_state *st = PyModule_GetState(self);
    float scale, p;
    uint64_t seed;
    if (lf_py_parse_scalars(oscale, NULL, NULL, F, &scale, &p, &seed)) return NULL;
    lf_py_arr_list L = {{0}, 0};
    lf_dtype dt;
    PyArrayObject *a = lf_py_keep(&L, lf_py_as_typed(st, obj, F, name, &dt));
    PyObject *res = NULL;
    if (a && !lf_py_check_ndim(F, name, a, 0, shape)) {
        if (dt == LF_DT_F32) {
            PyErr_Format(PyExc_TypeError, "%s: %s must be bfloat16 or float16, got float32", F, name);
        } else if (fc) {
            fc->scale = scale;
            res = lf_py_lora_forward_half(st, &L, a, dt, fc);
        } else {
            bc->scale = scale;
            res = lf_py_lora_backward_half(st, &L, a, dt, bc);
        }
    }
    lf_py_drop_all(&L);
    return res;
}

const char lf_py_dora_forward_doc[] =
    "dora_forward(x, W, A, B, scale, col_scale, bias=None, fan_in_fan_out=False, need_z=True, plan=None)\n"
    "    -> (y, u, z)\n\n"
    "DoRA on a bf16 / fp16 base: z = round(x·Wᵀ) + scale·u·Bᵀ (the base product rounded to W's dtype alone,\n"
    "the sum float32), u = x·Aᵀ, y = round(bias + col_scale ⊙ z) in x's dtype. x (..., k) and W (m, k) — (k, m)\n"
    "if fan_in_fan_out — one half dtype; A (r, k), B (m, r), col_scale (m,) float32 (μ/ν); bias (m,).\n"
    "need_z=False (no backward to come): (y, None, None). plan: as lora_forward's.";

PyObject *lf_py_dora_forward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "dora_forward";
    static char *kwlist[] = {"x", "W", "A", "B", "scale", "col_scale", "bias", "fan_in_fan_out", "need_z", "plan",
                             NULL};
    PyObject *ox, *oW, *oA, *oB, *oscale, *ocol, *obias = Py_None, *oplan = Py_None;
    int fifo = 0, need_z = 1;
    lf_forward_plan force;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO|OppO:dora_forward", kwlist, &ox, &oW, &oA, &oB, &oscale,
                                     &ocol, &obias, &fifo, &need_z, &oplan) ||
        (oplan != Py_None && lf_py_parse_forward_plan(oplan, F, &force)))
        return NULL;
    lf_py_forward_call call = {F,    oW,    oA,   oB, obias,  Py_None,                          Py_None, Py_None,
                               oplan, 0.0f, 0.0f, 0,  fifo,   need_z, oplan != Py_None ? &force : NULL, ocol};
    return run_half(self, F, oscale, ox, "x", "(..., k)", &call, NULL);
}

const char lf_py_dora_backward_doc[] =
    "dora_backward(g, x, u, z, W, A, B, scale, col_scale, need_dx=True, need_dc=True, fan_in_fan_out=False,\n"
    "              plan=None) -> (dx or None, dA, dB, dc or None)\n\n"
    "dora_forward's adapter-only backward on g' = g ⊙ col_scale: v = g'·B, dB = scale·g'ᵀ·u, dA = scale·vᵀ·x,\n"
    "dx = round(round(round(g')·W) + scale·v·A) in g's dtype, and dc = Σ_i g ⊙ z (m,) float32 (DoRA's\n"
    "magnitude gradient is dc / ν). g (..., m) and x one half dtype; u, z as dora_forward returned them (z is\n"
    "read only for dc). plan: as lora_backward's.";

PyObject *lf_py_dora_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "dora_backward";
    static char *kwlist[] = {"g", "x", "u", "z", "W", "A", "B", "scale", "col_scale", "need_dx", "need_dc",
                             "fan_in_fan_out", "plan", NULL};
    PyObject *og, *ox, *ou, *oz, *oW, *oA, *oB, *oscale, *ocol, *oplan = Py_None;
    int need_dx = 1, need_dc = 1, fifo = 0;
    lf_backward_plan force;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOO|pppO:dora_backward", kwlist, &og, &ox, &ou, &oz, &oW, &oA,
                                     &oB, &oscale, &ocol, &need_dx, &need_dc, &fifo, &oplan) ||
        (oplan != Py_None && lf_py_parse_backward_plan(oplan, F, &force)))
        return NULL;
    lf_py_backward_call call = {F,       ox,    ou,   oW,   oA,   oB,   Py_None, Py_None, Py_None,
                                Py_None, oplan, 0.0f, 0.0f, 0,    fifo, need_dx, oplan != Py_None ? &force : NULL,
                                ocol,    oz,    need_dc};
    return run_half(self, F, oscale, og, "g", "(..., m)", NULL, &call);
}

const char lf_py_dora_grad_scale_doc[] =
    "dora_grad_scale(g, col_scale, z=None) -> (g_scaled, dc or None)\n\n"
    "DoRA's pass over a float32 upstream gradient: g_scaled = g ⊙ col_scale (g's shape, C-contiguous) and\n"
    "dc = Σ_i g ⊙ z (m,) float32 — the magnitude's gradient times the norms — in one read of g and z.\n"
    "g (..., m) float32, any strides; col_scale (m,) float32; z (g's shape) float32, or None: dc not summed.";

PyObject *lf_py_dora_grad_scale(PyObject *self, PyObject *args, PyObject *kw) {
    static const char *F = "dora_grad_scale";
    static char *kwlist[] = {"g", "col_scale", "z", NULL};
    PyObject *og, *ocol, *oz = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:dora_grad_scale", kwlist, &og, &ocol, &oz)) return NULL;
    lf_state *st = PyModule_GetState(self);
    lf_py_arr_list L = {{0}, 0};
    PyArrayObject *g, *col, *z = NULL, *g2, *z2 = NULL, *out, *dc = NULL;
    if (!(g = lf_py_keep(&L, lf_py_as_f32(st, og, F, "g"))) || lf_py_check_ndim(F, "g", g, 0, "(..., m)")) goto fail;
    const npy_intp m = PyArray_DIM(g, PyArray_NDIM(g) - 1);
    if (!(col = lf_py_dora_col_scale(st, &L, F, ocol, m, "(m,) with m = g.shape[-1]"))) goto fail;
    if (oz != Py_None && (!(z = lf_py_dora_z(st, &L, F, oz, g)) || !(z2 = lf_py_keep(&L, lf_py_flatten_2d(z, m))) ||
                          !(dc = lf_py_keep(&L, lf_py_new_output(st, col, m)))))
        goto fail;
    if (!(out = lf_py_keep(&L, lf_py_new_output(st, g, m))) || !(g2 = lf_py_keep(&L, lf_py_flatten_2d(g, m)))) goto fail;
    {
        const npy_intp n = PyArray_DIM(g2, 0);
        const lf_view vg = lf_py_view2(g2);
        const float *pc = PyArray_DATA(col), *pz = z2 ? PyArray_DATA(z2) : NULL;
        float *po = PyArray_DATA(out), *pdc = dc ? PyArray_DATA(dc) : NULL;
        lf_py_sigint_guard guard;
        lf_pool *pool = lf_py_kernel_begin(st, 3.0 * (double)n * (double)m, &guard);
        int status;
        Py_BEGIN_ALLOW_THREADS status = lf_dora_grad_f32(pool, n, m, vg, pc, pz, m, po, pdc);
        Py_END_ALLOW_THREADS
        if (lf_py_kernel_end(st, &guard, status, F)) goto fail;
    }
    PyObject *res = PyTuple_Pack(2, (PyObject *)out, dc ? (PyObject *)dc : Py_None);
    lf_py_drop_all(&L);
    return res;
fail:
    lf_py_drop_all(&L);
    return NULL;
}
