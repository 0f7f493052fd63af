/* AVX2 + FMA primitives (x86-64). Bit-identical to ref.c: the same IEEE operations in the same
 * order per element (division, round-half-even, clamp; double accumulation lanes; one fused
 * multiply-add per update). Compiled for the baseline ISA; every function carries the target
 * attribute and is only called after dispatch.c saw AVX2, FMA and OS YMM support. */
#include "fw_internal.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FW_NO_SIMD)
#include <immintrin.h>

#define T __attribute__((target("avx2,fma")))

/* ---------------------------------------------------------------- quantize */

T static inline __m256 q8(__m256 x, __m256 s, __m256 zf, __m256 lo, __m256 hi) {
    __m256 v = _mm256_div_ps(x, s);
    __m256 ord = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
    __m256 r = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zf);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    return _mm256_blendv_ps(zf, r, ord);
}

/* 4 x 8 float codes (integral, in [-128, 255]) -> 32 bytes in order */
T static inline __m256i pack32(__m256 a, __m256 b, __m256 c, __m256 d, int sgn) {
    __m256i ia = _mm256_cvtps_epi32(a), ib = _mm256_cvtps_epi32(b);
    __m256i ic = _mm256_cvtps_epi32(c), id = _mm256_cvtps_epi32(d);
    __m256i ab = _mm256_packs_epi32(ia, ib), cd = _mm256_packs_epi32(ic, id);
    __m256i r = sgn ? _mm256_packs_epi16(ab, cd) : _mm256_packus_epi16(ab, cd);
    return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

T static void avx2_quant_run(const float *x, int64_t n, const float *s, const int32_t *z,
                             int64_t sstride, float qmin, float qmax, uint8_t *out) {
    __m256 lo = _mm256_set1_ps(qmin), hi = _mm256_set1_ps(qmax);
    int sgn = qmin < 0.0f;
    int64_t i = 0;
    if (sstride == 0) {
        __m256 sv = _mm256_set1_ps(s[0]), zf = _mm256_set1_ps((float)z[0]);
        for (; i + 32 <= n; i += 32) {
            __m256 a = q8(_mm256_loadu_ps(x + i), sv, zf, lo, hi);
            __m256 b = q8(_mm256_loadu_ps(x + i + 8), sv, zf, lo, hi);
            __m256 c = q8(_mm256_loadu_ps(x + i + 16), sv, zf, lo, hi);
            __m256 d = q8(_mm256_loadu_ps(x + i + 24), sv, zf, lo, hi);
            _mm256_storeu_si256((__m256i *)(out + i), pack32(a, b, c, d, sgn));
        }
    } else {
        for (; i + 32 <= n; i += 32) {
            __m256 r[4];
            for (int t = 0; t < 4; t++) {
                __m256 sv = _mm256_loadu_ps(s + i + 8 * t);
                __m256 zf = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(z + i + 8 * t)));
                r[t] = q8(_mm256_loadu_ps(x + i + 8 * t), sv, zf, lo, hi);
            }
            _mm256_storeu_si256((__m256i *)(out + i), pack32(r[0], r[1], r[2], r[3], sgn));
        }
    }
    for (; i < n; i++) out[i] = fw_quant1(x[i], s[i * sstride], z[i * sstride], qmin, qmax);
}

/* ---------------------------------------------------------------- dequantize */

T static void avx2_dequant_run_s8(const int8_t *q, int64_t n, const float *s, const int32_t *z,
                                  int64_t sstride, float *out) {
    int64_t i = 0;
    if (sstride == 0) {
        __m256 sv = _mm256_set1_ps(s[0]);
        __m256i zv = _mm256_set1_epi32(z[0]);
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, zv)), sv));
        }
    } else {
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
            __m256i zv = _mm256_loadu_si256((const __m256i *)(z + i));
            __m256 sv = _mm256_loadu_ps(s + i);
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, zv)), sv));
        }
    }
    for (; i < n; i++) out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

T static void avx2_dequant_run_u8(const uint8_t *q, int64_t n, const float *s, const int32_t *z,
                                  int64_t sstride, float *out) {
    int64_t i = 0;
    if (sstride == 0) {
        __m256 sv = _mm256_set1_ps(s[0]);
        __m256i zv = _mm256_set1_epi32(z[0]);
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, zv)), sv));
        }
    } else {
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
            __m256i zv = _mm256_loadu_si256((const __m256i *)(z + i));
            __m256 sv = _mm256_loadu_ps(s + i);
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v, zv)), sv));
        }
    }
    for (; i < n; i++) out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

