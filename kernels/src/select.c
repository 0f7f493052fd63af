/* Selection, masks, norms and sign quantization. */
#include "fw_internal.h"

#define FW_STREAM_GRAIN (1 << 16)

/* ---------------------------------------------------------------- k-th smallest |w| */
/* Radix select on the bits of |w|: for non-negative floats the IEEE bit patterns order like the
 * values, with NaN patterns above +Inf. Two passes over the data: a histogram of the top 16 bits,
 * then one of the low 16 bits among the values sharing the chosen top half. */

typedef struct {
    const float *const *arrays;
    const int64_t *lengths;
    const int64_t *offsets; /* prefix sums, narrays + 1 */
    int64_t narrays;
    int pass;
    uint32_t prefix;
    uint64_t *hist; /* nt * 65536 */
} fw_kth_ctx;

static void fw_kth_task(void *vctx, int64_t b, int64_t e, int tid) {
    fw_kth_ctx *c = (fw_kth_ctx *)vctx;
    uint64_t *h = c->hist + (size_t)tid * 65536;
    /* first array overlapping [b, e) */
    int64_t lo = 0, hi = c->narrays - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (c->offsets[mid] <= b)
            lo = mid;
        else
            hi = mid - 1;
    }
    for (int64_t a = lo; a < c->narrays && c->offsets[a] < e; a++) {
        int64_t s = b > c->offsets[a] ? b - c->offsets[a] : 0;
        int64_t t = e - c->offsets[a];
        if (t > c->lengths[a]) t = c->lengths[a];
        const float *x = c->arrays[a];
        if (c->pass == 0) {
            for (int64_t i = s; i < t; i++) h[(fw_f2u(x[i]) & 0x7FFFFFFFu) >> 16]++;
        } else {
            uint32_t p = c->prefix;
            for (int64_t i = s; i < t; i++) {
                uint32_t u = fw_f2u(x[i]) & 0x7FFFFFFFu;
                if ((u >> 16) == p) h[u & 0xFFFFu]++;
            }
        }
    }
}

static int fw_kth_radix(const float *const *arrays, const int64_t *lengths, int64_t narrays,
                        int64_t k, uint32_t *bits_out) {
    FW_REQUIRE(narrays >= 0 && (narrays == 0 || (arrays && lengths)), "invalid arrays");
    int64_t *off = (int64_t *)malloc((size_t)(narrays + 1) * sizeof(int64_t));
    if (!off) return fw_error(FW_ENOMEM, "out of memory");
    off[0] = 0;
    for (int64_t a = 0; a < narrays; a++) {
        if (lengths[a] < 0 || (lengths[a] > 0 && !arrays[a]) || off[a] > INT64_MAX - lengths[a]) {
            free(off);
            return fw_error(FW_EINVAL, "invalid array %lld", (long long)a);
        }
        off[a + 1] = off[a] + lengths[a];
    }
    int64_t n = off[narrays];
    if (k < 1 || k > n) {
        free(off);
        return fw_error(FW_EINVAL, "k=%lld out of range [1, %lld]", (long long)k, (long long)n);
    }
    int nt = fw_threads_for(n, 1 << 18);
    uint64_t *hist = (uint64_t *)calloc((size_t)nt * 65536, sizeof(uint64_t));
    if (!hist) {
        free(off);
        return fw_error(FW_ENOMEM, "out of memory");
    }
    fw_kth_ctx c = {arrays, lengths, off, narrays, 0, 0, hist};
    uint32_t result = 0;
    int64_t rem = k;
    for (int pass = 0; pass < 2; pass++) {
        c.pass = pass;
        if (pass) memset(hist, 0, (size_t)nt * 65536 * sizeof(uint64_t));
        fw_parallel_run(nt, n, fw_kth_task, &c);
        for (int t = 1; t < nt; t++)
            for (int b = 0; b < 65536; b++) hist[b] += hist[(size_t)t * 65536 + b];
        int b = 0;
        for (; b < 65536; b++) {
            if ((int64_t)hist[b] >= rem) break;
            rem -= (int64_t)hist[b];
        }
        if (b == 65536) b = 65535; /* unreachable when the counts are consistent */
        if (pass == 0) {
            c.prefix = (uint32_t)b;
            result = (uint32_t)b << 16;
        } else {
            result |= (uint32_t)b;
        }
    }
    free(hist);
    free(off);
    *bits_out = result;
    return FW_OK;
}

