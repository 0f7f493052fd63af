/* Affine quantization: quantize / dequantize / pack / unpack / choose_qparams. */
#include "fw_internal.h"

#include <float.h>

#define FW_STREAM_GRAIN (1 << 16) /* elements per thread below which a kernel stays serial */

static int fw_check_qrange(int32_t qmin, int32_t qmax) {
    FW_REQUIRE(qmin < qmax && qmin >= -128 && qmax <= 255 && (qmin >= 0 || qmax <= 127),
               "invalid quantized range [%d, %d]", (int)qmin, (int)qmax);
    return FW_OK;
}

static int fw_check_params(const float *scale, const int32_t *zp, int64_t np, int32_t zmin,
                           int32_t zmax) {
    FW_REQUIRE(np == 0 || (scale && zp), "null scale / zero_point");
    for (int64_t i = 0; i < np; i++) {
        if (zp[i] < zmin || zp[i] > zmax)
            return fw_error(FW_ERANGE, "zero_point %d at index %lld outside [%d, %d]", (int)zp[i],
                            (long long)i, (int)zmin, (int)zmax);
    }
    return FW_OK;
}

/* ---------------------------------------------------------------- quantize */

typedef struct {
    const fw_ops *ops;
    fw_layout L;
    const float *x;
    const float *s;
    const int32_t *z;
    float qmin, qmax;
    uint8_t *out;
    int stream;
} fw_quant_ctx;

static void fw_quant_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_quant_ctx *c = (fw_quant_ctx *)vctx;
    uint8_t stage[FW_STREAM_CHUNK];
    fw_run_iter it;
    fw_run_iter_init(&it, &c->L, b, e);
    int64_t pidx, pstride, len;
    while ((len = fw_run_next(&it, &pidx, &pstride)) > 0) {
        if (c->stream && len > FW_STREAM_CHUNK) { /* stage in chunks */
            for (int64_t d = 0; d < len; d += FW_STREAM_CHUNK) {
                int64_t l = len - d < FW_STREAM_CHUNK ? len - d : FW_STREAM_CHUNK;
                c->ops->quant_run(c->x + b + d, l, c->s + pidx + d * pstride,
                                  c->z + pidx + d * pstride, pstride, c->qmin, c->qmax, stage);
                fw_stream_store(c->out + b + d, stage, (size_t)l);
            }
            b += len;
            continue;
        }
        uint8_t *dst = c->stream ? stage : c->out + b;
        c->ops->quant_run(c->x + b, len, c->s + pidx, c->z + pidx, pstride, c->qmin, c->qmax, dst);
        if (c->stream) fw_stream_store(c->out + b, stage, (size_t)len);
        b += len;
    }
    if (c->stream) fw_stream_fence();
}

int fw_quantize(const float *x, int64_t outer, int64_t alen, int64_t inner, int mode, int64_t block,
                const float *scale, const int32_t *zero_point, int32_t qmin, int32_t qmax,
                uint8_t *out) {
    fw_quant_ctx c;
    int rc;
    if ((rc = fw_layout_init(&c.L, outer, alen, inner, mode, block))) return rc;
    if ((rc = fw_check_qrange(qmin, qmax))) return rc;
    int64_t n = outer * alen * inner;
    FW_REQUIRE(n == 0 || (x && out), "null pointer");
    if (n == 0) return FW_OK;
    if ((rc = fw_check_params(scale, zero_point, fw_layout_nparams(&c.L), qmin, qmax))) return rc;
    c.ops = fw_ops_get();
    c.x = x;
    c.s = scale;
    c.z = zero_point;
    c.qmin = (float)qmin;
    c.qmax = (float)qmax;
    c.out = out;
    c.stream = fw_stream_wanted(n);
    fw_parallel_for_dynamic(n, FW_STREAM_GRAIN, fw_quant_task, &c);
    return FW_OK;
}

/* ---------------------------------------------------------------- dequantize */

typedef struct {
    const fw_ops *ops;
    fw_layout L;
    const uint8_t *q;
    int q_signed;
    const float *s;
    const int32_t *z;
    float *out;
    int stream;
} fw_dequant_ctx;

