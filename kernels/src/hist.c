/* Calibration histograms: binning, percentile lookup, KL-divergence (entropy) threshold. */
#include "fw_internal.h"

#define FW_MAX_BINS (1 << 22)

typedef struct {
    const fw_ops *ops;
    const float *x;
    float lo, scale, maxbin;
    int64_t bins;
    int64_t stride; /* between counter copies (0: one copy) */
    int64_t *out;   /* nt * bins */
    int failed;
} fw_hist_ctx;

static void fw_hist_task(void *vctx, int64_t b, int64_t e, int tid) {
    fw_hist_ctx *c = (fw_hist_ctx *)vctx;
    int64_t stride = c->stride;
    int64_t ncopy = stride ? FW_HIST_COPIES : 1;
    uint32_t *local = (uint32_t *)calloc((size_t)(ncopy * c->bins), sizeof(uint32_t));
    if (!local) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    int64_t *out = c->out + (size_t)tid * c->bins;
    const int64_t chunk = (int64_t)1 << 30; /* keeps the uint32 counters from overflowing */
    for (int64_t s = b; s < e; s += chunk) {
        int64_t t = s + chunk < e ? s + chunk : e;
        /* one sequential stream: this loop is bound by the scattered increments, not by the
         * reads, and measured slower walked as interleaved streams (fw_interleaved) */
        c->ops->hist_accum(c->x + s, t - s, c->lo, c->scale, c->maxbin, local, stride);
        for (int64_t i = 0; i < ncopy * c->bins; i++) {
            out[i % c->bins] += local[i];
            local[i] = 0;
        }
    }
    free(local);
}

/* Counter copies (see fw_ops.hist_accum) only pay when increments pile onto a few bins: then
 * back-to-back increments of one counter wait for each other. Spread data run faster on one copy
 * (a quarter of the cache footprint), so a strided sample of 1024 values decides: FW_HIST_COPIES
 * copies when its fullest bin holds more than 1/64 of it (and the copies stay small). The counts
 * are the same either way. */
static int64_t fw_hist_stride(const float *x, int64_t n, const fw_hist_ctx *c) {
    if (c->bins > (1 << 16)) return 0;
    enum { S = 1024 };
    if (n < 16 * S) return c->bins;
    uint16_t *h = (uint16_t *)calloc((size_t)c->bins, sizeof(uint16_t));
    if (!h) return c->bins;
    int64_t top = 0;
    for (int64_t i = 0; i < S; i++) {
        float t = (x[(n / S) * i] - c->lo) * c->scale;
        if (t != t) continue;
        t = t > 0.0f ? t : 0.0f;
        t = t < c->maxbin ? t : c->maxbin;
        int64_t b = (int64_t)t;
        if (++h[b] > top) top = h[b];
    }
    free(h);
    return top > S / 64 ? c->bins : 0;
}

int fw_histogram(const float *x, int64_t n, int64_t bins, float lo, float hi, int64_t *counts) {
    FW_REQUIRE(bins >= 1 && bins <= FW_MAX_BINS, "bins must be in [1, %d]", FW_MAX_BINS);
    FW_REQUIRE(isfinite(lo) && isfinite(hi) && lo < hi, "need finite lo < hi");
    float width = hi - lo;
    FW_REQUIRE(isfinite(width), "hi - lo overflows float32");
    FW_REQUIRE(n >= 0, "negative size");
    FW_REQUIRE(counts && (n == 0 || x), "null pointer");
    if (n == 0) return FW_OK;
    int nt = fw_threads_for(n, 1 << 17);
    int64_t *acc = (int64_t *)calloc((size_t)nt * (size_t)bins, sizeof(int64_t));
    if (!acc) return fw_error(FW_ENOMEM, "out of memory");
    fw_hist_ctx c = {fw_ops_get(), x, lo, (float)bins / width, (float)(bins - 1), bins, 0, acc, 0};
    c.stride = fw_hist_stride(x, n, &c);
    if (bins <= (1 << 16)) /* small per-piece counters: pieces shared out as the threads free up */
        fw_parallel_run_dynamic(nt, n, fw_hist_task, &c);
    else
        fw_parallel_run(nt, n, fw_hist_task, &c);
    if (c.failed) {
        free(acc);
        return fw_error(FW_ENOMEM, "out of memory");
    }
    for (int t = 0; t < nt; t++)
        for (int64_t i = 0; i < bins; i++) counts[i] += acc[(size_t)t * bins + i];
    free(acc);
    return FW_OK;
}

static int fw_check_counts(const int64_t *counts, int64_t bins, double lo, double hi,
                           int64_t *total) {
    FW_REQUIRE(bins >= 1 && bins <= FW_MAX_BINS, "bins must be in [1, %d]", FW_MAX_BINS);
    FW_REQUIRE(counts, "null pointer");
    FW_REQUIRE(isfinite(lo) && isfinite(hi) && lo < hi, "need finite lo < hi");
    int64_t t = 0;
    for (int64_t i = 0; i < bins; i++) {
        FW_REQUIRE(counts[i] >= 0, "negative count at bin %lld", (long long)i);
        FW_REQUIRE(t <= INT64_MAX - counts[i], "counts overflow");
        t += counts[i];
    }
    *total = t;
    return FW_OK;
}