/* Sample-bracket selection: the k-th value's rank in a strided sample of the data brackets it
 * between two sample values [lo, hi] (with a 4-sigma margin); one streaming pass counts the values
 * below lo and collects those inside the bracket, and the answer is selected among the few
 * collected. Any miss (bracket too narrow, buffer overflow) falls back to the radix select, so
 * the result is always exact and, for given data, independent of the thread count. */

#define FW_KTH_SAMPLE 65536

typedef struct {
    const fw_ops *ops;
    const float *const *arrays;
    const int64_t *lengths;
    const int64_t *offsets;
    int64_t narrays;
    uint32_t lo, span;
    int64_t below[256];
    uint32_t *buf[256];
    int64_t nbuf[256], cap[256];
    int overflow;
} fw_bracket_ctx;

static void fw_bracket_task(void *vctx, int64_t b, int64_t e, int tid) {
    fw_bracket_ctx *c = (fw_bracket_ctx *)vctx;
    int64_t lo = 0, hi = c->narrays - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (c->offsets[mid] <= b)
            lo = mid;
        else
            hi = mid - 1;
    }
    int ovf = 0;
    for (int64_t a = lo; a < c->narrays && c->offsets[a] < e; a++) {
        int64_t s = b > c->offsets[a] ? b - c->offsets[a] : 0;
        int64_t t = e - c->offsets[a];
        if (t > c->lengths[a]) t = c->lengths[a];
        if (t > s)
            c->ops->bracket(c->arrays[a] + s, t - s, c->lo, c->span, &c->below[tid], c->buf[tid],
                            &c->nbuf[tid], c->cap[tid], &ovf);
    }
    if (ovf) __atomic_store_n(&c->overflow, 1, __ATOMIC_RELAXED);
}

/* 1: found; 0: fall back */
static int fw_kth_bracket(const float *const *arrays, const int64_t *lengths, const int64_t *off,
                          int64_t narrays, int64_t n, int64_t k, uint32_t *bits_out) {
    const int64_t S = FW_KTH_SAMPLE;
    uint32_t *smp = (uint32_t *)malloc((size_t)S * 2 * sizeof(uint32_t));
    if (!smp) return 0;
    int64_t a = 0;
    for (int64_t t = 0; t < S; t++) {
        int64_t p = (int64_t)(((__int128)(2 * t + 1) * n) / (2 * S));
        while (off[a + 1] <= p) a++;
        smp[t] = fw_f2u(arrays[a][p - off[a]]) & 0x7FFFFFFFu;
    }
    fw_radix_sort_u32(smp, smp + S, S);
    double pk = (double)k / (double)n;
    double margin = 4.0 * sqrt((double)S * pk * (1.0 - pk)) + 32.0;
    int64_t r = (int64_t)(pk * (double)S);
    int64_t li = r - (int64_t)margin, hi_i = r + (int64_t)margin;
    uint32_t lo = li <= 0 ? 0u : smp[li];
    uint32_t hi = hi_i >= S - 1 ? 0x7FFFFFFFu : smp[hi_i];
    free(smp);
    int64_t frac_n = (int64_t)(((hi_i < S ? hi_i : S) - (li > 0 ? li : 0) + 1) * (double)n / (double)S);
    if (frac_n > n / 4) return 0; /* a wide bracket (heavy ties): radix select is cheaper */
    int nt = fw_threads_for(n, 1 << 18);
    fw_bracket_ctx *c = (fw_bracket_ctx *)calloc(1, sizeof *c);
    if (!c) return 0;
    c->ops = fw_ops_get();
    c->arrays = arrays;
    c->lengths = lengths;
    c->offsets = off;
    c->narrays = narrays;
    c->lo = lo;
    c->span = hi - lo;
    int64_t cap = 2 * frac_n / nt + 4096;
    uint32_t *block = (uint32_t *)malloc((size_t)nt * (size_t)cap * sizeof(uint32_t));
    int ok = block != NULL;
    for (int t = 0; t < nt && ok; t++) {
        c->cap[t] = cap;
        c->buf[t] = block + (size_t)t * (size_t)cap;
    }
    if (ok) fw_parallel_run(nt, n, fw_bracket_task, c);
    int found = 0;
    if (ok && !c->overflow) {
        int64_t below = 0, ncand = 0;
        for (int t = 0; t < nt; t++) {
            below += c->below[t];
            if (c->buf[t] != block + ncand) /* compact the per-thread regions */
                memmove(block + ncand, c->buf[t], (size_t)c->nbuf[t] * sizeof(uint32_t));
            ncand += c->nbuf[t];
        }
        if (below < k && k <= below + ncand) {
            const float *arr1[1] = {(const float *)block};
            int64_t len1[1] = {ncand};
            found = fw_kth_radix(arr1, len1, 1, k - below, bits_out) == FW_OK;
        }
    }
    free(block);
    free(c);
    return found;
}