static void fw_dequant_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_dequant_ctx *c = (fw_dequant_ctx *)vctx;
    float stage[FW_STREAM_CHUNK];
    fw_run_iter it;
    fw_run_iter_init(&it, &c->L, b, e);
    int64_t pidx, pstride, len;
    while ((len = fw_run_next(&it, &pidx, &pstride)) > 0) {
        if (c->stream && len > FW_STREAM_CHUNK) { /* stage in chunks */
            for (int64_t d = 0; d < len; d += FW_STREAM_CHUNK) {
                int64_t l = len - d < FW_STREAM_CHUNK ? len - d : FW_STREAM_CHUNK;
                if (c->q_signed)
                    c->ops->dequant_run_s8((const int8_t *)c->q + b + d, l, c->s + pidx + d * pstride,
                                           c->z + pidx + d * pstride, pstride, stage);
                else
                    c->ops->dequant_run_u8(c->q + b + d, l, c->s + pidx + d * pstride,
                                           c->z + pidx + d * pstride, pstride, stage);
                fw_stream_store(c->out + b + d, stage, (size_t)l * sizeof(float));
            }
            b += len;
            continue;
        }
        float *dst = c->stream ? stage : c->out + b;
        if (c->q_signed)
            c->ops->dequant_run_s8((const int8_t *)c->q + b, len, c->s + pidx, c->z + pidx,
                                   pstride, dst);
        else
            c->ops->dequant_run_u8(c->q + b, len, c->s + pidx, c->z + pidx, pstride, dst);
        if (c->stream) fw_stream_store(c->out + b, stage, (size_t)len * sizeof(float));
        b += len;
    }
    if (c->stream) fw_stream_fence();
}

int fw_dequantize(const uint8_t *q, int q_signed, int64_t outer, int64_t alen, int64_t inner,
                  int mode, int64_t block, const float *scale, const int32_t *zero_point,
                  float *out) {
    fw_dequant_ctx c;
    int rc;
    if ((rc = fw_layout_init(&c.L, outer, alen, inner, mode, block))) return rc;
    int64_t n = outer * alen * inner;
    FW_REQUIRE(n == 0 || (q && out), "null pointer");
    if (n == 0) return FW_OK;
    if ((rc = fw_check_params(scale, zero_point, fw_layout_nparams(&c.L), q_signed ? -128 : 0,
                              q_signed ? 127 : 255)))
        return rc;
    c.ops = fw_ops_get();
    c.q = q;
    c.q_signed = q_signed != 0;
    c.s = scale;
    c.z = zero_point;
    c.out = out;
    c.stream = fw_stream_wanted(n * (int64_t)sizeof(float));
    fw_parallel_for_dynamic(n, FW_STREAM_GRAIN, fw_dequant_task, &c);
    return FW_OK;
}

/* ---------------------------------------------------------------- pack / unpack */

