/* GPTQ / SparseGPT column sweeps (Frantar & Alistarh): columns are processed left to right in
 * blocks; each column's quantization (or pruning) error, divided by the diagonal of the upper
 * Cholesky factor U of H^-1, is propagated to the later columns through U's row. Updates inside
 * a block are applied column by column; the rest of the matrix gets one lazy rank-`block` update
 * per block. Every update of W[r][j] is a fused multiply-add, applied in column order, so the
 * result does not depend on the block size, the thread count or the ISA. Rows are independent
 * (GPTQ) and are spread over the threads in tiles. */
#include "fw_internal.h"

#define FW_TILE_ROWS 256

static int fw_check_sweep(const float *w, int64_t rows, int64_t cols, const float *u,
                          int64_t block) {
    int64_t t;
    FW_REQUIRE(rows >= 0 && cols >= 0 && fw_mul_ok(rows, cols, &t) && fw_mul_ok(cols, cols, &t),
               "invalid shape");
    FW_REQUIRE(block >= 1, "block must be >= 1");
    FW_REQUIRE(rows * cols == 0 || (w && u), "null pointer");
    for (int64_t i = 0; i < cols; i++) {
        float d = u[i * cols + i];
        if (!(d > 0.0f) || !isfinite(d))
            return fw_error(FW_EINVAL, "hinv_chol diagonal at %lld is not positive and finite",
                            (long long)i);
        for (int64_t j = i + 1; j < cols; j++)
            if (!isfinite(u[i * cols + j]))
                return fw_error(FW_EINVAL, "hinv_chol has a non-finite value at (%lld, %lld)",
                                (long long)i, (long long)j);
    }
    for (int64_t i = 0; i < rows * cols; i++)
        if (!isfinite(w[i]))
            return fw_error(FW_EINVAL, "w has a non-finite value at flat index %lld", (long long)i);
    return FW_OK;
}

/* After column i of the block [c0, c1) has its error in E[:, i - c0]: propagate it inside its
 * sub-block of `sb` columns at once (rank-1), and the whole sub-block's errors to the rest of
 * the block when the sub-block is complete (rank-sb). Per element the updates still arrive in
 * column order, so the two-level blocking changes no bit. */
static void fw_sweep_update(const fw_ops *ops, float *W, int64_t cols, const float *E, int64_t ldE,
                            const float *u, int64_t i, int64_t c0, int64_t c1, int64_t sb,
                            int64_t rr) {
    int64_t s0 = c0 + ((i - c0) / sb) * sb;
    int64_t s1 = s0 + sb < c1 ? s0 + sb : c1;
    if (i + 1 < s1)
        ops->rank_update(W + i + 1, cols, E + (i - c0), ldE, u + i * cols + i + 1, cols, rr, 1,
                         s1 - i - 1);
    if (i + 1 == s1 && s1 < c1)
        ops->rank_update(W + s1, cols, E + (s0 - c0), ldE, u + s0 * cols + s1, cols, rr, s1 - s0,
                         c1 - s1);
}

#define FW_SUB_BLOCK 16

/* ---------------------------------------------------------------- GPTQ */

typedef struct {
    const fw_ops *ops;
    float *w;
    int64_t rows, cols;
    const float *u;
    const float *s;
    const int32_t *z;
    int64_t group, ngroups;
    float qmin, qmax;
    int64_t block;
    uint8_t *q;
    float *what;
    int failed;
} fw_gptq_ctx;

static void fw_gptq_task(void *vctx, int64_t rb, int64_t re, int tid) {
    (void)tid;
    fw_gptq_ctx *c = (fw_gptq_ctx *)vctx;
    const int64_t cols = c->cols, B = c->block;
    float *E = (float *)malloc((size_t)FW_TILE_ROWS * (size_t)B * sizeof(float));
    /* one column of the tile, gathered: values, its rows' scales / zero points, codes, w_hat */
    float *col = (float *)malloc((size_t)FW_TILE_ROWS * (3 * sizeof(float) + sizeof(int32_t) + 1));
    if (!E || !col) {
        free(E);
        free(col);
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *cs = col + FW_TILE_ROWS, *dq = cs + FW_TILE_ROWS;
    int32_t *cz = (int32_t *)(dq + FW_TILE_ROWS);
    uint8_t *code = (uint8_t *)(cz + FW_TILE_ROWS);
    int q_signed = c->qmin < 0.0f;
    for (int64_t r0 = rb; r0 < re; r0 += FW_TILE_ROWS) {
        int64_t rr = re - r0 < FW_TILE_ROWS ? re - r0 : FW_TILE_ROWS;
        float *W = c->w + r0 * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += B) {
            int64_t c1 = c0 + B < cols ? c0 + B : cols, kb = c1 - c0;
            for (int64_t i = c0; i < c1; i++) {
                float d = c->u[i * cols + i];
                /* the column through the ISA's quantize / dequantize runs: q = clamp(round(w /
                 * s) + z), w_hat = (q - z) * s, exactly as quantize() and dequantize() */
                const float *sp = c->s + r0;
                const int32_t *zp = c->z + r0;
                if (c->group) {
                    for (int64_t r = 0; r < rr; r++) {
                        int64_t pi = (r0 + r) * c->ngroups + i / c->group;
                        cs[r] = c->s[pi];
                        cz[r] = c->z[pi];
                    }
                    sp = cs;
                    zp = cz;
                }
                for (int64_t r = 0; r < rr; r++) col[r] = W[r * cols + i];
                c->ops->quant_run(col, rr, sp, zp, 1, c->qmin, c->qmax, code);
                if (q_signed)
                    c->ops->dequant_run_s8((const int8_t *)code, rr, sp, zp, 1, dq);
                else
                    c->ops->dequant_run_u8(code, rr, sp, zp, 1, dq);
                for (int64_t r = 0; r < rr; r++) {
                    int64_t row = r0 + r;
                    c->q[row * cols + i] = code[r];
                    c->what[row * cols + i] = dq[r];
                    E[r * B + (i - c0)] = -((col[r] - dq[r]) / d); /* negated: rank_update adds */
                }
                fw_sweep_update(c->ops, W, cols, E, B, c->u, i, c0, c1, FW_SUB_BLOCK, rr);
            }
            if (c1 < cols)
                c->ops->rank_update(W + c1, cols, E, B, c->u + c0 * cols + c1, cols, rr, kb,
                                    cols - c1);
        }
    }
    free(E);
    free(col);
}

