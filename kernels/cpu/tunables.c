/* tunables.c — the one table of numbers that choose paths, blockings and thread counts, one
 * entry per ISA (lf_tunables in internal.h says what each field decides). The register tiles
 * (MR×NR) belong to the micro-kernel code; everything tunable about using them is here.
 *
 * Where the values come from: measured on the CPUs named in benchmarks/RESULTS.md ("Where the
 * thresholds come from"); benchmarks/bench_plans.py times the plan's paths on either side of the
 * plan thresholds (forcing each path) on the machine it runs on. A retune changes this file
 * only; tests/test_ops_plans.py asserts which path each of its shapes takes, so a retune that
 * moves them shows there.
 */
#include "internal.h"

/* Portable 4×16 tile: no in-place reading of A, so none of the A-reading rules apply. */
const lf_tunables lf_tunables_generic = {
    .isa = LF_ISA_GENERIC,
    .wide = {.kc = 256, .mc = 64, .nc = 1024},
    .direct_a_max_cols = 0,
    .a_same_set_stride = 0,
    .direct_max_half_slivers = 0,
    .few_tokens_max_n = 0,
    .few_tokens_min_w = 0.0,
    .parallel_min_flops = 1 << 18, /* waking a worker costs more than this much arithmetic */
};

/* 6×16 tile (16 ymm accumulators). */
const lf_tunables lf_tunables_avx2 = {
    .isa = LF_ISA_AVX2,
    .wide = {.kc = 256, .mc = 96, .nc = 2048},
    .direct_a_max_cols = 320,       /* beyond it packing A pays for itself again */
    .a_same_set_stride = 0,         /* no pair tile on AVX2 */
    /* up to 64 tokens the few-token forward reads W in place, each 16-token sliver re-reading a block of W's rows from
     * L2 (Zen 3, 2 threads, fp32 lora_forward, plans forced: 32 / 48 / 64 tokens × 4096² 0.71 / 0.84 / 0.86× the time
     * of packing W, × 1024² 0.64 / 0.73 / 0.79×; 96 / 128 tokens 0.86–0.93×, left to the GEMM. 24, from the Zen 4 with
     * avx2 forced — its L2 twice Zen 3's —, left 25–64 tokens 1.2–1.5× slower on the Zen 3.) */
    .direct_max_half_slivers = 8,
    .few_tokens_max_n = 64,
    .few_tokens_min_w = 1 << 20,    /* a W of 4 MB: from DRAM, packing it costs what the math does */
    .parallel_min_flops = 1 << 18,
};

/* 12×32 wide tile, 24×16 narrow tile (N ≤ 16: the rank-r GEMMs), 6×64 pair tile. The fields
 * shared with avx512_bf16, whose fp32 work runs these same kernels.
 * Wide blocking (Zen 4, 2026-12-07, builds side by side in one process, interleaved: benchmarks/bench_builds.py; 2
 * threads): either tile runs at 98-100 % of the FMA peak with its operands in L2 (a C harness over the bare tiles),
 * through lf_gemm at 2048³ 88-92 % before this blocking and 93-96 % after (W packed in advance: the layers' opt-in
 * cache). nb 128 (the 6 rows or the 12-row A micro-panel
 * in L1 over 128 columns; was each 32-/64-column sliver over all 120 rows) and kc 512 (was 384: four K blocks
 * at K = 2048 — four passes over C — not five and a short sixth): the fp32 LoRA layer's fwd+bwd at 2048³ 176.2
 * → 169.2 ms, DoRA's 184.5 → 175.9 (nb alone: 173.4, 178.3); 512 × 1024², 512 × 576 × 1536 and 1024 × 4096²
 * within ±3 % (the VM's spread) either way. */
#define AVX512_FP32_TUNABLES                                                                        \
    .wide = {.kc = 512, .mc = 120, .nc = 3072, .nb = 128},                                          \
    .narrow = {.kc = 384, .mc = 240, .nc = 16},                                                     \
    .direct_a_max_cols = 320,       /* at 512 columns a thread reading in place lost 10-25 % */     \
    .a_same_set_stride = 1024,      /* rows 4 KiB apart: twelve of them evict each other in L1 */   \
    .direct_max_half_slivers = 3,                                                                   \
    .few_tokens_max_n = 32,         /* one sliver of the wide tile: C's columns are the tokens */   \
    .few_tokens_min_w = 1 << 20,                                                                    \
    .parallel_min_flops = 1 << 18

const lf_tunables lf_tunables_avx512 = {.isa = LF_ISA_AVX512, AVX512_FP32_TUNABLES};

/* AVX-512 plus the 12×32 bf16 tile (ukernel_avx512_bf16.c) for two bf16 operands; kc counts k
 * (two per packed 32-bit pair). */
