/* runtime.c — run-time plumbing of lorafuse._C (declared in runtime.h): the thread pool a call
 * holds while its kernel runs (and a resized pool's retirement), the Ctrl-C guard that lets a
 * long kernel be interrupted (per call), and kernel statuses (LF_E*) raised as Python exceptions through
 * the mapping both extension modules share (status_py.h).
 * No NumPy here: the module state is set up and torn down in module.c.
 */
#include "runtime.h"

#include <string.h>

/* ---------------------------------------------------------------- pool */

static void release_retired(lf_state *st) {
    if (st->retired && st->in_flight == 0) {
        lf_pool_destroy(st->retired);
        st->retired = NULL;
    }
}

lf_pool *lf_py_pool(lf_state *st) {
    if (lf_pool_after_fork(st->pool)) { /* a fork()'s child: the kernels the parent was running are not here */
        st->in_flight = 0;
        lf_pool_destroy(st->retired); /* the parent's: freed, nothing joined */
        st->retired = NULL;
    }
    return st->pool;
}

/* Take the pool for one call: the pointer stays valid until pool_release (see lf_py_pool_resize). */
static lf_pool *pool_acquire(lf_state *st) {
    lf_pool *pool = lf_py_pool(st);
    st->in_flight++;
    return pool;
}

static void pool_release(lf_state *st) {
    st->in_flight--;
    release_retired(st);
}

/* set_num_threads: a pool still held by running kernels is retired, not destroyed */
int lf_py_pool_resize(lf_state *st, int n) {
    if (lf_pool_threads(lf_py_pool(st)) == n) return 0;
    release_retired(st);
    if (st->retired) { /* a pool replaced earlier is still in use by a running kernel */
        PyErr_Format(PyExc_RuntimeError, "set_num_threads: kernels are still running");
        return -1;
    }
    lf_pool *fresh = lf_pool_create(n);
    if (!fresh) {
        PyErr_NoMemory();
        return -1;
    }
    st->retired = st->pool; /* freed as soon as no kernel holds it */
    st->pool = fresh;
    release_retired(st);
    return 0;
}

/* ---------------------------------------------------------------- Ctrl-C
 * A long kernel runs with the GIL released, so Python's SIGINT handler cannot raise until it
 * returns. Every call binds a cancellation token of its own to its thread (kernels.h). For calls
 * above LF_INTERRUPTIBLE_FLOPS made from the main thread while SIGINT has Python's default
 * handler, we install a handler that requests that call's token — the kernels of that call stop
 * at their next block, those of calls on other threads run on — then restore Python's handler
 * and raise KeyboardInterrupt ourselves. A user's own SIGINT handler is never replaced. */
#define LF_INTERRUPTIBLE_FLOPS 2e7

static void on_sigint(int sig) {
    (void)sig;
    lf_interrupt_request();
}

static void guard_begin(lf_state *st, double flops, lf_py_sigint_guard *g) {
    g->installed = 0;
    g->cancel.requested = 0;
    lf_cancel_bind(&g->cancel);
    if (flops < LF_INTERRUPTIBLE_FLOPS || PyThread_get_thread_ident() != st->main_thread) return;
    PyObject *signum = PyLong_FromLong(SIGINT);
    PyObject *cur = signum ? PyObject_CallOneArg(st->getsignal, signum) : NULL;
    Py_XDECREF(signum);
    if (!cur) {
        PyErr_Clear();
        return;
    }
    const int is_default = cur == st->default_int_handler;
    Py_DECREF(cur);
    if (!is_default) return;
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_handler = on_sigint;
    sigemptyset(&ours.sa_mask);
    lf_interrupt_target(&g->cancel);
    g->installed = sigaction(SIGINT, &ours, &g->prev) == 0;
    if (!g->installed) lf_interrupt_target(NULL);
}

/* 1 if Ctrl-C arrived while the guard was up (KeyboardInterrupt is then set) */
static int guard_end(lf_py_sigint_guard *g) {
    lf_cancel_bind(NULL);
    if (!g->installed) return 0;
    sigaction(SIGINT, &g->prev, NULL);
    lf_interrupt_target(NULL);
    const int hit = __atomic_load_n(&g->cancel.requested, __ATOMIC_ACQUIRE);
    if (hit) PyErr_SetNone(PyExc_KeyboardInterrupt);
    return hit;
}

/* ---------------------------------------------------------------- errors */

#include "status_py.h"

/* the CPU kernels keep no detail message (lorafuse/status.h): the entry point and the code's name */
PyObject *lf_py_raise_status(int status, const char *func) { return lf_py_status_error(status, func, NULL, NULL); }

/* ---------------------------------------------------------------- a kernel call */

lf_pool *lf_py_kernel_begin(lf_state *st, double flops, lf_py_sigint_guard *g) {
    guard_begin(st, flops, g);
    return pool_acquire(st);
}

int lf_py_kernel_end(lf_state *st, lf_py_sigint_guard *g, int status, const char *func) {
    pool_release(st);
    if (guard_end(g)) return -1;
    if (status) {
        lf_py_raise_status(status, func);
        return -1;
    }
    return 0;
}