int fw_gptq_quantize(float *w, int64_t rows, int64_t cols, const float *u, const float *scale,
                     const int32_t *zero_point, int64_t group_size, int32_t qmin, int32_t qmax,
                     int64_t block, uint8_t *q, float *w_hat) {
    int rc = fw_check_sweep(w, rows, cols, u, block);
    if (rc) return rc;
    FW_REQUIRE(qmin < qmax && qmin >= -128 && qmax <= 255, "invalid quantized range");
    FW_REQUIRE(group_size >= 0, "group_size must be >= 0 (0: per channel)");
    if (rows * cols == 0) return FW_OK;
    FW_REQUIRE(scale && zero_point && q && w_hat, "null pointer");
    int64_t ng = group_size ? (cols - 1) / group_size + 1 : 1;
    for (int64_t i = 0; i < rows * ng; i++) {
        if (!(scale[i] > 0.0f) || !isfinite(scale[i]))
            return fw_error(FW_EINVAL, "scale at %lld is not positive and finite", (long long)i);
        if (zero_point[i] < qmin || zero_point[i] > qmax)
            return fw_error(FW_ERANGE, "zero_point at %lld outside [%d, %d]", (long long)i,
                            (int)qmin, (int)qmax);
    }
    fw_gptq_ctx c = {fw_ops_get(), w, rows, cols, u, scale, zero_point, group_size, ng,
                     (float)qmin, (float)qmax, block < cols ? block : cols, q, w_hat, 0};
    /* at least one tile per thread, and enough work to pay for a thread */
    int64_t grain = FW_TILE_ROWS / 4;
    if (cols < 256) grain = FW_TILE_ROWS;
    fw_parallel_for(rows, grain, fw_gptq_task, &c);
    if (c.failed) return fw_error(FW_ENOMEM, "out of memory");
    return FW_OK;
}

/* ---------------------------------------------------------------- SparseGPT */

typedef struct {
    const fw_ops *ops;
    float *w;
    int64_t rows, cols;
    const float *u;
    int n, m;
    int64_t B, c0, c1;
    float *score; /* rows * B */
    uint8_t *pruned; /* rows * B, 1 = pruned */
    float *what;
    uint8_t *mask;
    int failed;
} fw_sgpt_ctx;

static void fw_sgpt_score_task(void *vctx, int64_t rb, int64_t re, int tid) {
    (void)tid;
    fw_sgpt_ctx *c = (fw_sgpt_ctx *)vctx;
    int64_t kb = c->c1 - c->c0;
    for (int64_t r = rb; r < re; r++)
        for (int64_t j = 0; j < kb; j++) {
            float d = c->u[(c->c0 + j) * c->cols + c->c0 + j];
            float wv = c->w[r * c->cols + c->c0 + j];
            c->score[r * kb + j] = (wv * wv) / (d * d);
        }
}