/* ---------------------------------------------------------------- masks */

T static void avx2_absgt_mask(const float *w, int64_t n, float thr, uint8_t *mask) {
    __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 t = _mm256_set1_ps(thr);
    __m256i one = _mm256_set1_epi8(1);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 a = _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(w + i), absm), t, _CMP_GT_OQ);
        __m256 b = _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(w + i + 8), absm), t, _CMP_GT_OQ);
        __m256 c = _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(w + i + 16), absm), t, _CMP_GT_OQ);
        __m256 d = _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(w + i + 24), absm), t, _CMP_GT_OQ);
        __m256i ab = _mm256_packs_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b));
        __m256i cd = _mm256_packs_epi32(_mm256_castps_si256(c), _mm256_castps_si256(d));
        __m256i r = _mm256_packs_epi16(ab, cd);
        r = _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(mask + i), _mm256_and_si256(r, one));
    }
    for (; i < n; i++) mask[i] = fabsf(w[i]) > thr;
}

T void fw_avx2_apply_mask(const float *w, const uint8_t *mask, int64_t n, float *out) {
    __m256i zero = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mask + i)));
        __m256 drop = _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, zero));
        _mm256_storeu_ps(out + i, _mm256_andnot_ps(drop, _mm256_loadu_ps(w + i)));
    }
    for (; i < n; i++) out[i] = mask[i] ? w[i] : 0.0f;
}

/* ---------------------------------------------------------------- histogram */

/* 16 values per step; the two halves' bin indices leave the vector register as 64-bit pairs
 * (no round trip through memory) and go to 4 counter copies, so consecutive increments of a hot
 * bin land in different copies. After the clamp t >= 0, so truncation is floor. */
T static inline void avx2_hist_add8(__m256i idx, uint32_t *c0, uint32_t *c1, uint32_t *c2,
                                    uint32_t *c3) {
    __m128i l = _mm256_castsi256_si128(idx), h = _mm256_extracti128_si256(idx, 1);
    uint64_t a0 = (uint64_t)_mm_cvtsi128_si64(l), a1 = (uint64_t)_mm_extract_epi64(l, 1);
    uint64_t a2 = (uint64_t)_mm_cvtsi128_si64(h), a3 = (uint64_t)_mm_extract_epi64(h, 1);
    c0[(uint32_t)a0]++;
    c1[a0 >> 32]++;
    c2[(uint32_t)a1]++;
    c3[a1 >> 32]++;
    c0[(uint32_t)a2]++;
    c1[a2 >> 32]++;
    c2[(uint32_t)a3]++;
    c3[a3 >> 32]++;
}

T void fw_avx2_hist_accum(const float *x, int64_t n, float lo, float scale, float maxbin,
                           uint32_t *counts, int64_t stride) {
    uint32_t *c0 = counts, *c1 = counts + stride, *c2 = counts + 2 * stride, *c3 = counts + 3 * stride;
    __m256 lov = _mm256_set1_ps(lo), sc = _mm256_set1_ps(scale), mb = _mm256_set1_ps(maxbin);
    __m256 zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 ta = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), lov), sc);
        __m256 tb = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), lov), sc);
        /* ORD(ta, tb) lane j: neither element j nor j + 8 is NaN */
        int ord = _mm256_movemask_ps(_mm256_cmp_ps(ta, tb, _CMP_ORD_Q));
        __m256i ia = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(ta, zero), mb));
        __m256i ib = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(tb, zero), mb));
        if (ord == 0xFF) {
            avx2_hist_add8(ia, c0, c1, c2, c3);
            avx2_hist_add8(ib, c0, c1, c2, c3);
        } else {
            int32_t idx[16];
            _mm256_storeu_si256((__m256i *)idx, ia);
            _mm256_storeu_si256((__m256i *)(idx + 8), ib);
            int oa = _mm256_movemask_ps(_mm256_cmp_ps(ta, ta, _CMP_ORD_Q));
            int ob = _mm256_movemask_ps(_mm256_cmp_ps(tb, tb, _CMP_ORD_Q));
            int ok = oa | ob << 8;
            for (int j = 0; j < 16; j++)
                if (ok >> j & 1) counts[(j & 3) * stride + idx[j]]++;
        }
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

