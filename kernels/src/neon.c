/* NEON primitives (aarch64, where Advanced SIMD is baseline). Bit-identical to ref.c: the same
 * IEEE operations per element in the same order. Compiled only on aarch64. */
#include "fw_internal.h"

#if defined(__aarch64__) && !defined(FW_NO_SIMD)
#include <arm_neon.h>

/* ---------------------------------------------------------------- quantize */

static inline float32x4_t nq4(float32x4_t x, float32x4_t s, float32x4_t zf, float32x4_t lo,
                              float32x4_t hi) {
    float32x4_t v = vdivq_f32(x, s);
    uint32x4_t ord = vceqq_f32(v, v);
    float32x4_t r = vaddq_f32(vrndnq_f32(v), zf);
    r = vminq_f32(vmaxq_f32(r, lo), hi);
    return vbslq_f32(ord, r, zf); /* NaN -> zero point */
}

/* 4 x 4 integral codes in [-128, 255] -> 16 bytes (low byte of each) */
static inline uint8x16_t npack16(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d) {
    int16x8_t ab = vcombine_s16(vmovn_s32(vcvtq_s32_f32(a)), vmovn_s32(vcvtq_s32_f32(b)));
    int16x8_t cd = vcombine_s16(vmovn_s32(vcvtq_s32_f32(c)), vmovn_s32(vcvtq_s32_f32(d)));
    return vreinterpretq_u8_s8(vcombine_s8(vmovn_s16(ab), vmovn_s16(cd)));
}

static void neon_quant_run(const float *x, int64_t n, const float *s, const int32_t *z,
                           int64_t sstride, float qmin, float qmax, uint8_t *out) {
    float32x4_t lo = vdupq_n_f32(qmin), hi = vdupq_n_f32(qmax);
    int64_t i = 0;
    if (sstride == 0) {
        float32x4_t sv = vdupq_n_f32(s[0]), zf = vdupq_n_f32((float)z[0]);
        for (; i + 16 <= n; i += 16) {
            float32x4_t a = nq4(vld1q_f32(x + i), sv, zf, lo, hi);
            float32x4_t b = nq4(vld1q_f32(x + i + 4), sv, zf, lo, hi);
            float32x4_t c = nq4(vld1q_f32(x + i + 8), sv, zf, lo, hi);
            float32x4_t d = nq4(vld1q_f32(x + i + 12), sv, zf, lo, hi);
            vst1q_u8(out + i, npack16(a, b, c, d));
        }
    } else {
        for (; i + 16 <= n; i += 16) {
            float32x4_t r[4];
            for (int t = 0; t < 4; t++) {
                float32x4_t sv = vld1q_f32(s + i + 4 * t);
                float32x4_t zf = vcvtq_f32_s32(vld1q_s32(z + i + 4 * t));
                r[t] = nq4(vld1q_f32(x + i + 4 * t), sv, zf, lo, hi);
            }
            vst1q_u8(out + i, npack16(r[0], r[1], r[2], r[3]));
        }
    }
    for (; i < n; i++) out[i] = fw_quant1(x[i], s[i * sstride], z[i * sstride], qmin, qmax);
}

/* ---------------------------------------------------------------- dequantize */

static inline void ndeq8(int16x8_t v, const float *s, const int32_t *z, int64_t sstride,
                         float *out) {
    int32x4_t lo = vmovl_s16(vget_low_s16(v)), hi = vmovl_s16(vget_high_s16(v));
    int32x4_t z0, z1;
    float32x4_t s0, s1;
    if (sstride == 0) {
        z0 = z1 = vdupq_n_s32(z[0]);
        s0 = s1 = vdupq_n_f32(s[0]);
    } else {
        z0 = vld1q_s32(z);
        z1 = vld1q_s32(z + 4);
        s0 = vld1q_f32(s);
        s1 = vld1q_f32(s + 4);
    }
    vst1q_f32(out, vmulq_f32(vcvtq_f32_s32(vsubq_s32(lo, z0)), s0));
    vst1q_f32(out + 4, vmulq_f32(vcvtq_f32_s32(vsubq_s32(hi, z1)), s1));
}