int fw_kth_bits(const float *const *arrays, const int64_t *lengths, int64_t narrays, int64_t k,
                uint32_t *bits_out) {
    FW_REQUIRE(narrays >= 0 && (narrays == 0 || (arrays && lengths)), "invalid arrays");
    int64_t *off = (int64_t *)malloc((size_t)(narrays + 1) * sizeof(int64_t));
    if (!off) return fw_error(FW_ENOMEM, "out of memory");
    off[0] = 0;
    for (int64_t a = 0; a < narrays; a++) {
        if (lengths[a] < 0 || (lengths[a] > 0 && !arrays[a]) || off[a] > INT64_MAX - lengths[a]) {
            free(off);
            return fw_error(FW_EINVAL, "invalid array %lld", (long long)a);
        }
        off[a + 1] = off[a] + lengths[a];
    }
    int64_t n = off[narrays];
    if (k < 1 || k > n) {
        free(off);
        return fw_error(FW_EINVAL, "k=%lld out of range [1, %lld]", (long long)k, (long long)n);
    }
    int done = n >= (1 << 20) && fw_kth_bracket(arrays, lengths, off, narrays, n, k, bits_out);
    free(off);
    if (done) return FW_OK;
    return fw_kth_radix(arrays, lengths, narrays, k, bits_out);
}

int fw_kth_smallest_abs(const float *const *arrays, const int64_t *lengths, int64_t narrays,
                        int64_t k, float *out) {
    FW_REQUIRE(out, "null pointer");
    uint32_t bits;
    int rc = fw_kth_bits(arrays, lengths, narrays, k, &bits);
    if (rc) return rc;
    *out = fw_u2f(bits);
    return FW_OK;
}

/* ---------------------------------------------------------------- masks */

typedef struct {
    const fw_ops *ops;
    const float *w;
    const uint8_t *mask_in;
    float thr;
    uint8_t *mask;
    float *out;
    int stream;
    int nt; /* the AVX-512 mask's own non-temporal stores (fw_mask_nt) */
} fw_mask_ctx;

/* elements per piece of the interleaved walk (fw_interleaved): 256 bytes of floats per stream
 * (measured on the AVX2 machine: 64 to 128 beat 256 and more for both mask kernels) */
#define FW_MASK_PIECE 64

/* The AVX-512 magnitude mask walks each task's range as one sequential stream instead. On the
 * AVX-512 machine (2-core Zen 5 EPYC, 16M floats, 16 MB mask into a pre-faulted buffer) the
 * interleaved walk measured 2.5-3.1 ms on one thread and 2.9-3.2 ms on two (8 read + 8 write
 * streams of 256 / 64 bytes: slower than one thread); one stream 1.9-2.0 ms and 1.35-1.6 ms
 * (the hardware prefetcher follows one stream per core well; the interleave also costs two
 * indirect calls per 64 elements: 0.92 -> 0.30 ms for 4M floats read from L3). Piece sizes
 * 256 / 1024 / 4096 measured 2.1-2.2 ms on one thread and 1.6-2.3 ms on two. The AVX2 variant
 * keeps the walk it was tuned with. The ops table's mask_one_stream says which walk a variant
 * takes. */

