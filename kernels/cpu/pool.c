/* pool.c — where the kernels' parallel regions run.
 *
 * Two pools on 2 cores fight: an OpenMP runtime keeps its workers spin-waiting for a while
 * after every parallel region, so a second runtime starting work then finds a core taken.
 * torch ships its own libgomp, so lorafuse links no OpenMP runtime at all. Instead:
 *   - when a libgomp is already loaded in the process (torch imports one, with global
 *     symbols), jobs run on it through GOMP_parallel: the very threads torch uses, one pool;
 *   - otherwise (NumPy-only use) on a small pthread pool whose workers spin only briefly
 *     (~tens of µs) after a job and then sleep on a condition variable.
 * Jobs are serialised by run_lock, so kernels may be called from many Python threads at once
 * (the GIL is released around them): each job owns every worker's scratch while it runs.
 * A fork()'s child has one thread, the forking one: the workers — libgomp's too, and any thread that held one of
 * the pool's locks — stayed in the parent, so a job would wait for them forever and lf_pool_destroy would join
 * threads that are not there. lf_pool_after_fork gives the child's pool fresh locks and workers of its own (never
 * libgomp's: its team is the parent's); the pool tells a child by one load, the process's fork count (below) against
 * the one it noted (getpid would be a system call on every kernel call: 0.7 µs on these VMs).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define LF_SCRATCH_SLOTS 4
#define LF_SPIN_ITERS 4000
#define LF_GOMP_RECHECK 1024 /* parallel jobs between looks for a libgomp loaded later */

/* libgomp's entry points (stable ABI since GCC 4.9) */
typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
typedef int (*omp_int_fn)(void);

typedef struct {
    void *p;
    size_t bytes;
} lf_scratch;

typedef struct {
    lf_pool *pool;
    int tid;
} lf_worker_arg;

struct lf_pool {
    int nthreads; /* including the caller, tid 0 */
    pthread_t *threads;
    lf_worker_arg *args;
    pthread_mutex_t run_lock; /* one job at a time */
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    lf_task_fn fn;
    void *ctx;
    int nt;
    lf_cancel *cancel;      /* the job's caller's cancellation token, bound on the workers */
    atomic_uint generation; /* bumped per job; workers wake on change */
    atomic_int remaining;   /* workers still running the current job */
    int stop;
    lf_scratch (*scratch)[LF_SCRATCH_SLOTS];
    gomp_parallel_fn gomp_parallel; /* NULL until a loaded libgomp is found */
    omp_int_fn omp_thread_num, omp_num_threads;
    unsigned gomp_misses; /* parallel jobs since the last look (under run_lock) */
    int no_openmp;        /* 1 in a fork()'s child: libgomp's team stayed in the parent */
    unsigned forks;       /* fork_count when the pool was made (or taken over by a child) */
};

/* The forks this process descends by: pthread_atfork's child handler adds one in every child. One of the few
 * process-wide values (dispatch.c holds the others): a fork is an event of the whole process. */
static atomic_uint fork_count;
static pthread_once_t fork_hook_once = PTHREAD_ONCE_INIT;
static int fork_hook_status; /* pthread_atfork's result: no pool is made without the hook */
static void on_fork_child(void) { atomic_fetch_add_explicit(&fork_count, 1u, memory_order_relaxed); }
static void hook_fork(void) { fork_hook_status = pthread_atfork(NULL, NULL, on_fork_child); }

/* 1 in a fork()'s child of the process the pool belongs to */
static int forked(const lf_pool *pool) {
    return atomic_load_explicit(&fork_count, memory_order_relaxed) != pool->forks;
}

