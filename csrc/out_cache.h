/* out_cache.h — float32 output arrays whose memory is kept and reused across calls.
 *
 * A training step allocates the same few large outputs every time (y, dx: n·m and n·k floats)
 * and frees them before the next step. Given back to glibc, two such blocks at the top of the
 * heap make it shrink (brk down) and grow again on the next call, which then faults in every
 * page while the kernel writes it (512 faults per 2 MiB, from every thread; at 512×1024×1024
 * forward 6.0 -> 7.0 ms, backward 6.7 -> 7.7 — benchmarks/RESULTS.md, fifth session). Arrays
 * from this cache keep their block when they die and hand it to the next output of a similar
 * size instead.
 */
#ifndef LORAFUSE_OUT_CACHE_H
#define LORAFUSE_OUT_CACHE_H

/* Include after <numpy/arrayobject.h> (each file sets up NumPy's C API its own way). */
#include <stddef.h>

typedef struct lf_out_cache lf_out_cache;

/* Outputs smaller than this come from NumPy's allocator as before (malloc's bins serve them
 * without touching the heap's top). */
#define LF_OUT_CACHE_MIN_BYTES ((size_t)256 * 1024)

/* The limit a new module starts with (lorafuse.set_output_cache_limit changes it). */
#define LF_OUT_CACHE_DEFAULT_BYTES ((size_t)64 << 20)

/* A cache keeping at most max_bytes of free blocks (0: keeps none); NULL on failure. */
lf_out_cache *lf_out_cache_new(size_t max_bytes);

/* Drops the owner's reference: the free blocks are released now, the cache itself once no
 * array from it is alive. */
void lf_out_cache_release(lf_out_cache *c);

/* New reference: an uninitialised C-contiguous float32 array of shape dims[0:nd], 64-byte
 * aligned when it comes from the cache; NULL with MemoryError (or NumPy's error). */
PyArrayObject *lf_out_cache_array(lf_out_cache *c, int nd, const npy_intp *dims);

/* Sets the most bytes of free blocks kept (freeing the oldest beyond it); returns the old limit. */
size_t lf_out_cache_set_limit(lf_out_cache *c, size_t max_bytes);

typedef struct {
    size_t limit, held_bytes, lent_bytes;
    long held_blocks, lent_blocks;
    long long hits, misses; /* requests served from a kept block / by a new allocation */
} lf_out_cache_stats;

lf_out_cache_stats lf_out_cache_get_stats(lf_out_cache *c);

#endif