const lf_tunables lf_tunables_avx512_bf16 = {
    .isa = LF_ISA_AVX512_BF16,
    AVX512_FP32_TUNABLES,
    /* Zen 4 (L2 1 MiB): a B sliver 128 KiB + the A block 768 KiB. mc 192 (was 72) fetches each B sliver from L3
     * a third as often: hgemm 0.93–0.97× the time at K = 4096 and 14336 (2048 × 4096², 1024 × 4096², 256 × 4096 ×
     * 14336 and its transpose), the same at 2048³ and 512 × 1024² (the two builds loaded in one process,
     * interleaved, 2026-12-05); kc 1024 was as good at K = 4096 but 5 % slower at 2048³. */
    .pairs = {.kc = 2048, .mc = 192, .nc = 2048},
    /* ≤ 256 rows a thread (256 × 4096 × 14336: 256 rows × 7168 columns each): all of them one A block, each W sliver
     * packed right before its 22 tiles (gemm.c sliver_packing), instead of 8 MB panels of W packed, left to L3 and
     * read back for 192 rows then 64: hgemm 0.92× the time there, the same at 24–192 rows (Zen 4, builds
     * interleaved in one process, 2026-12-05; kc 1024 for these threads was 2 % slower and would make a row's
     * sums depend on its thread's rows; prefetching the next sliver's W was no faster). */
    .pairs_one_block_rows = 256,
    /* 16-256 tokens × a W of ≥ 2M elements (4 MiB): Cᵀ = W·xᵀ, W's rows read in place instead of transposed into
     * slivers (the transposes, stalled on W's loads from DRAM, were 7-9 % of the GEMM's time at 256 tokens).
     * hgemm / torch, Zen 4, 2026-12-05 (RESULTS.md): 256 × 4096 × 14336 and its transpose 1.03 / 1.00 (were
     * 0.93-0.98); 4096², 16 / 24 / 32 / 64 / 128 tokens 0.81 / 0.95 / 0.75 / 0.85 / 0.94× torch's time (were
     * 1.20-1.35 / 1.24 / 1.19-1.20 / 1.04-1.13 / 0.99-1.09×). 256 × 1024² (W 2 MiB, its transposes cheap from
     * L3) took 1.05× the time: excluded. */
    .w_in_place_min_n = 16,
    .w_in_place_max_n = 256,
    .w_in_place_min_w = 1 << 21,
    /* AMD EPYC (Zen 4, the avx512_bf16 CPU measured): vdpbf16ps zmm 231 GFLOP/s on one thread against the
     * FMA's 114 (fma_peak.c), one instruction a cycle each; 8×4096² bf16 decode 3.8 → see RESULTS.md */
    .decode_pairs = 1,
    /* 'split' (the transposed GEMM, W's rows in place: gemm.c w_rows_in_place) beats the decode kernel from 28
     * tokens: 4096², lora_forward bf16 x, plans forced, interleaved, 2026-12-05: 28 tokens 2.76 vs 3.12 ms, 32:
     * 2.67 vs 3.05, 32 × 14336 × 4096: 9.80 vs 11.97; decode ahead up to 24 (2.42 vs 2.71, 16: 1.97 vs 2.69) */
    .half_decode_max_n = 24,
};

/* avx512_bf16 with the 32×32 AMX tile (ukernel_amx_bf16.c) in place of the vdpbf16ps one, in its own
 * loop (amx_block: a C block stays in the tiles over a whole K block); kc counts k, a multiple of 32
 * (one tile step). kc 4096: C read and written once for K ≤ 4096 (its tile loads of 16 rows ldc apart
 * dominated at kc 256); nc 128: the B panel (nc·kc·2 bytes = 1 MiB) and an A sliver (256 KiB) in L2;
 * mc 1024: B is packed once per 1024 rows of A (2048 flops per packed element). */
const lf_tunables lf_tunables_amx_bf16 = {
    .isa = LF_ISA_AMX_BF16,
    AVX512_FP32_TUNABLES,
    .pairs = {.kc = 4096, .mc = 1024, .nc = 128},
    .half_decode_max_n = 5, /* 4096²: the AMX GEMM wins from 6 tokens (1.72 vs 2.18 ms, 8: 1.73 vs 2.21) */
};

static const lf_tunables *const tunables_by_isa[] = {
    [LF_ISA_GENERIC] = &lf_tunables_generic, [LF_ISA_AVX2] = &lf_tunables_avx2, [LF_ISA_AVX512] = &lf_tunables_avx512,
    [LF_ISA_AVX512_BF16] = &lf_tunables_avx512_bf16, [LF_ISA_AMX_BF16] = &lf_tunables_amx_bf16};

const lf_tunables *lf_tune(void) { return tunables_by_isa[lf_get_isa()]; }

int lf_threads_for(lf_pool *pool, double flops, int64_t units) {
    const int nt = flops < lf_tune()->parallel_min_flops ? 1 : lf_pool_threads(pool);
    if (units < 1) return 1;
    return units < nt ? (int)units : nt;
}