T double fw_avx2_run_sum(const float *x, int64_t n, int p) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    int64_t j = 0;
    if (p == 1) {
        for (; j + 8 <= n; j += 8) {
            __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + j), absm);
            a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
            a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
        }
    } else {
        for (; j + 8 <= n; j += 8) {
            __m256 v = _mm256_loadu_ps(x + j);
            __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            a0 = _mm256_fmadd_pd(lo, lo, a0); /* the product is exact in double */
            a1 = _mm256_fmadd_pd(hi, hi, a1);
        }
    }
    double l[8];
    _mm256_storeu_pd(l, a0);
    _mm256_storeu_pd(l + 4, a1);
    for (; j < n; j++) {
        double v = (double)x[j];
        l[j & 7] += p == 1 ? fabs(v) : v * v;
    }
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

T void fw_avx2_col_accum(const float *x, int64_t n, int p, double *acc) {
    __m256d absm = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll));
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + j));
        __m256d a = _mm256_loadu_pd(acc + j);
        a = p == 1 ? _mm256_add_pd(a, _mm256_and_pd(v, absm)) : _mm256_fmadd_pd(v, v, a);
        _mm256_storeu_pd(acc + j, a);
    }
    for (; j < n; j++) {
        double v = (double)x[j];
        acc[j] += p == 1 ? fabs(v) : v * v;
    }
}

/* ---------------------------------------------------------------- GPTQ rank-k update */

/* 4 rows x 24 columns of W in 12 registers, kb rank-1 steps in order: u (24 floats of U's row k,
 * packed) and the 4 rows' e[k] (packed side by side: ep[4k + a]). */
T static inline void avx2_rank_tile4x24(float *w0, int64_t ldw, const float *ep, const float *us,
                                        int64_t kb) {
    __m256 c00 = _mm256_loadu_ps(w0), c01 = _mm256_loadu_ps(w0 + 8), c02 = _mm256_loadu_ps(w0 + 16);
    __m256 c10 = _mm256_loadu_ps(w0 + ldw), c11 = _mm256_loadu_ps(w0 + ldw + 8),
           c12 = _mm256_loadu_ps(w0 + ldw + 16);
    __m256 c20 = _mm256_loadu_ps(w0 + 2 * ldw), c21 = _mm256_loadu_ps(w0 + 2 * ldw + 8),
           c22 = _mm256_loadu_ps(w0 + 2 * ldw + 16);
    __m256 c30 = _mm256_loadu_ps(w0 + 3 * ldw), c31 = _mm256_loadu_ps(w0 + 3 * ldw + 8),
           c32 = _mm256_loadu_ps(w0 + 3 * ldw + 16);
    for (int64_t k = 0; k < kb; k++, ep += 4, us += 24) {
        __m256 u0 = _mm256_loadu_ps(us), u1 = _mm256_loadu_ps(us + 8), u2 = _mm256_loadu_ps(us + 16);
        __m256 e = _mm256_broadcast_ss(ep);
        c00 = _mm256_fmadd_ps(e, u0, c00);
        c01 = _mm256_fmadd_ps(e, u1, c01);
        c02 = _mm256_fmadd_ps(e, u2, c02);
        e = _mm256_broadcast_ss(ep + 1);
        c10 = _mm256_fmadd_ps(e, u0, c10);
        c11 = _mm256_fmadd_ps(e, u1, c11);
        c12 = _mm256_fmadd_ps(e, u2, c12);
        e = _mm256_broadcast_ss(ep + 2);
        c20 = _mm256_fmadd_ps(e, u0, c20);
        c21 = _mm256_fmadd_ps(e, u1, c21);
        c22 = _mm256_fmadd_ps(e, u2, c22);
        e = _mm256_broadcast_ss(ep + 3);
        c30 = _mm256_fmadd_ps(e, u0, c30);
        c31 = _mm256_fmadd_ps(e, u1, c31);
        c32 = _mm256_fmadd_ps(e, u2, c32);
    }
    _mm256_storeu_ps(w0, c00);
    _mm256_storeu_ps(w0 + 8, c01);
    _mm256_storeu_ps(w0 + 16, c02);
    _mm256_storeu_ps(w0 + ldw, c10);
    _mm256_storeu_ps(w0 + ldw + 8, c11);
    _mm256_storeu_ps(w0 + ldw + 16, c12);
    _mm256_storeu_ps(w0 + 2 * ldw, c20);
    _mm256_storeu_ps(w0 + 2 * ldw + 8, c21);
    _mm256_storeu_ps(w0 + 2 * ldw + 16, c22);
    _mm256_storeu_ps(w0 + 3 * ldw, c30);
    _mm256_storeu_ps(w0 + 3 * ldw + 8, c31);
    _mm256_storeu_ps(w0 + 3 * ldw + 16, c32);
}