int fw_pack(const uint8_t *q, int q_signed, int64_t n, int bits, uint8_t *out, int64_t out_len) {
    FW_REQUIRE(bits == 1 || bits == 2 || bits == 4 || bits == 8, "bits must be 1, 2, 4 or 8, got %d",
               bits);
    FW_REQUIRE(n >= 0 && n <= (INT64_MAX >> 4), "invalid element count");
    int64_t need = (n * bits + 7) / 8;
    FW_REQUIRE(out_len == need, "output length %lld, need %lld", (long long)out_len,
               (long long)need);
    FW_REQUIRE(n == 0 || (q && out), "null pointer");
    int32_t lo = q_signed ? -(1 << (bits - 1)) : 0;
    int32_t hi = q_signed ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
    /* range check: a branch-free pass first (vectorizes), the index only on failure */
    int bad = 0;
    if (q_signed) {
        const int8_t *restrict qs = (const int8_t *)q;
        for (int64_t i = 0; i < n; i++) bad |= (qs[i] < lo) | (qs[i] > hi);
    } else {
        for (int64_t i = 0; i < n; i++) bad |= q[i] > hi;
    }
    if (bad) {
        for (int64_t i = 0; i < n; i++) {
            int32_t v = q_signed ? (int32_t)(int8_t)q[i] : (int32_t)q[i];
            if (v < lo || v > hi)
                return fw_error(FW_ERANGE, "value %d at index %lld does not fit in %d bits (%s)",
                                (int)v, (long long)i, bits, q_signed ? "signed" : "unsigned");
        }
    }
    if (bits == 8) {
        memcpy(out, q, (size_t)n);
        return FW_OK;
    }
    uint8_t *restrict o = out;
    const uint8_t *restrict in = q;
    const int per = 8 / bits;
    const uint8_t m = (uint8_t)((1u << bits) - 1u);
    int64_t full = n / per;
    if (bits == 4) {
        for (int64_t j = 0; j < full; j++)
            o[j] = (uint8_t)((in[2 * j] & 0x0F) | (in[2 * j + 1] << 4));
    } else if (bits == 2) {
        for (int64_t j = 0; j < full; j++)
            o[j] = (uint8_t)((in[4 * j] & 3) | ((in[4 * j + 1] & 3) << 2) |
                             ((in[4 * j + 2] & 3) << 4) | ((in[4 * j + 3] & 3) << 6));
    } else {
        for (int64_t j = 0; j < full; j++) {
            uint8_t b = 0;
            for (int t = 0; t < 8; t++) b |= (uint8_t)((in[8 * j + t] & 1) << t);
            o[j] = b;
        }
    }
    if (full < need) { /* the partial last byte */
        uint8_t b = 0;
        for (int64_t i = full * per; i < n; i++) b |= (uint8_t)((in[i] & m) << ((i - full * per) * bits));
        o[full] = b;
    }
    return FW_OK;
}

int fw_unpack(const uint8_t *packed, int64_t nbytes, int bits, int out_signed, int64_t count,
              uint8_t *out) {
    FW_REQUIRE(bits == 1 || bits == 2 || bits == 4 || bits == 8, "bits must be 1, 2, 4 or 8, got %d",
               bits);
    FW_REQUIRE(count >= 0 && count <= (INT64_MAX >> 4) && nbytes >= 0, "invalid count");
    int64_t need = (count * bits + 7) / 8;
    FW_REQUIRE(nbytes >= need, "%lld packed bytes hold fewer than %lld %d-bit values",
               (long long)nbytes, (long long)count, bits);
    FW_REQUIRE(count == 0 || (packed && out), "null pointer");
    if (bits == 8) {
        memcpy(out, packed, (size_t)count);
        return FW_OK;
    }
    uint32_t m = (1u << bits) - 1u;
    for (int64_t i = 0; i < count; i++) {
        int64_t bit = i * bits;
        uint32_t v = ((uint32_t)packed[bit >> 3] >> (bit & 7)) & m;
        if (out_signed && (v >> (bits - 1))) v |= ~m; /* sign-extend */
        out[i] = (uint8_t)v;
    }
    return FW_OK;
}

/* ---------------------------------------------------------------- choose_qparams */

static void fw_qparams_from_range(float lo, float hi, int symmetric, int32_t qmin, int32_t qmax,
                                  float *s_out, int32_t *z_out) {
    float s;
    int32_t z;
    if (symmetric) {
        float amax = -lo > hi ? -lo : hi;
        int32_t zc = qmin < 0 ? 0 : (qmax + 1) / 2;
        s = amax / (float)(qmax - zc);
        z = zc;
        if (!(s > 0.0f)) s = 1.0f;
        if (s > FLT_MAX) s = FLT_MAX;
    } else {
        s = (hi - lo) / (float)(qmax - qmin);
        if (!(s > 0.0f)) s = 1.0f;
        if (s > FLT_MAX) s = FLT_MAX;
        float zf = nearbyintf((float)qmin - lo / s);
        zf = zf < (float)qmin ? (float)qmin : zf;
        zf = zf > (float)qmax ? (float)qmax : zf;
        z = (int32_t)zf;
    }
    *s_out = s;
    *z_out = z;
}