/* Find a libgomp already loaded with global symbols (torch's); called under run_lock. */
static void find_gomp(lf_pool *pool) {
    if (pool->gomp_parallel || pool->no_openmp || pool->gomp_misses++ % LF_GOMP_RECHECK) return;
    void *par = dlsym(RTLD_DEFAULT, "GOMP_parallel");
    void *tn = dlsym(RTLD_DEFAULT, "omp_get_thread_num");
    void *nt = dlsym(RTLD_DEFAULT, "omp_get_num_threads");
    if (!par || !tn || !nt) return;
    /* function pointers from dlsym: the POSIX-sanctioned conversion through a union */
    union { void *p; gomp_parallel_fn f; } up = {par};
    union { void *p; omp_int_fn f; } ut = {tn}, un = {nt};
    pool->omp_thread_num = ut.f;
    pool->omp_num_threads = un.f;
    pool->gomp_parallel = up.f;
}

typedef struct {
    lf_pool *pool;
    lf_task_fn fn;
    void *ctx;
    int nt;
    lf_cancel *cancel;
} gomp_job;

/* Body of the OpenMP region: task ids tid, tid + team, … so every task runs even if the
 * runtime gave us a smaller team than asked. */
static void gomp_body(void *p) {
    gomp_job *job = p;
    const int team = job->pool->omp_num_threads(), me = job->pool->omp_thread_num();
    lf_cancel *const before = lf_cancel_bound(); /* torch's threads: leave them as found */
    lf_cancel_bind(job->cancel);
    for (int t = me; t < job->nt; t += team) job->fn(job->ctx, t, job->nt);
    lf_cancel_bind(before);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *argp) {
    lf_worker_arg *arg = argp;
    lf_pool *pool = arg->pool;
    unsigned seen = 0; /* the generation at creation: a job may be posted before we run */
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen &&
               spins < LF_SPIN_ITERS) {
            cpu_relax();
            spins++;
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool->mu);
            while ((gen = atomic_load(&pool->generation)) == seen && !pool->stop)
                pthread_cond_wait(&pool->cv_work, &pool->mu);
            const int stop = pool->stop;
            pthread_mutex_unlock(&pool->mu);
            if (stop) return NULL;
        }
        seen = gen;
        if (arg->tid < pool->nt) {
            lf_cancel_bind(pool->cancel);
            pool->fn(pool->ctx, arg->tid, pool->nt);
            lf_cancel_bind(NULL);
        }
        if (atomic_fetch_sub_explicit(&pool->remaining, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->mu);
            pthread_cond_signal(&pool->cv_done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

/* The pool's locks and job state as new, owned by this process (its fork count noted): no job posted. */
static void init_sync(lf_pool *pool) {
    pthread_mutex_init(&pool->run_lock, NULL);
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv_work, NULL);
    pthread_cond_init(&pool->cv_done, NULL);
    atomic_store(&pool->generation, 0u);
    atomic_store(&pool->remaining, 0);
    pool->forks = atomic_load(&fork_count);
}

lf_pool *lf_pool_create(int nthreads) {
    if (nthreads < 1 || pthread_once(&fork_hook_once, hook_fork) != 0 || fork_hook_status != 0) return NULL;
    lf_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->nthreads = nthreads;
    pool->scratch = calloc((size_t)nthreads, sizeof *pool->scratch);
    pool->threads = calloc((size_t)nthreads, sizeof *pool->threads);
    pool->args = calloc((size_t)nthreads, sizeof *pool->args);
    if (!pool->scratch || !pool->threads || !pool->args) goto fail;
    init_sync(pool);
    for (int t = 1; t < nthreads; t++) {
        pool->args[t].pool = pool;
        pool->args[t].tid = t;
        if (pthread_create(&pool->threads[t], NULL, worker_main, &pool->args[t]) != 0) {
            pool->nthreads = t; /* join the ones that started */
            lf_pool_destroy(pool);
            return NULL;
        }
    }
    return pool;
fail:
    free(pool->scratch);
    free(pool->threads);
    free(pool->args);
    free(pool);
    return NULL;
}

/* free the scratch of threads [t0, pool->nthreads) */
static void free_scratch(lf_pool *pool, int t0) {
    for (int t = t0; t < pool->nthreads; t++)
        for (int s = 0; s < LF_SCRATCH_SLOTS; s++) {
            free(pool->scratch[t][s].p);
            pool->scratch[t][s] = (lf_scratch){NULL, 0};
        }
}

void lf_pool_destroy(lf_pool *pool) {
    if (!pool) return;
    if (!forked(pool)) { /* in a fork()'s child the workers and the locks' states are the parent's: left alone */
        pthread_mutex_lock(&pool->mu);
        pool->stop = 1;
        pthread_cond_broadcast(&pool->cv_work);
        pthread_mutex_unlock(&pool->mu);
        for (int t = 1; t < pool->nthreads; t++) pthread_join(pool->threads[t], NULL);
        pthread_mutex_destroy(&pool->run_lock);
        pthread_mutex_destroy(&pool->mu);
        pthread_cond_destroy(&pool->cv_work);
        pthread_cond_destroy(&pool->cv_done);
    }
    free_scratch(pool, 0);
    free(pool->scratch);
    free(pool->threads);
    free(pool->args);
    free(pool);
}

int lf_pool_threads(const lf_pool *pool) { return pool ? pool->nthreads : 1; }

int lf_pool_after_fork(lf_pool *pool) {
    if (!pool || !forked(pool)) return 0;
    init_sync(pool); /* fresh locks over the parent's (their holders may not exist here; nothing to destroy) */
    pool->stop = 0;
    pool->gomp_parallel = NULL;
    pool->no_openmp = 1;
    int t = 1; /* workers of this process; if one cannot start, the pool runs on those that did */
    while (t < pool->nthreads && pthread_create(&pool->threads[t], NULL, worker_main, &pool->args[t]) == 0) t++;
    free_scratch(pool, t);
    pool->nthreads = t;
    return 1;
}

int lf_pool_uses_openmp(lf_pool *pool) {
    pthread_mutex_lock(&pool->run_lock);
    pool->gomp_misses = 0; /* look now */
    find_gomp(pool);
    const int found = pool->gomp_parallel != NULL;
    pthread_mutex_unlock(&pool->run_lock);
    return found;
}

void lf_pool_run(lf_pool *pool, int nt, lf_task_fn fn, void *ctx) {
    pthread_mutex_lock(&pool->run_lock);
    if (nt <= 1 || pool->nthreads == 1) {
        fn(ctx, 0, 1);
        pthread_mutex_unlock(&pool->run_lock);
        return;
    }
    if (nt > pool->nthreads) nt = pool->nthreads;
    find_gomp(pool);
    if (pool->gomp_parallel) {
        gomp_job job = {pool, fn, ctx, nt, lf_cancel_bound()};
        pool->gomp_parallel(gomp_body, &job, (unsigned)nt, 0);
        pthread_mutex_unlock(&pool->run_lock);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    pool->nt = nt;
    pool->cancel = lf_cancel_bound();
    atomic_store(&pool->remaining, pool->nthreads - 1);
    pthread_mutex_lock(&pool->mu);
    atomic_fetch_add_explicit(&pool->generation, 1u, memory_order_release);
    pthread_cond_broadcast(&pool->cv_work);
    pthread_mutex_unlock(&pool->mu);
    fn(ctx, 0, nt);
    int spins = 0;
    while (atomic_load_explicit(&pool->remaining, memory_order_acquire) > 0 &&
           spins < LF_SPIN_ITERS) {
        cpu_relax();
        spins++;
    }
    if (atomic_load(&pool->remaining) > 0) {
        pthread_mutex_lock(&pool->mu);
        while (atomic_load(&pool->remaining) > 0) pthread_cond_wait(&pool->cv_done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
    }
    pthread_mutex_unlock(&pool->run_lock);
}

float *lf_pool_scratch(lf_pool *pool, int tid, int slot, size_t bytes) {
    if (!pool || tid < 0 || tid >= pool->nthreads || slot < 0 || slot >= LF_SCRATCH_SLOTS)
        return NULL;
    lf_scratch *s = &pool->scratch[tid][slot];
    if (s->bytes < bytes) {
        free(s->p);
        const size_t rounded = (bytes + 63) & ~(size_t)63;
        s->p = aligned_alloc(64, rounded);
        s->bytes = s->p ? rounded : 0;
    }
    return s->p;
}
