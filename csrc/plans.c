/* plans.c — the kernels' plans (kernels/cpu/lora.c lf_plan_forward / lf_plan_backward) as path
 * names: _C.last_forward_plan() / last_backward_plan() report the plans the last lora_forward /
 * lora_backward call ran (kept in the module state by module.c), and the `plan=` argument of those
 * calls forces one (lf_py_parse_*_plan). */
#include "runtime.h"

#include <string.h>

/* Path names, indexed by the enums of lorafuse/kernels.h. */
static const char *const u_names[] = {"none", "rowdots", "skinny", "gemm", NULL};
static const char *const y_names[] = {"merged", "decode", "few_tokens", "augmented", "split", NULL};
static const char *const two_names[] = {"skinny", "gemm", NULL};
static const char *const dx_names[] = {"none", "augmented", "masked", NULL};

const char lf_py_last_forward_plan_doc[] =
    "last_forward_plan() -> (u_path, y_path) or None\n\n"
    "The paths the last lora_forward call of this process took (any thread; a debugging aid):\n"
    "u_path in 'none' (u not formed), 'rowdots', 'skinny', 'gemm'; y_path in 'merged', 'decode',\n"
    "'few_tokens', 'augmented', 'split' (kernels/cpu/lora.c lf_plan_forward; bf16 / fp16 bases:\n"
    "lora_half.c lf_plan_forward_half). None before the first call.";

PyObject *lf_py_last_forward_plan(PyObject *module, PyObject *noargs) {
    (void)noargs;
    const lf_state *st = PyModule_GetState(module);
    if (!st->has_forward_plan) Py_RETURN_NONE;
    return Py_BuildValue("(ss)", u_names[st->last_forward_plan.u], y_names[st->last_forward_plan.y]);
}

const char lf_py_last_backward_plan_doc[] =
    "last_backward_plan() -> (v_dB_path, dA_path, dx_path) or None\n\n"
    "The paths the last lora_backward call of this process took (any thread; a debugging aid):\n"
    "v_dB_path and dA_path in 'skinny', 'gemm'; dx_path in 'none', 'augmented', 'masked'\n"
    "(kernels/cpu/lora.c, lf_plan_backward). None before the first call.";

PyObject *lf_py_last_backward_plan(PyObject *module, PyObject *noargs) {
    (void)noargs;
    const lf_state *st = PyModule_GetState(module);
    if (!st->has_backward_plan) Py_RETURN_NONE;
    const lf_backward_plan *plan = &st->last_backward_plan;
    return Py_BuildValue("(sss)", two_names[plan->vb], two_names[plan->da], dx_names[plan->dx]);
}

const char lf_py_clear_last_plans_doc[] =
    "clear_last_plans() -> None\n\n"
    "Forget the last plans: last_forward_plan() and last_backward_plan() return None until the next\n"
    "lora_forward / lora_backward call (benchmarks label what one call ran with it).";

PyObject *lf_py_clear_last_plans(PyObject *module, PyObject *noargs) {
    (void)noargs;
    lf_state *st = PyModule_GetState(module);
    st->has_forward_plan = st->has_backward_plan = 0;
    Py_RETURN_NONE;
}

/* `obj` is a tuple of len(tables) path names; out[i] = the index of its i-th name in tables[i]. */
static int parse_names(PyObject *obj, const char *func, const char *what, const char *const *const *tables,
                       int count, int *out) {
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != count) {
        PyErr_Format(PyExc_TypeError, "%s: plan must be None or a tuple of %d path names %s, got %R", func, count,
                     what, obj);
        return -1;
    }
    for (int i = 0; i < count; i++) {
        PyObject *name = PyTuple_GET_ITEM(obj, i);
        const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
        if (!s) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: plan[%d] must be a str, got %R", func, i, name);
            return -1;
        }
        out[i] = -1;
        for (int j = 0; tables[i][j]; j++)
            if (!strcmp(s, tables[i][j])) out[i] = j;
        if (out[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: plan[%d] %R is not a path of %s", func, i, name, what);
            return -1;
        }
    }
    return 0;
}

int lf_py_parse_forward_plan(PyObject *obj, const char *func, lf_forward_plan *plan) {
    static const char *const *const tables[] = {u_names, y_names};
    int idx[2];
    if (parse_names(obj, func, "(u_path, y_path)", tables, 2, idx)) return -1;
    plan->u = (lf_forward_u_path)idx[0];
    plan->y = (lf_forward_y_path)idx[1];
    return 0;
}

int lf_py_parse_backward_plan(PyObject *obj, const char *func, lf_backward_plan *plan) {
    static const char *const *const tables[] = {two_names, two_names, dx_names};
    int idx[3];
    if (parse_names(obj, func, "(v_dB_path, dA_path, dx_path)", tables, 3, idx)) return -1;
    plan->vb = (lf_backward_vb_path)idx[0];
    plan->da = (lf_backward_da_path)idx[1];
    plan->dx = (lf_backward_dx_path)idx[2];
    return 0;
}

int lf_py_plan_unfit(const char *func, PyObject *obj, const char *why) {
    if (!why) return 0;
    PyErr_Format(PyExc_ValueError, "%s: plan %R cannot run these operands: %s", func, obj, why);
    return -1;
}