/* squared quantization error of the finite values, canonical 8-lane double accumulation */
static double fw_qerr(const float *x, int64_t n, float s, int32_t z, float qmin, float qmax) {
    double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float zf = (float)z;
    for (int64_t j = 0; j < n; j++) {
        float v = x[j];
        if (!isfinite(v)) continue;
        float r = nearbyintf(v / s) + zf;
        r = r < qmin ? qmin : r;
        r = r > qmax ? qmax : r;
        float d = (r - zf) * s;
        double e = (double)d - (double)v;
        l[j & 7] += e * e;
    }
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

#define FW_MSE_CANDIDATES 100

static float fw_mse_alpha(int c) { return (float)(FW_MSE_CANDIDATES - c) / (float)FW_MSE_CANDIDATES; }

static void fw_range_of(const float *x, int64_t n, float *lo, float *hi) {
    float mn = 0.0f, mx = 0.0f; /* the range always includes 0 */
    for (int64_t j = 0; j < n; j++) {
        float v = x[j];
        if (!isfinite(v)) continue;
        if (v < mn) mn = v;
        if (v > mx) mx = v;
    }
    *lo = mn;
    *hi = mx;
}

static void fw_slice_params(const float *x, int64_t n, float lo, float hi, int symmetric,
                            int32_t qmin, int32_t qmax, int method, float *s, int32_t *z) {
    fw_qparams_from_range(lo, hi, symmetric, qmin, qmax, s, z);
    if (method != FW_QP_MSE || n == 0 || (lo == 0.0f && hi == 0.0f)) return;
    double best = fw_qerr(x, n, *s, *z, (float)qmin, (float)qmax);
    for (int c = 1; c < FW_MSE_CANDIDATES; c++) {
        float a = fw_mse_alpha(c), cs;
        int32_t cz;
        fw_qparams_from_range(a * lo, a * hi, symmetric, qmin, qmax, &cs, &cz);
        double err = fw_qerr(x, n, cs, cz, (float)qmin, (float)qmax);
        if (err < best) {
            best = err;
            *s = cs;
            *z = cz;
        }
    }
}

typedef struct {
    fw_layout L;
    const float *x;
    int32_t qmin, qmax;
    int symmetric, method;
    float *scale;
    int32_t *zp;
    int64_t slice_len;
    int failed;
} fw_qp_ctx;

/* gathers the elements of parameter p into buf (or returns a pointer into x when contiguous) */
static const float *fw_qp_slice(const fw_qp_ctx *c, int64_t p, float *buf, int64_t *len) {
    const fw_layout *L = &c->L;
    const float *x = c->x;
    if (L->mode == FW_MODE_AXIS) {
        int64_t a = p;
        *len = L->outer * L->inner;
        if (L->outer == 1) return x + a * L->inner;
        int64_t k = 0;
        for (int64_t o = 0; o < L->outer; o++) {
            const float *src = x + (o * L->alen + a) * L->inner;
            memcpy(buf + k, src, (size_t)L->inner * sizeof(float));
            k += L->inner;
        }
        return buf;
    }
    /* block: p = (o * nblk + b) * inner + i */
    int64_t i = p % L->inner, ob = p / L->inner;
    int64_t b = ob % L->nblk, o = ob / L->nblk;
    int64_t a0 = b * L->block, a1 = a0 + L->block;
    if (a1 > L->alen) a1 = L->alen;
    *len = a1 - a0;
    const float *base = x + (o * L->alen + a0) * L->inner + i;
    if (L->inner == 1) return base;
    for (int64_t a = 0; a < a1 - a0; a++) buf[a] = base[a * L->inner];
    return buf;
}

static void fw_qp_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_qp_ctx *c = (fw_qp_ctx *)vctx;
    float *buf = (float *)malloc((size_t)(c->slice_len > 0 ? c->slice_len : 1) * sizeof(float));
    if (!buf) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t p = b; p < e; p++) {
        int64_t len;
        const float *sl = fw_qp_slice(c, p, buf, &len);
        float lo, hi;
        fw_range_of(sl, len, &lo, &hi);
        fw_slice_params(sl, len, lo, hi, c->symmetric, c->qmin, c->qmax, c->method, &c->scale[p],
                        &c->zp[p]);
    }
    free(buf);
}