/* The AVX-512 magnitude mask writes masks of FW_STREAM_MIN_BYTES or more with non-temporal
 * stores by default (its absgt_mask_nt: aligned loads, no staging copy), unless
 * FW_KERNELS_STREAM=0 says otherwise (=1 / =all take the staged path of every kernel). In the
 * benchmark (16M floats, one thread, alternating with numpy and memcpy, so the cache holds other
 * dirty lines) plain stores measured 2.08-2.37 ms into the pre-faulted mask and 2.19-2.29 ms into
 * a new (recycled) array (3.8-3.9x numpy), non-temporal ones 1.81-2.03 / 1.96-2.09 ms
 * (4.2-4.5x). The cost: into a freshly mmapped mask (page faults included: a first call, or masks
 * over 32 MB, which glibc maps anew each time) they measured 5-10% slower, 8.4-8.7 against
 * 7.5-8.1 ms on one thread and 4.9 against 4.65 ms on two (the faulting kernel leaves the zeroed
 * lines in cache, where plain stores hit). */
static int fw_mask_nt(const fw_ops *ops, int64_t out_bytes) {
    const char *env = getenv("FW_KERNELS_STREAM");
    return ops->absgt_mask_nt && out_bytes >= FW_STREAM_MIN_BYTES && !(env && env[0] == '0');
}

static void fw_absgt_piece(void *vctx, int64_t b, int64_t e) {
    fw_mask_ctx *c = (fw_mask_ctx *)vctx;
    c->ops->absgt_mask(c->w + b, e - b, c->thr, c->mask + b);
}

static void fw_absgt_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_mask_ctx *c = (fw_mask_ctx *)vctx;
    if (!c->stream) {
        if (c->nt)
            c->ops->absgt_mask_nt(c->w + b, e - b, c->thr, c->mask + b);
        else if (c->ops->mask_one_stream)
            c->ops->absgt_mask(c->w + b, e - b, c->thr, c->mask + b);
        else
            fw_interleaved(b, e, FW_MASK_PIECE, fw_absgt_piece, c);
        return;
    }
    uint8_t stage[FW_STREAM_CHUNK];
    for (; b < e; b += FW_STREAM_CHUNK) {
        int64_t len = e - b < FW_STREAM_CHUNK ? e - b : FW_STREAM_CHUNK;
        c->ops->absgt_mask(c->w + b, len, c->thr, stage);
        fw_stream_store(c->mask + b, stage, (size_t)len);
    }
    fw_stream_fence();
}

int fw_magnitude_mask(const float *w, int64_t n, float threshold, uint8_t *mask) {
    FW_REQUIRE(n >= 0, "negative size");
    FW_REQUIRE(n == 0 || (w && mask), "null pointer");
    fw_mask_ctx c = {fw_ops_get(), w, NULL, threshold, mask, NULL, fw_stream_wanted(n), 0};
    c.nt = !c.stream && fw_mask_nt(c.ops, n);
    fw_parallel_for_dynamic(n, FW_STREAM_GRAIN, fw_absgt_task, &c);
    return FW_OK;
}

static void fw_apply_piece(void *vctx, int64_t b, int64_t e) {
    fw_mask_ctx *c = (fw_mask_ctx *)vctx;
    c->ops->apply_mask(c->w + b, c->mask_in + b, e - b, c->out + b);
}

static void fw_apply_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_mask_ctx *c = (fw_mask_ctx *)vctx;
    if (!c->stream) {
        fw_interleaved(b, e, FW_MASK_PIECE, fw_apply_piece, c);
        return;
    }
    float stage[FW_STREAM_CHUNK];
    for (; b < e; b += FW_STREAM_CHUNK) {
        int64_t len = e - b < FW_STREAM_CHUNK ? e - b : FW_STREAM_CHUNK;
        c->ops->apply_mask(c->w + b, c->mask_in + b, len, stage);
        fw_stream_store(c->out + b, stage, (size_t)len * sizeof(float));
    }
    fw_stream_fence();
}

int fw_apply_mask(const float *w, const uint8_t *mask, int64_t n, float *out) {
    FW_REQUIRE(n >= 0, "negative size");
    FW_REQUIRE(n == 0 || (w && mask && out), "null pointer");
    fw_mask_ctx c = {fw_ops_get(), w, mask, 0.0f, NULL, out,
                     fw_stream_wanted(n * (int64_t)sizeof(float)), 0};
    fw_parallel_for_dynamic(n, FW_STREAM_GRAIN, fw_apply_task, &c);
    return FW_OK;
}