static void neon_dequant_run_s8(const int8_t *q, int64_t n, const float *s, const int32_t *z,
                                int64_t sstride, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        ndeq8(vmovl_s8(vld1_s8(q + i)), s + i * sstride, z + i * sstride, sstride, out + i);
    for (; i < n; i++) out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

static void neon_dequant_run_u8(const uint8_t *q, int64_t n, const float *s, const int32_t *z,
                                int64_t sstride, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        ndeq8(vreinterpretq_s16_u16(vmovl_u8(vld1_u8(q + i))), s + i * sstride, z + i * sstride,
              sstride, out + i);
    for (; i < n; i++) out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

/* ---------------------------------------------------------------- masks */

static void neon_absgt_mask(const float *w, int64_t n, float thr, uint8_t *mask) {
    float32x4_t t = vdupq_n_f32(thr);
    uint8x16_t one = vdupq_n_u8(1);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint32x4_t a = vcgtq_f32(vabsq_f32(vld1q_f32(w + i)), t);
        uint32x4_t b = vcgtq_f32(vabsq_f32(vld1q_f32(w + i + 4)), t);
        uint32x4_t c = vcgtq_f32(vabsq_f32(vld1q_f32(w + i + 8)), t);
        uint32x4_t d = vcgtq_f32(vabsq_f32(vld1q_f32(w + i + 12)), t);
        uint16x8_t ab = vcombine_u16(vmovn_u32(a), vmovn_u32(b));
        uint16x8_t cd = vcombine_u16(vmovn_u32(c), vmovn_u32(d));
        vst1q_u8(mask + i, vandq_u8(vcombine_u8(vmovn_u16(ab), vmovn_u16(cd)), one));
    }
    for (; i < n; i++) mask[i] = fabsf(w[i]) > thr;
}

static void neon_apply_mask(const float *w, const uint8_t *mask, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t m = vmovl_u8(vld1_u8(mask + i));
        uint32x4_t m0 = vmovl_u16(vget_low_u16(m)), m1 = vmovl_u16(vget_high_u16(m));
        uint32x4_t k0 = vmvnq_u32(vceqzq_u32(m0)), k1 = vmvnq_u32(vceqzq_u32(m1));
        vst1q_f32(out + i, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vld1q_f32(w + i)), k0)));
        vst1q_f32(out + i + 4,
                  vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vld1q_f32(w + i + 4)), k1)));
    }
    for (; i < n; i++) out[i] = mask[i] ? w[i] : 0.0f;
}

/* ---------------------------------------------------------------- histogram */

static void neon_hist_accum(const float *x, int64_t n, float lo, float scale, float maxbin,
                            uint32_t *counts, int64_t stride) {
    float32x4_t lov = vdupq_n_f32(lo), sc = vdupq_n_f32(scale), mb = vdupq_n_f32(maxbin);
    float32x4_t zero = vdupq_n_f32(0.0f);
    int64_t i = 0;
    int32_t idx[4];
    uint32_t ok[4];
    for (; i + 4 <= n; i += 4) {
        float32x4_t t = vmulq_f32(vsubq_f32(vld1q_f32(x + i), lov), sc);
        uint32x4_t ord = vceqq_f32(t, t);
        t = vminq_f32(vmaxq_f32(t, zero), mb);
        vst1q_s32(idx, vcvtq_s32_f32(vrndmq_f32(t)));
        vst1q_u32(ok, ord);
        for (int j = 0; j < 4; j++)
            if (ok[j]) counts[j * stride + idx[j]]++;
    }
    for (; i < n; i++) {
        float t = (x[i] - lo) * scale;
        if (t != t) continue;
        t = t > 0.0f ? t : 0.0f;
        t = t < maxbin ? t : maxbin;
        counts[(i & 3) * stride + (int32_t)floorf(t)]++;
    }
}

/* ---------------------------------------------------------------- norms */