/* per-tensor MSE: the candidates are spread over the threads */
typedef struct {
    const float *x;
    int64_t n;
    float lo, hi;
    int symmetric;
    int32_t qmin, qmax;
    double err[FW_MSE_CANDIDATES];
    float s[FW_MSE_CANDIDATES];
    int32_t z[FW_MSE_CANDIDATES];
} fw_mse_ctx;

static void fw_mse_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_mse_ctx *c = (fw_mse_ctx *)vctx;
    for (int64_t cand = b; cand < e; cand++) {
        float a = fw_mse_alpha((int)cand);
        fw_qparams_from_range(a * c->lo, a * c->hi, c->symmetric, c->qmin, c->qmax, &c->s[cand],
                              &c->z[cand]);
        c->err[cand] = fw_qerr(c->x, c->n, c->s[cand], c->z[cand], (float)c->qmin, (float)c->qmax);
    }
}

int fw_choose_qparams(const float *x, int64_t outer, int64_t alen, int64_t inner, int mode,
                      int64_t block, int32_t qmin, int32_t qmax, int symmetric, int method,
                      float *scale, int32_t *zero_point) {
    fw_qp_ctx c;
    int rc;
    if ((rc = fw_layout_init(&c.L, outer, alen, inner, mode, block))) return rc;
    if ((rc = fw_check_qrange(qmin, qmax))) return rc;
    FW_REQUIRE(method == FW_QP_ABSMAX || method == FW_QP_MINMAX || method == FW_QP_MSE,
               "unknown method %d", method);
    int64_t n = outer * alen * inner;
    int64_t np = fw_layout_nparams(&c.L);
    FW_REQUIRE((n == 0 || x) && (np == 0 || (scale && zero_point)), "null pointer");
    symmetric = symmetric != 0;
    if (mode == FW_MODE_TENSOR) {
        float mn, mx;
        int64_t nf;
        if ((rc = fw_minmax_finite(x, n, &mn, &mx, &nf))) return rc;
        float lo = nf && mn < 0.0f ? mn : 0.0f, hi = nf && mx > 0.0f ? mx : 0.0f;
        fw_qparams_from_range(lo, hi, symmetric, qmin, qmax, scale, zero_point);
        if (method == FW_QP_MSE && n > 0 && !(lo == 0.0f && hi == 0.0f)) {
            fw_mse_ctx *m = (fw_mse_ctx *)malloc(sizeof *m);
            if (!m) return fw_error(FW_ENOMEM, "out of memory");
            m->x = x;
            m->n = n;
            m->lo = lo;
            m->hi = hi;
            m->symmetric = symmetric;
            m->qmin = qmin;
            m->qmax = qmax;
            int64_t grain = n >= (1 << 16) ? 1 : FW_MSE_CANDIDATES;
            fw_parallel_for(FW_MSE_CANDIDATES, grain, fw_mse_task, m);
            int best = 0;
            for (int cand = 1; cand < FW_MSE_CANDIDATES; cand++)
                if (m->err[cand] < m->err[best]) best = cand;
            *scale = m->s[best];
            *zero_point = m->z[best];
            free(m);
        }
        return FW_OK;
    }
    if (np == 0) return FW_OK;
    c.x = x;
    c.qmin = qmin;
    c.qmax = qmax;
    c.symmetric = symmetric;
    c.method = method;
    c.scale = scale;
    c.zp = zero_point;
    c.slice_len = mode == FW_MODE_AXIS ? outer * inner : c.L.block;
    c.failed = 0;
    int64_t work_per_param = c.slice_len * (method == FW_QP_MSE ? FW_MSE_CANDIDATES : 1);
    int64_t grain = work_per_param > 0 ? (1 << 16) / work_per_param + 1 : np;
    fw_parallel_for(np, grain, fw_qp_task, &c);
    if (c.failed) return fw_error(FW_ENOMEM, "out of memory");
    return FW_OK;
}