/* ---------------------------------------------------------------- N:M */

typedef struct {
    const float *w;
    int64_t alen, inner, ngroups;
    int n, m;
    uint8_t *mask;
} fw_nm_ctx;

static void fw_nm_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_nm_ctx *c = (fw_nm_ctx *)vctx;
    float key[256];
    int m = c->m;
    for (int64_t og = b; og < e; og++) { /* og = o * ngroups + g */
        int64_t o = og / c->ngroups, g = og - o * c->ngroups;
        for (int64_t i = 0; i < c->inner; i++) {
            int64_t base = (o * c->alen + g * m) * c->inner + i;
            for (int j = 0; j < m; j++) {
                float v = c->w[base + j * c->inner];
                key[j] = v != v ? -1.0f : fabsf(v);
            }
            for (int j = 0; j < m; j++) {
                int better = 0;
                for (int t = 0; t < m; t++)
                    better += key[t] > key[j] || (key[t] == key[j] && t < j);
                c->mask[base + j * c->inner] = better < c->n;
            }
        }
    }
}

int fw_nm_mask(const float *w, int64_t outer, int64_t alen, int64_t inner, int n, int m,
               uint8_t *mask) {
    fw_layout L;
    int rc;
    if ((rc = fw_layout_init(&L, outer, alen, inner, FW_MODE_AXIS, 1))) return rc;
    FW_REQUIRE(m >= 1 && m <= 256 && n >= 1 && n <= m, "need 1 <= n <= m <= 256, got n=%d m=%d",
               n, m);
    FW_REQUIRE(alen % m == 0, "axis length %lld not divisible by m=%d", (long long)alen, m);
    int64_t total = outer * alen * inner;
    FW_REQUIRE(total == 0 || (w && mask), "null pointer");
    if (total == 0) return FW_OK;
    fw_nm_ctx c = {w, alen, inner, alen / m, n, m, mask};
    int64_t units = outer * c.ngroups;
    int64_t per = inner * m * m;
    fw_parallel_for(units, (1 << 18) / (per > 0 ? per : 1) + 1, fw_nm_task, &c);
    return FW_OK;
}

/* ---------------------------------------------------------------- per-channel norms */
/* result[a] = sum over o (in order) of the canonical run sum of x[o, a, :]; for inner == 1 the
 * run sum of one element is the element itself, so the column case accumulates directly. */

typedef struct {
    const fw_ops *ops;
    const float *w;
    int64_t outer, alen, inner;
    int p;
    double *acc;
} fw_norm_ctx;

static void fw_norm_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_norm_ctx *c = (fw_norm_ctx *)vctx;
    for (int64_t a = b; a < e; a++) c->acc[a] = 0.0;
    if (c->inner == 1) {
        for (int64_t o = 0; o < c->outer; o++)
            c->ops->col_accum(c->w + o * c->alen + b, e - b, c->p, c->acc + b);
    } else {
        for (int64_t a = b; a < e; a++) {
            double s = 0.0;
            for (int64_t o = 0; o < c->outer; o++)
                s += c->ops->run_sum(c->w + (o * c->alen + a) * c->inner, c->inner, c->p);
            c->acc[a] = s;
        }
    }
}

static int fw_norms_acc(const float *w, int64_t outer, int64_t alen, int64_t inner, int p,
                        double *acc) {
    fw_norm_ctx c = {fw_ops_get(), w, outer, alen, inner, p, acc};
    int64_t per = outer * inner;
    fw_parallel_for(alen, FW_STREAM_GRAIN / (per > 0 ? per : 1) + 1, fw_norm_task, &c);
    return FW_OK;
}

