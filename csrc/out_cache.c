/* out_cache.c — kept output blocks (see out_cache.h for why).
 *
 * A block is one 64-byte-aligned allocation: a header (the cache, the capacity), then the
 * data. An array made here views the data and holds a capsule as its base; when the array
 * dies the capsule hands the block back: kept in the free list (oldest first) while the
 * kept bytes stay within the limit, else freed. A request takes the smallest kept block of
 * capacity need .. need + need/4 (training repeats exact sizes; a far larger block would hold
 * memory the caller does not use), else allocates a new one.
 * Everything here runs under the GIL (array creation, capsule destructors, the setters), which
 * is the lock. The cache lives until its owner (the module) has released it and the last
 * block lent out has come back.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL lorafuse_ARRAY_API
#define NO_IMPORT_ARRAY
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "out_cache.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LF_OUT_CACHE_MAX_BLOCKS 16
#define HEADER 64     /* bytes before the data: keeps the data 64-byte aligned */
#define GRANULE 4096  /* capacities are whole pages, so that nearby sizes share blocks */

typedef struct {
    lf_out_cache *cache;
    size_t cap; /* bytes of data */
} block;

struct lf_out_cache {
    size_t limit;
    int owned; /* the owner has not released it */
    int nfree;
    block *free[LF_OUT_CACHE_MAX_BLOCKS]; /* kept blocks, oldest first */
    size_t held_bytes, lent_bytes;
    long lent_blocks;
    long long hits, misses;
};

static float *data_of(block *b) { return (float *)((char *)b + HEADER); }

lf_out_cache *lf_out_cache_new(size_t max_bytes) {
    lf_out_cache *c = calloc(1, sizeof *c);
    if (c) {
        c->limit = max_bytes;
        c->owned = 1;
    }
    return c;
}

/* drops kept blocks, oldest first, until `room` more bytes fit under the limit and a slot is free */
static void evict_for(lf_out_cache *c, size_t room) {
    int drop = 0;
    size_t held = c->held_bytes;
    while (drop < c->nfree && (held + room > c->limit || c->nfree - drop >= LF_OUT_CACHE_MAX_BLOCKS)) {
        held -= c->free[drop]->cap;
        free(c->free[drop]);
        drop++;
    }
    memmove(c->free, c->free + drop, (size_t)(c->nfree - drop) * sizeof c->free[0]);
    c->nfree -= drop;
    c->held_bytes = held;
}

static void destroy_if_unused(lf_out_cache *c) {
    if (!c->owned && c->lent_blocks == 0) free(c);
}

void lf_out_cache_release(lf_out_cache *c) {
    if (!c) return;
    c->owned = 0;
    c->limit = 0;
    evict_for(c, 0);
    destroy_if_unused(c);
}

size_t lf_out_cache_set_limit(lf_out_cache *c, size_t max_bytes) {
    const size_t old = c->limit;
    c->limit = max_bytes;
    evict_for(c, 0);
    return old;
}

lf_out_cache_stats lf_out_cache_get_stats(lf_out_cache *c) {
    return (lf_out_cache_stats){.limit = c->limit, .held_bytes = c->held_bytes, .lent_bytes = c->lent_bytes,
                                .held_blocks = c->nfree, .lent_blocks = c->lent_blocks, .hits = c->hits,
                                .misses = c->misses};
}

/* the smallest kept block with need ≤ cap ≤ need + need/4, taken out of the list; or NULL */
static block *take(lf_out_cache *c, size_t need) {
    int best = -1;
    for (int i = 0; i < c->nfree; i++) {
        const size_t cap = c->free[i]->cap;
        if (cap >= need && cap - need <= need / 4 && (best < 0 || cap < c->free[best]->cap)) best = i;
    }
    if (best < 0) return NULL;
    block *b = c->free[best];
    memmove(c->free + best, c->free + best + 1, (size_t)(c->nfree - best - 1) * sizeof c->free[0]);
    c->nfree--;
    c->held_bytes -= b->cap;
    return b;
}

static void give_back(block *b) {
    lf_out_cache *c = b->cache;
    c->lent_blocks--;
    c->lent_bytes -= b->cap;
    if (b->cap <= c->limit) {
        evict_for(c, b->cap);
        c->free[c->nfree++] = b;
        c->held_bytes += b->cap;
    } else {
        free(b);
    }
    destroy_if_unused(c);
}

static void capsule_free(PyObject *capsule) {
    block *b = PyCapsule_GetPointer(capsule, "lorafuse.out_block");
    if (b) give_back(b);
}

PyArrayObject *lf_out_cache_array(lf_out_cache *c, int nd, const npy_intp *dims) {
    size_t count = 1;
    for (int d = 0; d < nd; d++)
        if (dims[d] < 0 || __builtin_mul_overflow(count, (size_t)dims[d], &count))
            return (PyArrayObject *)PyErr_NoMemory();
    size_t need;
    if (__builtin_mul_overflow(count, sizeof(float), &need) || need > SIZE_MAX - HEADER - GRANULE)
        return (PyArrayObject *)PyErr_NoMemory();
    if (!c || need < LF_OUT_CACHE_MIN_BYTES || need > c->limit)
        return (PyArrayObject *)PyArray_SimpleNew(nd, (npy_intp *)dims, NPY_FLOAT32);
    block *b = take(c, need);
    if (b) {
        c->hits++;
    } else {
        const size_t cap = (need + GRANULE - 1) / GRANULE * GRANULE;
        b = aligned_alloc(64, HEADER + cap);
        if (!b) return (PyArrayObject *)PyErr_NoMemory();
        *b = (block){.cache = c, .cap = cap};
        c->misses++;
    }
    c->lent_blocks++;
    c->lent_bytes += b->cap;
    PyObject *capsule = PyCapsule_New(b, "lorafuse.out_block", capsule_free);
    if (!capsule) {
        give_back(b);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(NPY_FLOAT32), nd,
                                                             (npy_intp *)dims, NULL, data_of(b), NPY_ARRAY_CARRAY,
                                                             NULL);
    if (!a) {
        Py_DECREF(capsule); /* hands the block back */
        return NULL;
    }
    if (PyArray_SetBaseObject(a, capsule) < 0) { /* steals the capsule, even on failure */
        Py_DECREF(a);
        return NULL;
    }
    return a;
}
