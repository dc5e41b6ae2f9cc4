/* plans.c — lorafuse._C.last_forward_plan() / last_backward_plan(): the plans the last lora_forward /
 * lora_backward call ran (kernels/cpu/lora.c lf_plan_forward / lf_plan_backward, kept in the module
 * state by module.c), as path names for tests and debugging. */
#include "runtime.h"

const char lf_py_last_forward_plan_doc[] =
    "last_forward_plan() -> (u_path, y_path) or None\n\n"
    "The paths the last lora_forward call of this process took (any thread; a debugging aid):\n"
    "u_path in 'none' (u not formed), 'rowdots', 'skinny', 'gemm'; y_path in 'merged', 'decode',\n"
    "'few_tokens', 'augmented' (kernels/cpu/lora.c, lf_plan_forward). None before the first call.";

PyObject *lf_py_last_forward_plan(PyObject *module, PyObject *noargs) {
    (void)noargs;
    static const char *const u_names[] = {"none", "rowdots", "skinny", "gemm"};
    static const char *const y_names[] = {"merged", "decode", "few_tokens", "augmented"};
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
    static const char *const two_names[] = {"skinny", "gemm"};
    static const char *const dx_names[] = {"none", "augmented", "masked"};
    const lf_state *st = PyModule_GetState(module);
    if (!st->has_backward_plan) Py_RETURN_NONE;
    const lf_backward_plan *plan = &st->last_backward_plan;
    return Py_BuildValue("(sss)", two_names[plan->vb], two_names[plan->da], dx_names[plan->dx]);
}