int fw_channel_norms(const float *w, int64_t outer, int64_t alen, int64_t inner, int p,
                     float *out) {
    fw_layout L;
    int rc;
    if ((rc = fw_layout_init(&L, outer, alen, inner, FW_MODE_AXIS, 1))) return rc;
    FW_REQUIRE(p == 1 || p == 2, "p must be 1 or 2, got %d", p);
    FW_REQUIRE((alen == 0 || out) && (outer * alen * inner == 0 || w), "null pointer");
    if (alen == 0) return FW_OK;
    double *acc = (double *)malloc((size_t)alen * sizeof(double));
    if (!acc) return fw_error(FW_ENOMEM, "out of memory");
    if (outer * inner == 0) {
        for (int64_t a = 0; a < alen; a++) acc[a] = 0.0;
    } else {
        fw_norms_acc(w, outer, alen, inner, p, acc);
    }
    /* NaN results are the canonical quiet NaN: which input payload an IEEE operation propagates
     * depends on operand order, which compilers may swap for commutative operations */
    for (int64_t a = 0; a < alen; a++)
        out[a] = acc[a] != acc[a] ? NAN : (float)(p == 2 ? sqrt(acc[a]) : acc[a]);
    free(acc);
    return FW_OK;
}

/* ---------------------------------------------------------------- sign quantization */

typedef struct {
    const float *w;
    int8_t *signs;
} fw_sign_ctx;

static void fw_sign_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_sign_ctx *c = (fw_sign_ctx *)vctx;
    const float *restrict w = c->w; /* locals: int8 stores may alias the context */
    int8_t *restrict sg = c->signs;
    for (int64_t i = b; i < e; i++) sg[i] = (int8_t)(1 - 2 * (w[i] < 0.0f));
}

int fw_sign_quantize(const float *w, int64_t outer, int64_t alen, int64_t inner, int8_t *signs,
                     float *alpha) {
    fw_layout L;
    int rc;
    if ((rc = fw_layout_init(&L, outer, alen, inner, FW_MODE_AXIS, 1))) return rc;
    int64_t n = outer * alen * inner;
    FW_REQUIRE((n == 0 || (w && signs)) && (alen == 0 || alpha), "null pointer");
    if (alen == 0) return FW_OK;
    fw_sign_ctx sc = {w, signs};
    fw_parallel_for(n, FW_STREAM_GRAIN, fw_sign_task, &sc);
    int64_t cnt = outer * inner;
    if (cnt == 0) {
        for (int64_t a = 0; a < alen; a++) alpha[a] = 0.0f;
        return FW_OK;
    }
    double *acc = (double *)malloc((size_t)alen * sizeof(double));
    if (!acc) return fw_error(FW_ENOMEM, "out of memory");
    fw_norms_acc(w, outer, alen, inner, 1, acc);
    for (int64_t a = 0; a < alen; a++) alpha[a] = acc[a] != acc[a] ? NAN : (float)(acc[a] / (double)cnt);
    free(acc);
    return FW_OK;
}

int fw_pack_signs(const int8_t *signs, int64_t n, uint8_t *out, int64_t out_len) {
    FW_REQUIRE(n >= 0 && n <= (INT64_MAX >> 4), "invalid count");
    FW_REQUIRE(out_len == (n + 7) / 8, "output length %lld, need %lld", (long long)out_len,
               (long long)((n + 7) / 8));
    FW_REQUIRE(n == 0 || (signs && out), "null pointer");
    for (int64_t i = 0; i < n; i++)
        if (signs[i] != 1 && signs[i] != -1)
            return fw_error(FW_ERANGE, "sign %d at index %lld is not -1 or +1", (int)signs[i],
                            (long long)i);
    memset(out, 0, (size_t)out_len);
    for (int64_t i = 0; i < n; i++)
        if (signs[i] > 0) out[i >> 3] |= (uint8_t)(1u << (i & 7));
    return FW_OK;
}

int fw_unpack_signs(const uint8_t *packed, int64_t nbytes, int64_t count, int8_t *out) {
    FW_REQUIRE(count >= 0 && count <= (INT64_MAX >> 4) && nbytes >= 0, "invalid count");
    FW_REQUIRE(nbytes >= (count + 7) / 8, "%lld bytes hold fewer than %lld signs",
               (long long)nbytes, (long long)count);
    FW_REQUIRE(count == 0 || (packed && out), "null pointer");
    for (int64_t i = 0; i < count; i++) out[i] = (packed[i >> 3] >> (i & 7)) & 1 ? 1 : -1;
    return FW_OK;
}