static void fw_sgpt_sweep_task(void *vctx, int64_t rb, int64_t re, int tid) {
    (void)tid;
    fw_sgpt_ctx *c = (fw_sgpt_ctx *)vctx;
    const int64_t cols = c->cols, B = c->B, c0 = c->c0, c1 = c->c1, kb = c1 - c0;
    float *E = (float *)malloc((size_t)FW_TILE_ROWS * (size_t)B * sizeof(float));
    if (!E) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t r0 = rb; r0 < re; r0 += FW_TILE_ROWS) {
        int64_t rr = re - r0 < FW_TILE_ROWS ? re - r0 : FW_TILE_ROWS;
        float *W = c->w + r0 * cols;
        for (int64_t i = c0; i < c1; i++) {
            float d = c->u[i * cols + i];
            if (c->m && (i - c0) % c->m == 0) {
                /* N:M: per row, keep the n largest w^2/d^2 of columns i..i+m-1 (ties: lower
                 * column kept) */
                float sc[256];
                for (int64_t r = 0; r < rr; r++) {
                    for (int t = 0; t < c->m; t++) {
                        float dt = c->u[(i + t) * cols + i + t];
                        float wv = W[r * cols + i + t];
                        sc[t] = (wv * wv) / (dt * dt);
                    }
                    for (int t = 0; t < c->m; t++) {
                        int better = 0;
                        for (int v = 0; v < c->m; v++)
                            better += sc[v] > sc[t] || (sc[v] == sc[t] && v < t);
                        c->pruned[(r0 + r) * kb + (i - c0) + t] = better >= c->n;
                    }
                }
            }
            for (int64_t r = 0; r < rr; r++) {
                int64_t row = r0 + r;
                float wv = W[r * cols + i];
                int pr = c->pruned[row * kb + (i - c0)];
                float qv = pr ? 0.0f : wv;
                c->what[row * cols + i] = qv;
                c->mask[row * cols + i] = (uint8_t)!pr;
                E[r * B + (i - c0)] = -((wv - qv) / d);
            }
            /* N:M groups must not straddle sub-blocks: their scores read columns i..i+m-1 */
            int64_t sb = c->m ? c->m * ((FW_SUB_BLOCK + c->m - 1) / c->m) : FW_SUB_BLOCK;
            fw_sweep_update(c->ops, W, cols, E, B, c->u, i, c0, c1, sb, rr);
        }
        if (c1 < cols)
            c->ops->rank_update(W + c1, cols, E, B, c->u + c0 * cols + c1, cols, rr, kb,
                                cols - c1);
    }
    free(E);
}

int fw_sparsegpt_prune(float *w, int64_t rows, int64_t cols, const float *u, double sparsity,
                       int n, int m, int64_t block, float *w_hat, uint8_t *mask) {
    int rc = fw_check_sweep(w, rows, cols, u, block);
    if (rc) return rc;
    FW_REQUIRE(sparsity >= 0.0 && sparsity <= 1.0, "sparsity must be in [0, 1]");
    FW_REQUIRE((n == 0 && m == 0) || (n >= 1 && m >= n && m <= 256),
               "need n = m = 0 or 1 <= n <= m <= 256");
    if (m) {
        FW_REQUIRE(cols % m == 0, "cols not divisible by m");
        FW_REQUIRE(block % m == 0, "block not a multiple of m");
    }
    if (rows * cols == 0) return FW_OK;
    FW_REQUIRE(w_hat && mask, "null pointer");
    int64_t B = block < cols ? block : cols;
    float *score = (float *)malloc((size_t)rows * (size_t)B * sizeof(float));
    uint8_t *pruned = (uint8_t *)calloc((size_t)rows * (size_t)B, 1);
    if (!score || !pruned) {
        free(score);
        free(pruned);
        return fw_error(FW_ENOMEM, "out of memory");
    }
    fw_sgpt_ctx c = {fw_ops_get(), w, rows, cols, u, n, m, B, 0, 0, score, pruned, w_hat, mask, 0};
    int64_t grain = cols < 256 ? FW_TILE_ROWS : FW_TILE_ROWS / 4;
    for (int64_t c0 = 0; c0 < cols && !c.failed; c0 += B) {
        int64_t c1 = c0 + B < cols ? c0 + B : cols, kb = c1 - c0;
        c.c0 = c0;
        c.c1 = c1;
        int64_t nel = rows * kb;
        memset(pruned, 0, (size_t)nel);
        if (!m) {
            int64_t k = (int64_t)floor(sparsity * (double)nel);
            if (k > nel) k = nel;
            if (k > 0) {
                fw_parallel_for(rows, grain, fw_sgpt_score_task, &c);
                const float *arr[1] = {score};
                int64_t len[1] = {nel};
                uint32_t tb;
                if ((rc = fw_kth_bits(arr, len, 1, k, &tb))) {
                    free(score);
                    free(pruned);
                    return rc;
                }
                float t = fw_u2f(tb);
                int64_t less = 0;
                for (int64_t i = 0; i < nel; i++) {
                    pruned[i] = score[i] < t;
                    less += pruned[i];
                }
                int64_t need = k - less; /* ties at t: prune the highest flat indices */
                for (int64_t i = nel - 1; i >= 0 && need > 0; i--)
                    if (score[i] == t) {
                        pruned[i] = 1;
                        need--;
                    }
            }
        }
        fw_parallel_for(rows, grain, fw_sgpt_sweep_task, &c);
    }
    free(score);
    free(pruned);
    if (c.failed) return fw_error(FW_ENOMEM, "out of memory");
    return FW_OK;
}