#define FW_RANK_EBUF 8192 /* floats of packed E kept on the stack (32 KB) */
#define FW_RANK_JB 8        /* 24-column strips per block of packed U (8 x 128 x 24 floats: 96 KB) */

T static void avx2_rank_update(float *W, int64_t ldw, const float *E, int64_t lde, const float *U,
                               int64_t ldu, int64_t rows, int64_t kb, int64_t ncols) {
    /* Blocked like a GEMM micro-kernel: U is packed in strips of [kb x 24] (FW_RANK_JB strips at
     * a time, so each 4-row group of W is walked along contiguous runs of FW_RANK_JB * 24
     * columns) and E 4 rows side by side per k, so the inner loop runs on one pointer each; every
     * W element still receives its kb fused multiply-adds in k order. */
    float ebuf[FW_RANK_EBUF];
    int64_t rg = rows & ~(int64_t)3;
    float *up = NULL, *ep = NULL;
    if (ncols >= 24 && kb > 0) {
        up = (float *)malloc((size_t)kb * 24 * FW_RANK_JB * sizeof(float));
        size_t ne = (size_t)rg * (size_t)kb;
        ep = ne <= FW_RANK_EBUF ? ebuf : (float *)malloc(ne * sizeof(float));
        if (!up || !ep) { /* no memory: the unpacked loops below */
            free(up);
            if (ep && ep != ebuf) free(ep);
            up = ep = NULL;
        }
    }
    int64_t j = 0;
    if (up) {
        for (int64_t g = 0; g < rg; g += 4)
            for (int64_t k = 0; k < kb; k++)
                for (int a = 0; a < 4; a++) ep[(g * kb) + 4 * k + a] = E[(g + a) * lde + k];
        while (j + 24 <= ncols) {
            int64_t ns = (ncols - j) / 24;
            if (ns > FW_RANK_JB) ns = FW_RANK_JB;
            for (int64_t t = 0; t < ns; t++)
                for (int64_t k = 0; k < kb; k++)
                    memcpy(up + (t * kb + k) * 24, U + k * ldu + j + 24 * t, 24 * sizeof(float));
            for (int64_t g = 0; g < rg; g += 4)
                for (int64_t t = 0; t < ns; t++)
                    avx2_rank_tile4x24(W + g * ldw + j + 24 * t, ldw, ep + g * kb, up + t * kb * 24,
                                       kb);
            for (int64_t r = rg; r < rows; r++)
                for (int64_t t = 0; t < ns; t++) {
                    float *w0 = W + r * ldw + j + 24 * t;
                    __m256 c0 = _mm256_loadu_ps(w0), c1 = _mm256_loadu_ps(w0 + 8),
                           c2 = _mm256_loadu_ps(w0 + 16);
                    for (int64_t k = 0; k < kb; k++) {
                        const float *u = up + (t * kb + k) * 24;
                        __m256 ev = _mm256_set1_ps(E[r * lde + k]);
                        c0 = _mm256_fmadd_ps(ev, _mm256_loadu_ps(u), c0);
                        c1 = _mm256_fmadd_ps(ev, _mm256_loadu_ps(u + 8), c1);
                        c2 = _mm256_fmadd_ps(ev, _mm256_loadu_ps(u + 16), c2);
                    }
                    _mm256_storeu_ps(w0, c0);
                    _mm256_storeu_ps(w0 + 8, c1);
                    _mm256_storeu_ps(w0 + 16, c2);
                }
            j += 24 * ns;
        }
        free(up);
        if (ep != ebuf) free(ep);
    }
    for (; j + 8 <= ncols; j += 8) {
        int64_t r0 = 0;
        for (; r0 + 4 <= rows; r0 += 4) {
            float *w0 = W + r0 * ldw + j;
            __m256 c[4];
            for (int a = 0; a < 4; a++) c[a] = _mm256_loadu_ps(w0 + a * ldw);
            const float *e = E + r0 * lde;
            for (int64_t k = 0; k < kb; k++) {
                __m256 u0 = _mm256_loadu_ps(U + k * ldu + j);
                for (int a = 0; a < 4; a++) c[a] = _mm256_fmadd_ps(_mm256_set1_ps(e[a * lde + k]), u0, c[a]);
            }
            for (int a = 0; a < 4; a++) _mm256_storeu_ps(w0 + a * ldw, c[a]);
        }
        for (int64_t r = r0; r < rows; r++) {
            float *w0 = W + r * ldw + j;
            __m256 c0 = _mm256_loadu_ps(w0);
            for (int64_t k = 0; k < kb; k++)
                c0 = _mm256_fmadd_ps(_mm256_set1_ps(E[r * lde + k]), _mm256_loadu_ps(U + k * ldu + j), c0);
            _mm256_storeu_ps(w0, c0);
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
}

/* ---------------------------------------------------------------- selection bracket */

T static void avx2_bracket(const float *x, int64_t n, uint32_t lo, uint32_t span, int64_t *below,
                           uint32_t *buf, int64_t *nb, int64_t cap, int *overflow) {
    /* |x| bits are < 2^31, so signed 32-bit compares order them */
    __m256i absm = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i lov = _mm256_set1_epi32((int32_t)lo), hiv = _mm256_set1_epi32((int32_t)(lo + span));
    int64_t cnt = 0, m = *nb, i = 0;
    while (i + 32 <= n) {
        __m256i acc = _mm256_setzero_si256();
        int64_t stop = i + ((int64_t)1 << 26) < n ? i + ((int64_t)1 << 26) : n; /* lane counters */
        for (; i + 32 <= stop; i += 32) {
            __m256i a0 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), absm);
            __m256i a1 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i + 8)), absm);
            __m256i a2 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i + 16)), absm);
            __m256i a3 = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i + 24)), absm);
            __m256i b0 = _mm256_cmpgt_epi32(lov, a0), b1 = _mm256_cmpgt_epi32(lov, a1);
            __m256i b2 = _mm256_cmpgt_epi32(lov, a2), b3 = _mm256_cmpgt_epi32(lov, a3);
            acc = _mm256_sub_epi32(acc, _mm256_add_epi32(_mm256_add_epi32(b0, b1), _mm256_add_epi32(b2, b3)));
            /* outside = below lo or above hi */
            __m256i o0 = _mm256_or_si256(b0, _mm256_cmpgt_epi32(a0, hiv));
            __m256i o1 = _mm256_or_si256(b1, _mm256_cmpgt_epi32(a1, hiv));
            __m256i o2 = _mm256_or_si256(b2, _mm256_cmpgt_epi32(a2, hiv));
            __m256i o3 = _mm256_or_si256(b3, _mm256_cmpgt_epi32(a3, hiv));
            __m256i all = _mm256_and_si256(_mm256_and_si256(o0, o1), _mm256_and_si256(o2, o3));
            if (_mm256_movemask_epi8(all) != -1) {
                uint32_t in = (uint32_t)(~_mm256_movemask_ps(_mm256_castsi256_ps(o0)) & 0xFF) |
                              (uint32_t)(~_mm256_movemask_ps(_mm256_castsi256_ps(o1)) & 0xFF) << 8 |
                              (uint32_t)(~_mm256_movemask_ps(_mm256_castsi256_ps(o2)) & 0xFF) << 16 |
                              (uint32_t)(~_mm256_movemask_ps(_mm256_castsi256_ps(o3)) & 0xFF) << 24;
                while (in) { /* in index order */
                    int j = __builtin_ctz(in);
                    in &= in - 1;
                    if (m < cap)
                        buf[m++] = fw_f2u(x[i + j]) & 0x7FFFFFFFu;
                    else
                        *overflow = 1;
                }
            }
        }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, acc);
        for (int j = 0; j < 8; j++) cnt += (uint32_t)lanes[j];
    }
    fw_bracket_scalar(x, i, n, lo, span, &cnt, buf, &m, cap, overflow);
    *below += cnt;
    *nb = m;
}

const fw_ops fw_ops_avx2 = {
    "avx2",
    avx2_quant_run,
    avx2_dequant_run_s8,
    avx2_dequant_run_u8,
    avx2_absgt_mask,
    fw_avx2_apply_mask,
    fw_avx2_hist_accum,
    fw_avx2_run_sum,
    fw_avx2_col_accum,
    avx2_rank_update,
    avx2_bracket,
    NULL, /* absgt_mask_nt */
    0,    /* mask_one_stream */
};

#endif
