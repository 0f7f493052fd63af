/* Internal declarations shared by the kernel sources (not part of the public API). */
#ifndef FW_INTERNAL_H
#define FW_INTERNAL_H

#include "fw_kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define FW_UNUSED __attribute__((unused))
#else
#define FW_UNUSED
#endif

/* ---- errors ---- */
int fw_error(int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void fw_clear_error(void);

#define FW_REQUIRE(cond, ...)                                                                     \
    do {                                                                                          \
        if (!(cond)) return fw_error(FW_EINVAL, __VA_ARGS__);                                     \
    } while (0)

/* ---- threads ----
 * fw_threads_for(n, grain): how many workers to use for n units when each should get at least
 * `grain` units (1 for small n). fw_parallel_run(nt, n, fn, ctx) splits [0, n) into nt contiguous
 * ranges (boundaries depend only on nt and n) and runs fn(ctx, begin, end, tid) for each, tid 0
 * on the calling thread. If a thread cannot be created its range runs on the caller. */
typedef void (*fw_range_fn)(void *ctx, int64_t begin, int64_t end, int tid);
int fw_threads_for(int64_t n, int64_t grain);
void fw_parallel_run(int nt, int64_t n, fw_range_fn fn, void *ctx);
/* convenience: fw_parallel_run(fw_threads_for(n, grain), ...); returns the thread count used */
int fw_parallel_for(int64_t n, int64_t grain, fw_range_fn fn, void *ctx);
/* The same split into FW_DYN_PIECES pieces per thread that the threads take in turn from a shared
 * counter: a thread the OS deschedules (other processes on a shared machine) holds up at most
 * one piece, the others take the rest. fn may run several times per tid, on any pieces, so only
 * for kernels whose result does not depend on which thread computes which range (elementwise
 * maps, integer counts merged per tid). Piece boundaries are multiples of 64 units. */
#define FW_DYN_PIECES 8
void fw_parallel_run_dynamic(int nt, int64_t n, fw_range_fn fn, void *ctx);
int fw_parallel_for_dynamic(int64_t n, int64_t grain, fw_range_fn fn, void *ctx);

/* Interleaved streams: one core reads memory measurably faster from several sequential streams
 * at once than from one (more lines in flight: the hardware prefetchers track each stream), so a
 * streaming task walks its range [b, e) as FW_IL_STREAMS equal sub-ranges visited round-robin,
 * `chunk` elements at a time: fn(ctx, begin, end) for each piece. Only for kernels whose result
 * does not depend on the order the pieces are visited in (elementwise maps, integer counts).
 * Ranges shorter than FW_IL_MIN elements are one piece. */
#define FW_IL_STREAMS 4
#define FW_IL_MIN ((int64_t)1 << 16)
typedef void (*fw_piece_fn)(void *ctx, int64_t begin, int64_t end);
void fw_interleaved(int64_t b, int64_t e, int64_t chunk, fw_piece_fn fn, void *ctx);

/* ---- layouts ---- */
typedef struct {
    int64_t outer, alen, inner, block, nblk;
    int mode;
} fw_layout;

int fw_layout_init(fw_layout *L, int64_t outer, int64_t alen, int64_t inner, int mode,
                   int64_t block);
int64_t fw_layout_nparams(const fw_layout *L);
int fw_mul_ok(int64_t a, int64_t b, int64_t *out);

/* The element range [e, end) of a tensor is walked in runs that share a parameter stride:
 * returns the run length, *pidx the parameter index of the run's first element, *pstride 0 (one
 * parameter for the whole run) or 1 (one parameter per element). */
static inline int64_t fw_layout_run(const fw_layout *L, int64_t e, int64_t end, int64_t *pidx,
                                    int64_t *pstride) {
    int64_t left = end - e;
    if (L->mode == FW_MODE_TENSOR) {
        *pidx = 0;
        *pstride = 0;
        return left;
    }
    int64_t plane = L->alen * L->inner;
    int64_t o = e / plane, r = e - o * plane;
    int64_t a = r / L->inner, i = r - a * L->inner;
    int64_t len;
    if (L->mode == FW_MODE_AXIS) {
        if (L->inner > 1) {
            len = L->inner - i;
            *pidx = a;
            *pstride = 0;
        } else {
            len = L->alen - a;
            *pidx = a;
            *pstride = 1;
        }
    } else {
        int64_t b = a / L->block;
        if (L->inner > 1) {
            len = L->inner - i;
            *pidx = (o * L->nblk + b) * L->inner + i;
            *pstride = 1;
        } else {
            int64_t bend = (b + 1) * L->block;
            if (bend > L->alen) bend = L->alen;
            len = bend - a;
            *pidx = o * L->nblk + b;
            *pstride = 0;
        }
    }
    return len < left ? len : left;
}

/* The same walk without a division per run (short runs: blocks along the last axis). */
typedef struct {
    const fw_layout *L;
    int64_t e, end, o, a, i, b, r; /* b = a / block, r = a % block */
} fw_run_iter;

static inline void fw_run_iter_init(fw_run_iter *it, const fw_layout *L, int64_t e, int64_t end) {
    it->L = L;
    it->e = e;
    it->end = end;
    if (L->mode == FW_MODE_TENSOR || L->alen * L->inner == 0) {
        it->o = it->a = it->i = it->b = it->r = 0;
        return;
    }
    int64_t plane = L->alen * L->inner;
    it->o = e / plane;
    int64_t rem = e - it->o * plane;
    it->a = rem / L->inner;
    it->i = rem - it->a * L->inner;
    it->b = it->a / L->block;
    it->r = it->a - it->b * L->block;
}

/* 0 when done; else the run length, with *pidx / *pstride as fw_layout_run */
static inline int64_t fw_run_next(fw_run_iter *it, int64_t *pidx, int64_t *pstride) {
    const fw_layout *L = it->L;
    int64_t left = it->end - it->e, len;
    if (left <= 0) return 0;
    if (L->mode == FW_MODE_TENSOR) {
        *pidx = 0;
        *pstride = 0;
        it->e = it->end;
        return left;
    }
    if (L->inner > 1) {
        len = L->inner - it->i;
        if (len > left) len = left;
        if (L->mode == FW_MODE_AXIS) {
            *pidx = it->a;
            *pstride = 0;
        } else {
            *pidx = (it->o * L->nblk + it->b) * L->inner + it->i;
            *pstride = 1;
        }
        it->i += len;
        if (it->i == L->inner) {
            it->i = 0;
            it->a++;
            if (++it->r == L->block) {
                it->r = 0;
                it->b++;
            }
        }
    } else if (L->mode == FW_MODE_AXIS) {
        len = L->alen - it->a;
        if (len > left) len = left;
        *pidx = it->a;
        *pstride = 1;
        it->a += len;
    } else {
        len = L->block - it->r;
        if (len > L->alen - it->a) len = L->alen - it->a;
        if (len > left) len = left;
        *pidx = it->o * L->nblk + it->b;
        *pstride = 0;
        it->a += len;
        it->r += len;
        if (it->r == L->block) {
            it->r = 0;
            it->b++;
        }
    }
    if (it->a == L->alen) {
        it->a = it->b = it->r = 0;
        it->o++;
    }
    it->e += len;
    return len;
}

/* ---- per-ISA primitives (the only code that differs between ref / avx2 / avx512 / neon) ----
 * Every variant must produce bit-identical results to the reference. */
typedef struct fw_ops {
    const char *name;
    /* q = clamp(nearbyint(x/s) + z); s/z advance by sstride (0 or 1) per element */
    void (*quant_run)(const float *x, int64_t n, const float *s, const int32_t *z, int64_t sstride,
                      float qmin, float qmax, uint8_t *out);
    void (*dequant_run_s8)(const int8_t *q, int64_t n, const float *s, const int32_t *z,
                           int64_t sstride, float *out);
    void (*dequant_run_u8)(const uint8_t *q, int64_t n, const float *s, const int32_t *z,
                           int64_t sstride, float *out);
    void (*absgt_mask)(const float *w, int64_t n, float thr, uint8_t *mask);
    void (*apply_mask)(const float *w, const uint8_t *mask, int64_t n, float *out);
    /* counts[c * stride + b] += 1 for each non-NaN element, b = floor(clamp((x-lo)*scale, 0,
     * maxbin)), c a copy index in [0, FW_HIST_COPIES) of the variant's choosing (stride 0: one
     * shared copy). Interleaved copies break the store-to-load chains on hot bins; the histogram
     * is their sum. */
    void (*hist_accum)(const float *x, int64_t n, float lo, float scale, float maxbin,
                       uint32_t *counts, int64_t stride);
    /* canonical 8-lane double sum of |x| (p=1) or x*x (p=2), see ref.c */
    double (*run_sum)(const float *x, int64_t n, int p);
    /* acc[j] += |x[j]| or x[j]^2 (double) */
    void (*col_accum)(const float *x, int64_t n, int p, double *acc);
    /* W[r][j] = fma(E[r][k], U[k][j], W[r][j]) for k = 0..kb-1 in order; r < rows, j < ncols
     * (E holds the negated scaled errors) */
    void (*rank_update)(float *W, int64_t ldw, const float *E, int64_t lde, const float *U,
                        int64_t ldu, int64_t rows, int64_t kb, int64_t ncols);
    /* selection bracket pass over |x| bits a: *below += #(a < lo); appends (in order) the a with
     * lo <= a <= lo + span to buf while *nb < cap (sets *overflow otherwise) */
    void (*bracket)(const float *x, int64_t n, uint32_t lo, uint32_t span, int64_t *below,
                    uint32_t *buf, int64_t *nb, int64_t cap, int *overflow);
    /* absgt_mask with non-temporal stores, for masks of FW_STREAM_MIN_BYTES or more (select.c
     * says when); NULL where the variant has none */
    void (*absgt_mask_nt)(const float *w, int64_t n, float thr, uint8_t *mask);
    /* 1: the magnitude mask walks each task's range as one stream; 0: the interleaved walk */
    int mask_one_stream;
} fw_ops;

extern const fw_ops fw_ops_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const fw_ops fw_ops_avx2;
extern const fw_ops fw_ops_avx512;
#if !defined(FW_NO_SIMD)
/* AVX2 primitives (avx2.c) the avx512 table reuses where lane width does not pay (avx512.c) */
void fw_avx2_apply_mask(const float *w, const uint8_t *mask, int64_t n, float *out);
void fw_avx2_hist_accum(const float *x, int64_t n, float lo, float scale, float maxbin,
                        uint32_t *counts, int64_t stride);
double fw_avx2_run_sum(const float *x, int64_t n, int p);
void fw_avx2_col_accum(const float *x, int64_t n, int p, double *acc);
#endif
#endif
#if defined(__aarch64__)
extern const fw_ops fw_ops_neon;
#endif

const fw_ops *fw_ops_get(void);

/* copies of the counters hist_accum may spread one histogram over (4 x 2048 uint32 bins = 32 KB,
 * one L1D) */
#define FW_HIST_COPIES 4

/* Non-temporal (cache-bypassing) copy for large kernel outputs that are not read back soon:
 * avoids the read-for-ownership of every destination line. fw_stream_fence() after the last. */
void fw_stream_store(void *dst, const void *src, size_t n);
void fw_stream_fence(void);
int fw_stream_wanted(int64_t out_bytes);
#define FW_STREAM_MIN_BYTES ((int64_t)16 << 20) /* outputs at least this large are streamed */
#define FW_STREAM_CHUNK 4096                    /* elements staged in a stack buffer */

/* shared helpers */
void fw_radix_sort_u32(uint32_t *keys, uint32_t *tmp, int64_t n);
int fw_kth_bits(const float *const *arrays, const int64_t *lengths, int64_t narrays, int64_t k,
                uint32_t *bits_out);

/* one ONNX QuantizeLinear code (the definition every variant follows) */
static inline uint8_t fw_quant1(float x, float s, int32_t z, float qmin, float qmax) {
    float zp = (float)z;
    float v = x / s;
    float r;
    if (v != v) {
        r = zp;
    } else {
        r = nearbyintf(v) + zp;
        r = r < qmin ? qmin : r;
        r = r > qmax ? qmax : r;
    }
    return (uint8_t)(int32_t)r;
}

static inline uint32_t fw_f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
/* The selection bracket pass, one value at a time, over x[i..n): the reference's whole pass and
 * the SIMD passes' tails. |x| bits below lo add to *cnt; those within [lo, lo + span] are appended
 * to buf while *m < cap (*overflow is set otherwise). */
static inline void fw_bracket_scalar(const float *x, int64_t i, int64_t n, uint32_t lo, uint32_t span,
                                     int64_t *cnt, uint32_t *buf, int64_t *m, int64_t cap, int *overflow) {
    for (; i < n; i++) {
        uint32_t a = fw_f2u(x[i]) & 0x7FFFFFFFu;
        *cnt += a < lo;
        if (a - lo <= span) {
            if (*m < cap)
                buf[(*m)++] = a;
            else
                *overflow = 1;
        }
    }
}

static inline float fw_u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