static double neon_run_sum(const float *x, int64_t n, int p) {
    float64x2_t a0 = vdupq_n_f64(0.0), a1 = a0, a2 = a0, a3 = a0; /* lanes 01 23 45 67 */
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        float32x4_t v0 = vld1q_f32(x + j), v1 = vld1q_f32(x + j + 4);
        if (p == 1) {
            v0 = vabsq_f32(v0);
            v1 = vabsq_f32(v1);
        }
        float64x2_t d0 = vcvt_f64_f32(vget_low_f32(v0)), d1 = vcvt_high_f64_f32(v0);
        float64x2_t d2 = vcvt_f64_f32(vget_low_f32(v1)), d3 = vcvt_high_f64_f32(v1);
        if (p == 1) {
            a0 = vaddq_f64(a0, d0);
            a1 = vaddq_f64(a1, d1);
            a2 = vaddq_f64(a2, d2);
            a3 = vaddq_f64(a3, d3);
        } else { /* the product is exact in double, so fused == separate */
            a0 = vfmaq_f64(a0, d0, d0);
            a1 = vfmaq_f64(a1, d1, d1);
            a2 = vfmaq_f64(a2, d2, d2);
            a3 = vfmaq_f64(a3, d3, d3);
        }
    }
    double l[8];
    vst1q_f64(l, a0);
    vst1q_f64(l + 2, a1);
    vst1q_f64(l + 4, a2);
    vst1q_f64(l + 6, a3);
    for (; j < n; j++) {
        double v = (double)x[j];
        l[j & 7] += p == 1 ? fabs(v) : v * v;
    }
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static void neon_col_accum(const float *x, int64_t n, int p, double *acc) {
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
        float64x2_t v = vcvt_f64_f32(vld1_f32(x + j));
        float64x2_t a = vld1q_f64(acc + j);
        a = p == 1 ? vaddq_f64(a, vabsq_f64(v)) : vfmaq_f64(a, v, v);
        vst1q_f64(acc + j, a);
    }
    for (; j < n; j++) {
        double v = (double)x[j];
        acc[j] += p == 1 ? fabs(v) : v * v;
    }
}

/* ---------------------------------------------------------------- GPTQ rank-k update */

static void neon_rank_update(float *W, int64_t ldw, const float *E, int64_t lde, const float *U,
                             int64_t ldu, int64_t rows, int64_t kb, int64_t ncols) {
    /* the U strip [kb x 16] is packed contiguously when several row groups reuse it */
    float stackbuf[128 * 16];
    float *pk = NULL;
    if (rows >= 8) pk = kb <= 128 ? stackbuf : (float *)malloc((size_t)kb * 16 * sizeof(float));
    int64_t j = 0;
    for (; j + 16 <= ncols; j += 16) {
        const float *us = U + j;
        int64_t ldp = ldu;
        if (pk) {
            for (int64_t k = 0; k < kb; k++) memcpy(pk + k * 16, U + k * ldu + j, 16 * sizeof(float));
            us = pk;
            ldp = 16;
        }
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
            float *w0 = W + r * ldw + j;
            float32x4_t c[4][4];
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++) c[a][b] = vld1q_f32(w0 + a * ldw + 4 * b);
            const float *e = E + r * lde;
            for (int64_t k = 0; k < kb; k++) {
                const float *u = us + k * ldp;
                float32x4_t u0 = vld1q_f32(u), u1 = vld1q_f32(u + 4), u2 = vld1q_f32(u + 8),
                            u3 = vld1q_f32(u + 12);
                for (int a = 0; a < 4; a++) {
                    float32x4_t ev = vdupq_n_f32(e[a * lde + k]);
                    c[a][0] = vfmaq_f32(c[a][0], ev, u0);
                    c[a][1] = vfmaq_f32(c[a][1], ev, u1);
                    c[a][2] = vfmaq_f32(c[a][2], ev, u2);
                    c[a][3] = vfmaq_f32(c[a][3], ev, u3);
                }
            }
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++) vst1q_f32(w0 + a * ldw + 4 * b, c[a][b]);
        }
        for (; r < rows; r++) {
            float *w0 = W + r * ldw + j;
            float32x4_t c0 = vld1q_f32(w0), c1 = vld1q_f32(w0 + 4), c2 = vld1q_f32(w0 + 8),
                        c3 = vld1q_f32(w0 + 12);
            for (int64_t k = 0; k < kb; k++) {
                const float *u = us + k * ldp;
                float32x4_t ev = vdupq_n_f32(E[r * lde + k]);
                c0 = vfmaq_f32(c0, ev, vld1q_f32(u));
                c1 = vfmaq_f32(c1, ev, vld1q_f32(u + 4));
                c2 = vfmaq_f32(c2, ev, vld1q_f32(u + 8));
                c3 = vfmaq_f32(c3, ev, vld1q_f32(u + 12));
            }
            vst1q_f32(w0, c0);
            vst1q_f32(w0 + 4, c1);
            vst1q_f32(w0 + 8, c2);
            vst1q_f32(w0 + 12, c3);
        }
    }
    for (; j + 4 <= ncols; j += 4) {
        for (int64_t r = 0; r < rows; r++) {
            float *w0 = W + r * ldw + j;
            float32x4_t c0 = vld1q_f32(w0);
            for (int64_t k = 0; k < kb; k++)
                c0 = vfmaq_f32(c0, vdupq_n_f32(E[r * lde + k]), vld1q_f32(U + k * ldu + j));
            vst1q_f32(w0, c0);
        }
    }
    if (j < ncols) {
        for (int64_t r = 0; r < rows; r++) {
            float *w0 = W + r * ldw;
            for (int64_t k = 0; k < kb; k++) {
                float e = E[r * lde + k];
                const float *u = U + k * ldu;
                for (int64_t jj = j; jj < ncols; jj++) w0[jj] = fmaf(e, u[jj], w0[jj]);
            }
        }
    }
    if (pk && pk != stackbuf) free(pk);
}

