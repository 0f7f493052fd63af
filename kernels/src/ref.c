/* Scalar reference primitives. These define the results: every SIMD variant must match them
 * bit for bit. Compiled without FMA contraction (-ffp-contract=off); fused multiply-adds are
 * written explicitly as fmaf() where the algorithm specifies one. */
#include "fw_internal.h"

static void ref_quant_run(const float *x, int64_t n, const float *s, const int32_t *z,
                          int64_t sstride, float qmin, float qmax, uint8_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = fw_quant1(x[i], s[i * sstride], z[i * sstride], qmin, qmax);
}

static void ref_dequant_run_s8(const int8_t *q, int64_t n, const float *s, const int32_t *z,
                               int64_t sstride, float *out) {
    for (int64_t i = 0; i < n; i++)
        out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

static void ref_dequant_run_u8(const uint8_t *q, int64_t n, const float *s, const int32_t *z,
                               int64_t sstride, float *out) {
    for (int64_t i = 0; i < n; i++)
        out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

static void ref_absgt_mask(const float *w, int64_t n, float thr, uint8_t *mask) {
    for (int64_t i = 0; i < n; i++) mask[i] = fabsf(w[i]) > thr;
}

static void ref_apply_mask(const float *w, const uint8_t *mask, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = mask[i] ? w[i] : 0.0f;
}

static void ref_hist_accum(const float *x, int64_t n, float lo, float scale, float maxbin,
                           uint32_t *counts, int64_t stride) {
    for (int64_t i = 0; i < n; i++) {
        float t = (x[i] - lo) * scale;
        if (t != t) continue;
        t = t > 0.0f ? t : 0.0f;
        t = t < maxbin ? t : maxbin;
        counts[(i & 3) * stride + (int32_t)floorf(t)]++;
    }
}

/* The canonical reduction: element j of the run goes to lane j % 8 (accumulated in order, in
 * double), and the lanes combine as ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
static double ref_run_sum(const float *x, int64_t n, int p) {
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (p == 1) {
        for (int64_t j = 0; j < n; j++) l[j & 7] += fabs((double)x[j]);
    } else {
        for (int64_t j = 0; j < n; j++) {
            double v = (double)x[j];
            l[j & 7] += v * v;
        }
    }
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static void ref_col_accum(const float *x, int64_t n, int p, double *acc) {
    if (p == 1) {
        for (int64_t j = 0; j < n; j++) acc[j] += fabs((double)x[j]);
    } else {
        for (int64_t j = 0; j < n; j++) {
            double v = (double)x[j];
            acc[j] += v * v;
        }
    }
}

static void ref_rank_update(float *W, int64_t ldw, const float *E, int64_t lde, const float *U,
                            int64_t ldu, int64_t rows, int64_t kb, int64_t ncols) {
    for (int64_t r = 0; r < rows; r++) {
        float *w = W + r * ldw;
        for (int64_t k = 0; k < kb; k++) {
            float e = E[r * lde + k];
            const float *u = U + k * ldu;
            for (int64_t j = 0; j < ncols; j++) w[j] = fmaf(e, u[j], w[j]);
        }
    }
}

static void ref_bracket(const float *x, int64_t n, uint32_t lo, uint32_t span, int64_t *below,
                        uint32_t *buf, int64_t *nb, int64_t cap, int *overflow) {
    int64_t cnt = 0, m = *nb;
    fw_bracket_scalar(x, 0, n, lo, span, &cnt, buf, &m, cap, overflow);
    *below += cnt;
    *nb = m;
}

const fw_ops fw_ops_ref = {
    "ref",
    ref_quant_run,
    ref_dequant_run_s8,
    ref_dequant_run_u8,
    ref_absgt_mask,
    ref_apply_mask,
    ref_hist_accum,
    ref_run_sum,
    ref_col_accum,
    ref_rank_update,
    ref_bracket,
    NULL, /* absgt_mask_nt */
    0,    /* mask_one_stream */
};