int fw_percentile(const int64_t *counts, int64_t bins, double lo, double hi, double p,
                  double *out) {
    int64_t total;
    int rc = fw_check_counts(counts, bins, lo, hi, &total);
    if (rc) return rc;
    FW_REQUIRE(out, "null pointer");
    FW_REQUIRE(p >= 0.0 && p <= 100.0, "p must be in [0, 100]");
    FW_REQUIRE(total > 0, "empty histogram");
    double target = p / 100.0 * (double)total, width = (hi - lo) / (double)bins;
    double cum = 0.0;
    for (int64_t b = 0; b < bins; b++) {
        if (counts[b] == 0) continue;
        double next = cum + (double)counts[b];
        if (next >= target) {
            double frac = (target - cum) / (double)counts[b];
            if (frac < 0.0) frac = 0.0;
            if (frac > 1.0) frac = 1.0;
            *out = lo + ((double)b + frac) * width;
            return FW_OK;
        }
        cum = next;
    }
    /* rounding: the last non-empty bin's upper edge */
    for (int64_t b = bins - 1; b >= 0; b--)
        if (counts[b]) {
            *out = lo + (double)(b + 1) * width;
            break;
        }
    return FW_OK;
}

/* MXNet / TensorRT smoothing: zero bins get eps, the mass is taken from the non-zero bins.
 * Returns 0 when the distribution cannot be smoothed (no non-zero bin, or a bin turns <= 0). */
static int fw_smooth(double *d, int64_t n) {
    const double eps = 0.0001;
    int64_t nz = 0;
    for (int64_t i = 0; i < n; i++) nz += d[i] == 0.0;
    int64_t nnz = n - nz;
    if (nnz == 0) return 0;
    double eps1 = eps * (double)nz / (double)nnz;
    for (int64_t i = 0; i < n; i++) {
        d[i] += d[i] == 0.0 ? eps : -eps1;
        if (!(d[i] > 0.0)) return 0;
    }
    return 1;
}

int fw_entropy_threshold(const int64_t *counts, int64_t bins, double lo, double hi,
                         int num_quant_bins, double *out) {
    int64_t total;
    int rc = fw_check_counts(counts, bins, lo, hi, &total);
    if (rc) return rc;
    FW_REQUIRE(out, "null pointer");
    FW_REQUIRE(num_quant_bins >= 2, "num_quant_bins must be >= 2");
    int fold = 0;
    if (lo == 0.0) {
        fold = 0;
    } else if (lo == -hi && bins % 2 == 0) {
        fold = 1;
    } else {
        return fw_error(FW_EINVAL,
                        "entropy_threshold needs a histogram of |x| over [0, hi] or of x over "
                        "[-hi, hi] with an even bin count");
    }
    FW_REQUIRE(total > 0, "empty histogram");
    int64_t nb = fold ? bins / 2 : bins;
    double *h = (double *)malloc((size_t)nb * sizeof(double));
    double *p = (double *)malloc((size_t)nb * sizeof(double));
    double *q = (double *)malloc((size_t)nb * sizeof(double));
    double *qb = (double *)malloc((size_t)num_quant_bins * sizeof(double));
    if (!h || !p || !q || !qb) {
        free(h);
        free(p);
        free(q);
        free(qb);
        return fw_error(FW_ENOMEM, "out of memory");
    }
    for (int64_t i = 0; i < nb; i++)
        h[i] = fold ? (double)counts[nb + i] + (double)counts[nb - 1 - i] : (double)counts[i];
    double width = hi / (double)nb;
    int64_t nq = num_quant_bins;
    if (nb <= nq) {
        *out = hi;
        free(h);
        free(p);
        free(q);
        free(qb);
        return FW_OK;
    }
    /* suffix sums of the outliers */
    double best = INFINITY;
    int64_t best_i = nb;
    double tail = 0.0;
    for (int64_t i = nb; i > nq; i--) tail += h[i - 1]; /* tail = sum h[nq..nb) */
    /* walk i upward; tail(i) = sum h[i..nb) */
    for (int64_t i = nq; i <= nb; i++) {
        if (i > nq) tail -= h[i - 1];
        for (int64_t b = 0; b < i; b++) p[b] = h[b];
        p[i - 1] += tail;
        int64_t merged = i / nq;
        for (int64_t j = 0; j < nq; j++) {
            int64_t s = j * merged, e = j == nq - 1 ? i : s + merged;
            double sum = 0.0;
            for (int64_t b = s; b < e; b++) sum += h[b];
            int64_t nzc = 0;
            for (int64_t b = s; b < e; b++) nzc += p[b] != 0.0;
            double val = nzc ? sum / (double)nzc : 0.0;
            for (int64_t b = s; b < e; b++) q[b] = p[b] != 0.0 ? val : 0.0;
        }
        double kl;
        if (!fw_smooth(p, i) || !fw_smooth(q, i)) {
            kl = INFINITY;
        } else {
            double sp = 0.0, sq = 0.0;
            for (int64_t b = 0; b < i; b++) {
                sp += p[b];
                sq += q[b];
            }
            kl = 0.0;
            for (int64_t b = 0; b < i; b++) {
                double pn = p[b] / sp, qn = q[b] / sq;
                kl += pn * log(pn / qn);
            }
        }
        if (kl < best) {
            best = kl;
            best_i = i;
        }
    }
    *out = (double)best_i * width;
    free(h);
    free(p);
    free(q);
    free(qb);
    return FW_OK;
}