/* ---------------------------------------------------------------- selection bracket */

static void neon_bracket(const float *x, int64_t n, uint32_t lo, uint32_t span, int64_t *below,
                         uint32_t *buf, int64_t *nb, int64_t cap, int *overflow) {
    uint32x4_t absm = vdupq_n_u32(0x7FFFFFFFu), lov = vdupq_n_u32(lo), hiv = vdupq_n_u32(lo + span);
    int64_t cnt = 0, m = *nb, i = 0;
    while (i + 16 <= n) {
        uint32x4_t acc = vdupq_n_u32(0);
        int64_t stop = i + ((int64_t)1 << 26) < n ? i + ((int64_t)1 << 26) : n;
        for (; i + 16 <= stop; i += 16) {
            uint32x4_t a0 = vandq_u32(vld1q_u32((const uint32_t *)(x + i)), absm);
            uint32x4_t a1 = vandq_u32(vld1q_u32((const uint32_t *)(x + i + 4)), absm);
            uint32x4_t a2 = vandq_u32(vld1q_u32((const uint32_t *)(x + i + 8)), absm);
            uint32x4_t a3 = vandq_u32(vld1q_u32((const uint32_t *)(x + i + 12)), absm);
            uint32x4_t b0 = vcltq_u32(a0, lov), b1 = vcltq_u32(a1, lov);
            uint32x4_t b2 = vcltq_u32(a2, lov), b3 = vcltq_u32(a3, lov);
            acc = vsubq_u32(acc, vaddq_u32(vaddq_u32(b0, b1), vaddq_u32(b2, b3)));
            uint32x4_t in0 = vandq_u32(vcgeq_u32(a0, lov), vcleq_u32(a0, hiv));
            uint32x4_t in1 = vandq_u32(vcgeq_u32(a1, lov), vcleq_u32(a1, hiv));
            uint32x4_t in2 = vandq_u32(vcgeq_u32(a2, lov), vcleq_u32(a2, hiv));
            uint32x4_t in3 = vandq_u32(vcgeq_u32(a3, lov), vcleq_u32(a3, hiv));
            if (vmaxvq_u32(vorrq_u32(vorrq_u32(in0, in1), vorrq_u32(in2, in3)))) {
                for (int j = 0; j < 16; j++) {
                    uint32_t a = fw_f2u(x[i + j]) & 0x7FFFFFFFu;
                    if (a - lo <= span) {
                        if (m < cap)
                            buf[m++] = a;
                        else
                            *overflow = 1;
                    }
                }
            }
        }
        cnt += vaddvq_u32(acc);
    }
    fw_bracket_scalar(x, i, n, lo, span, &cnt, buf, &m, cap, overflow);
    *below += cnt;
    *nb = m;
}

const fw_ops fw_ops_neon = {
    "neon",
    neon_quant_run,
    neon_dequant_run_s8,
    neon_dequant_run_u8,
    neon_absgt_mask,
    neon_apply_mask,
    neon_hist_accum,
    neon_run_sum,
    neon_col_accum,
    neon_rank_update,
    neon_bracket,
    NULL, /* absgt_mask_nt */
    0,    /* mask_one_stream */
};

#endif
