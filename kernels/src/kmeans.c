/* 1-D k-means (weight sharing). The finite values are sorted once (radix sort on the float bits)
 * and their prefix sums taken in double, so a Lloyd iteration costs O(k log n): in 1-D the
 * clusters of sorted centroids are the intervals between consecutive midpoints. Results do not
 * depend on the thread count. */
#include "fw_internal.h"

static uint64_t fw_splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double fw_uniform(uint64_t *s) { return (double)(fw_splitmix(s) >> 11) * 0x1.0p-53; }

static inline uint32_t fw_sort_key(float f) {
    uint32_t u = fw_f2u(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static inline float fw_from_key(uint32_t k) {
    return fw_u2f((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

/* LSD radix sort of keys, 3 passes of 11 bits; tmp has n entries */
void fw_radix_sort_u32(uint32_t *keys, uint32_t *tmp, int64_t n) {
    static const int shifts[3] = {0, 11, 22};
    uint32_t *src = keys, *dst = tmp;
    for (int p = 0; p < 3; p++) {
        int64_t cnt[2048];
        memset(cnt, 0, sizeof cnt);
        int sh = shifts[p];
        for (int64_t i = 0; i < n; i++) cnt[(src[i] >> sh) & 2047]++;
        int64_t sum = 0;
        for (int b = 0; b < 2048; b++) {
            int64_t c = cnt[b];
            cnt[b] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < n; i++) dst[cnt[(src[i] >> sh) & 2047]++] = src[i];
        uint32_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != keys) memcpy(keys, src, (size_t)n * sizeof(uint32_t));
}

static int fw_cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* first index in sorted v[0..n) with v > t */
static int64_t fw_upper_bound(const float *v, int64_t n, double t) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + ((hi - lo) >> 1);
        if ((double)v[mid] <= t)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

typedef struct {
    const float *x;
    const double *mids; /* padded with +Inf to a power of two, pm entries */
    int pm;
    uint8_t *labels;
} fw_label_ctx;

static void fw_label_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_label_ctx *c = (fw_label_ctx *)vctx;
    const double *mids = c->mids;
    const int pm = c->pm;
    for (int64_t i = b; i < e; i++) {
        float v = c->x[i];
        double dv = (double)v;
        int idx = 0; /* branch-free count of the midpoints below v */
        for (int step = pm >> 1; step > 0; step >>= 1) idx += mids[idx + step - 1] < dv ? step : 0;
        idx += pm > 0 && mids[idx] < dv ? 1 : 0;
        c->labels[i] = v != v ? 0 : (uint8_t)idx;
    }
}

typedef struct {
    const float *v;
    int64_t b[256], e[256];
    double mean[256];
} fw_mean_ctx;

static void fw_mean_task(void *vctx, int64_t jb, int64_t je, int tid) {
    (void)tid;
    fw_mean_ctx *c = (fw_mean_ctx *)vctx;
    for (int64_t j = jb; j < je; j++) {
        double l[4] = {0, 0, 0, 0};
        const float *v = c->v + c->b[j];
        int64_t n = c->e[j] - c->b[j], i = 0;
        for (; i + 4 <= n; i += 4) {
            l[0] += (double)v[i];
            l[1] += (double)v[i + 1];
            l[2] += (double)v[i + 2];
            l[3] += (double)v[i + 3];
        }
        for (; i < n; i++) l[i & 3] += (double)v[i];
        c->mean[j] = n ? ((l[0] + l[1]) + (l[2] + l[3])) / (double)n : 0.0;
    }
}

static void fw_mids(const float *c, int k, double *mids) {
    for (int j = 0; j + 1 < k; j++) mids[j] = 0.5 * ((double)c[j] + (double)c[j + 1]);
}

int fw_kmeans1d(const float *x, int64_t n, int k, int init, int iters, uint64_t seed,
                float *centroids, uint8_t *labels) {
    FW_REQUIRE(k >= 1 && k <= 256, "k must be in [1, 256], got %d", k);
    FW_REQUIRE(init == FW_INIT_KMEANSPP || init == FW_INIT_QUANTILE, "unknown init %d", init);
    FW_REQUIRE(iters >= 0, "iters must be >= 0");
    FW_REQUIRE(n >= 0 && n <= (INT64_MAX >> 4), "invalid size");
    FW_REQUIRE(centroids && (n == 0 || (x && labels)), "null pointer");

    int64_t nf = 0;
    for (int64_t i = 0; i < n; i++) nf += isfinite(x[i]) != 0;
    if (nf == 0) {
        for (int j = 0; j < k; j++) centroids[j] = 0.0f;
        for (int64_t i = 0; i < n; i++) labels[i] = (x[i] == INFINITY) ? (uint8_t)(k - 1) : 0;
        return FW_OK;
    }
    uint32_t *keys = (uint32_t *)malloc((size_t)nf * sizeof(uint32_t));
    uint32_t *tmp = (uint32_t *)malloc((size_t)nf * sizeof(uint32_t));
    if (!keys || !tmp) {
        free(keys);
        free(tmp);
        return fw_error(FW_ENOMEM, "out of memory");
    }
    int64_t j0 = 0;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(x[i])) keys[j0++] = fw_sort_key(x[i] == 0.0f ? 0.0f : x[i]); /* -0 -> +0 */
    fw_radix_sort_u32(keys, tmp, nf);
    float *v = (float *)tmp; /* sorted values, reusing tmp */
    for (int64_t i = 0; i < nf; i++) v[i] = fw_from_key(keys[i]);
    free(keys);

    float c[256];
    double mids[256];
    uint64_t rng = seed;
    if (init == FW_INIT_QUANTILE) {
        for (int j = 0; j < k; j++) {
            int64_t idx = (int64_t)(((double)j + 0.5) * (double)nf / (double)k);
            if (idx >= nf) idx = nf - 1;
            c[j] = v[idx];
        }
    } else {
        /* k-means++ on a sample of at most 32768 values (all of them when fewer) */
        int64_t ns = nf < 32768 ? nf : 32768;
        float *smp = (float *)calloc((size_t)ns, sizeof(float));
        double *d2 = (double *)malloc((size_t)ns * sizeof(double));
        if (!smp || !d2) {
            free(smp);
            free(d2);
            free(tmp);
            return fw_error(FW_ENOMEM, "out of memory");
        }
        for (int64_t i = 0; i < ns; i++)
            smp[i] = ns == nf ? v[i] : v[(int64_t)(fw_splitmix(&rng) % (uint64_t)nf)];
        c[0] = smp[fw_splitmix(&rng) % (uint64_t)ns];
        for (int64_t i = 0; i < ns; i++) {
            double d = (double)smp[i] - (double)c[0];
            d2[i] = d * d;
        }
        for (int j = 1; j < k; j++) {
            double tot = 0.0;
            for (int64_t i = 0; i < ns; i++) tot += d2[i];
            int64_t pick;
            if (!(tot > 0.0)) {
                pick = (int64_t)(fw_splitmix(&rng) % (uint64_t)ns); /* fewer distinct values than k */
            } else {
                double r = fw_uniform(&rng) * tot, acc = 0.0;
                pick = ns - 1;
                for (int64_t i = 0; i < ns; i++) {
                    acc += d2[i];
                    if (acc > r) {
                        pick = i;
                        break;
                    }
                }
            }
            c[j] = smp[pick];
            for (int64_t i = 0; i < ns; i++) {
                double d = (double)smp[i] - (double)c[j];
                if (d * d < d2[i]) d2[i] = d * d;
            }
        }
        free(smp);
        free(d2);
    }
    qsort(c, (size_t)k, sizeof(float), fw_cmp_float);

    for (int it = 0; it < iters; it++) {
        fw_mids(c, k, mids);
        float nc[256];
        fw_mean_ctx mc;
        mc.v = v;
        int64_t start = 0;
        for (int j = 0; j < k; j++) {
            int64_t end = j + 1 < k ? fw_upper_bound(v, nf, mids[j]) : nf;
            if (end < start) end = start;
            mc.b[j] = start;
            mc.e[j] = end;
            start = end;
        }
        fw_parallel_for(k, nf >= (1 << 18) ? 1 : k, fw_mean_task, &mc);
        for (int j = 0; j < k; j++)
            nc[j] = mc.e[j] > mc.b[j] ? (float)mc.mean[j] : c[j]; /* empty: keeps its centroid */
        qsort(nc, (size_t)k, sizeof(float), fw_cmp_float);
        int same = memcmp(nc, c, (size_t)k * sizeof(float)) == 0;
        memcpy(c, nc, (size_t)k * sizeof(float));
        if (same) break;
    }
    free(tmp);
    for (int j = 0; j < k; j++) centroids[j] = c[j] == 0.0f ? 0.0f : c[j];
    fw_mids(c, k, mids);
    int pm = 1;
    while (pm < k - 1) pm <<= 1;
    if (k == 1) pm = 0;
    for (int j = k - 1; j < pm; j++) mids[j] = INFINITY;
    fw_label_ctx lc = {x, mids, pm, labels};
    fw_parallel_for(n, 1 << 16, fw_label_task, &lc);
    return FW_OK;
}
