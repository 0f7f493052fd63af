/* AVX-512 (F/BW/DQ/VL) primitives (x86-64): quantize / dequantize / magnitude mask (twice the
 * lanes per instruction) and the GPTQ / SparseGPT rank-k update (the compute-bound loop). Same
 * per-element operations and order as ref.c. The avx512 table at the end reuses the AVX2
 * primitives for the rest. */
#include "fw_internal.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FW_NO_SIMD)
#include <immintrin.h>

#define T __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

T static inline __m512 q16(__m512 x, __m512 s, __m512 zf, __m512 lo, __m512 hi) {
    __m512 v = _mm512_div_ps(x, s);
    __mmask16 ord = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
    __m512 r = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zf);
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    return _mm512_mask_blend_ps(ord, zf, r); /* NaN -> zero point */
}

T void fw_avx512_quant_run(const float *x, int64_t n, const float *s, const int32_t *z,
                           int64_t sstride, float qmin, float qmax, uint8_t *out) {
    __m512 lo = _mm512_set1_ps(qmin), hi = _mm512_set1_ps(qmax);
    int64_t i = 0;
    if (sstride == 0) {
        __m512 sv = _mm512_set1_ps(s[0]), zf = _mm512_set1_ps((float)z[0]);
        for (; i + 32 <= n; i += 32) {
            __m512 a = q16(_mm512_loadu_ps(x + i), sv, zf, lo, hi);
            __m512 b = q16(_mm512_loadu_ps(x + i + 16), sv, zf, lo, hi);
            /* codes are integral and within a byte: truncating narrow keeps the low byte */
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
            _mm_storeu_si128((__m128i *)(out + i + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(b)));
        }
    } else {
        for (; i + 16 <= n; i += 16) {
            __m512 sv = _mm512_loadu_ps(s + i);
            __m512 zf = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(z + i)));
            __m512 a = q16(_mm512_loadu_ps(x + i), sv, zf, lo, hi);
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
        }
    }
    for (; i < n; i++) out[i] = fw_quant1(x[i], s[i * sstride], z[i * sstride], qmin, qmax);
}

T void fw_avx512_dequant_run_s8(const int8_t *q, int64_t n, const float *s, const int32_t *z,
                                int64_t sstride, float *out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i)));
        __m512i zv = sstride ? _mm512_loadu_si512((const void *)(z + i)) : _mm512_set1_epi32(z[0]);
        __m512 sv = sstride ? _mm512_loadu_ps(s + i) : _mm512_set1_ps(s[0]);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, zv)), sv));
    }
    for (; i < n; i++) out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

T void fw_avx512_dequant_run_u8(const uint8_t *q, int64_t n, const float *s, const int32_t *z,
                                int64_t sstride, float *out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i)));
        __m512i zv = sstride ? _mm512_loadu_si512((const void *)(z + i)) : _mm512_set1_epi32(z[0]);
        __m512 sv = sstride ? _mm512_loadu_ps(s + i) : _mm512_set1_ps(s[0]);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, zv)), sv));
    }
    for (; i < n; i++) out[i] = (float)((int32_t)q[i] - z[i * sstride]) * s[i * sstride];
}

/* Loads from 64-byte aligned addresses (a scalar head up to the first aligned float), 64 floats
 * per step, their four compare masks joined into one 64-bit mask and stored as 64 bytes. numpy's
 * large arrays start 16 bytes past a page, so every unaligned 64-byte load spans two cache lines:
 * on the AVX-512 machine (Zen 5 EPYC, 16M floats at that offset, one thread, one stream) this
 * measured 1.87-1.97 ms against 2.15-2.22 ms for unaligned loads and 32-byte stores. */
T void fw_avx512_absgt_mask(const float *w, int64_t n, float thr, uint8_t *mask) {
    __m512 t = _mm512_set1_ps(thr);
    int64_t i = 0;
    for (; i < n && ((uintptr_t)(w + i) & 63); i++) mask[i] = fabsf(w[i]) > thr;
    __m512i one = _mm512_set1_epi8(1);
    for (; i + 64 <= n; i += 64) {
        __mmask16 a = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + i)), t, _CMP_GT_OQ);
        __mmask16 b = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + i + 16)), t, _CMP_GT_OQ);
        __mmask16 c = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + i + 32)), t, _CMP_GT_OQ);
        __mmask16 d = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + i + 48)), t, _CMP_GT_OQ);
        __mmask64 k = _mm512_kunpackd(_mm512_kunpackw(d, c), _mm512_kunpackw(b, a));
        _mm512_storeu_si512((void *)(mask + i), _mm512_maskz_mov_epi8(k, one));
    }
    for (; i + 16 <= n; i += 16) {
        __mmask16 a = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + i)), t, _CMP_GT_OQ);
        _mm_storeu_si128((__m128i *)(mask + i), _mm_maskz_set1_epi8(a, 1));
    }
    for (; i < n; i++) mask[i] = fabsf(w[i]) > thr;
}

/* |w| > t for 64 floats at an aligned address, as a 64-bit mask (bit j: w[j]) */
T static inline uint64_t absgt64(const float *w, __m512 t) {
    __mmask16 a = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w)), t, _CMP_GT_OQ);
    __mmask16 b = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + 16)), t, _CMP_GT_OQ);
    __mmask16 c = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + 32)), t, _CMP_GT_OQ);
    __mmask16 d = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(w + 48)), t, _CMP_GT_OQ);
    return (uint64_t)_mm512_kunpackd(_mm512_kunpackw(d, c), _mm512_kunpackw(b, a));
}

/* The same mask written with non-temporal stores (no read-for-ownership of the mask's lines),
 * loads still 64-byte aligned: the mask's offset d from a line boundary differs from w's (numpy
 * puts both 16 bytes past a page), so each aligned 64-byte mask line takes the last d bits of one
 * 64-value mask and the first 64 - d of the next. The partial lines at both ends are written with
 * ordinary masked stores (they may share a line with another task's range). */
T void fw_avx512_absgt_mask_nt(const float *w, int64_t n, float thr, uint8_t *mask) {
    int64_t i = 0;
    for (; i < n && ((uintptr_t)(w + i) & 63); i++) mask[i] = fabsf(w[i]) > thr;
    if (n - i < 256) {
        fw_avx512_absgt_mask(w + i, n - i, thr, mask + i);
        return;
    }
    __m512 t = _mm512_set1_ps(thr);
    __m512i one = _mm512_set1_epi8(1);
    unsigned d = (unsigned)((uintptr_t)(mask + i) & 63);
    uint64_t prev = absgt64(w + i, t);
    if (d == 0)
        _mm512_stream_si512((void *)(mask + i), _mm512_maskz_mov_epi8(prev, one));
    else /* values i .. i + 63 - d, up to the next line */
        _mm512_mask_storeu_epi8(mask + i, ~0ull >> d, _mm512_maskz_mov_epi8(prev, one));
    for (i += 64; i + 64 <= n; i += 64) {
        uint64_t k = absgt64(w + i, t);
        uint64_t line = d ? (prev >> (64 - d)) | (k << d) : k; /* values i - d .. i + 63 - d */
        _mm512_stream_si512((void *)(mask + i - d), _mm512_maskz_mov_epi8(line, one));
        prev = k;
    }
    if (d) /* values i - d .. i - 1 */
        _mm512_mask_storeu_epi8(mask + i - d, (1ull << d) - 1,
                                _mm512_maskz_mov_epi8(prev >> (64 - d), one));
    _mm_sfence();
    fw_avx512_absgt_mask(w + i, n - i, thr, mask + i);
}

/* The selection bracket pass (same contract as fw_ops.bracket): 16 values per step, the
 * in-bracket values leave through vpcompressd into a register and one unconditional 64-byte
 * store, m advancing by their count. The AVX2 pass extracts them bit by bit behind a branch that
 * about 40% of its 32-value steps take (a median bracket keeps 1.7% of the values), so it
 * mispredicts. Measured on the AVX-512 machine (Zen 5 EPYC, 16M floats, k = n/2, one thread):
 * the pass 3.9-4.3 ms (AVX2), 3.3 ms (compress behind an `if (in)`), 2.0-2.3 ms branch-free;
 * the whole kth_smallest_abs 5.0-5.3 -> 3.2-3.35 ms. Compress-to-memory (vpcompressd m32) is
 * avoided: microcoded and slow on AMD. */
T __attribute__((target("popcnt"))) void fw_avx512_bracket(const float *x, int64_t n, uint32_t lo,
                                                           uint32_t span, int64_t *below,
                                                           uint32_t *buf, int64_t *nb, int64_t cap,
                                                           int *overflow) {
    __m512i absm = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i lov = _mm512_set1_epi32((int32_t)lo), spv = _mm512_set1_epi32((int32_t)span);
    int64_t cnt = 0, m = *nb, i = 0;
    /* branch-free while 16 more fit: the store is unconditional, m advances by the count */
    for (; i + 16 <= n && m + 16 <= cap; i += 16) {
        __m512i a = _mm512_and_si512(_mm512_loadu_si512((const void *)(x + i)), absm);
        cnt += __builtin_popcount(_mm512_cmplt_epu32_mask(a, lov));
        __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(a, lov), spv); /* a - lo <= span */
        _mm512_storeu_si512((void *)(buf + m), _mm512_maskz_compress_epi32(in, a));
        m += __builtin_popcount(in);
    }
    fw_bracket_scalar(x, i, n, lo, span, &cnt, buf, &m, cap, overflow);
    *below += cnt;
    *nb = m;
}

T void fw_avx512_rank_update(float *W, int64_t ldw, const float *E, int64_t lde, const float *U,
                             int64_t ldu, int64_t rows, int64_t kb, int64_t ncols) {
    /* the U strip [kb x 48] is packed contiguously when several row groups reuse it (rows of U
     * are ldu apart, which would alias in L1) */
    float stackbuf[128 * 48];
    float *pk = NULL;
    if (rows >= 16) pk = kb <= 128 ? stackbuf : (float *)malloc((size_t)kb * 48 * sizeof(float));
    int64_t j = 0;
    for (; j + 48 <= ncols; j += 48) {
        const float *us = U + j;
        int64_t ldp = ldu;
        if (pk) {
            for (int64_t k = 0; k < kb; k++) memcpy(pk + k * 48, U + k * ldu + j, 48 * sizeof(float));
            us = pk;
            ldp = 48;
        }
        int64_t r = 0;
        for (; r + 8 <= rows; r += 8) {
            float *w0 = W + r * ldw + j;
            __m512 c[8][3];
            for (int a = 0; a < 8; a++)
                for (int b = 0; b < 3; b++) c[a][b] = _mm512_loadu_ps(w0 + a * ldw + 16 * b);
            const float *e = E + r * lde;
            for (int64_t k = 0; k < kb; k++) {
                const float *u = us + k * ldp;
                __m512 u0 = _mm512_loadu_ps(u), u1 = _mm512_loadu_ps(u + 16),
                       u2 = _mm512_loadu_ps(u + 32);
                for (int a = 0; a < 8; a++) {
                    __m512 ev = _mm512_set1_ps(e[a * lde + k]);
                    c[a][0] = _mm512_fmadd_ps(ev, u0, c[a][0]);
                    c[a][1] = _mm512_fmadd_ps(ev, u1, c[a][1]);
                    c[a][2] = _mm512_fmadd_ps(ev, u2, c[a][2]);
                }
            }
            for (int a = 0; a < 8; a++)
                for (int b = 0; b < 3; b++) _mm512_storeu_ps(w0 + a * ldw + 16 * b, c[a][b]);
        }
        for (; r < rows; r++) {
            float *w0 = W + r * ldw + j;
            __m512 c0 = _mm512_loadu_ps(w0), c1 = _mm512_loadu_ps(w0 + 16),
                   c2 = _mm512_loadu_ps(w0 + 32);
            for (int64_t k = 0; k < kb; k++) {
                const float *u = us + k * ldp;
                __m512 ev = _mm512_set1_ps(E[r * lde + k]);
                c0 = _mm512_fmadd_ps(ev, _mm512_loadu_ps(u), c0);
                c1 = _mm512_fmadd_ps(ev, _mm512_loadu_ps(u + 16), c1);
                c2 = _mm512_fmadd_ps(ev, _mm512_loadu_ps(u + 32), c2);
            }
            _mm512_storeu_ps(w0, c0);
            _mm512_storeu_ps(w0 + 16, c1);
            _mm512_storeu_ps(w0 + 32, c2);
        }
    }
    for (; j < ncols; j += 16) {
        int64_t left = ncols - j;
        __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        int64_t r = 0;
        for (; r + 8 <= rows; r += 8) {
            float *w0 = W + r * ldw + j;
            __m512 c[8];
            for (int a = 0; a < 8; a++) c[a] = _mm512_maskz_loadu_ps(m, w0 + a * ldw);
            const float *e = E + r * lde;
            for (int64_t k = 0; k < kb; k++) {
                __m512 u0 = _mm512_maskz_loadu_ps(m, U + k * ldu + j);
                for (int a = 0; a < 8; a++)
                    c[a] = _mm512_fmadd_ps(_mm512_set1_ps(e[a * lde + k]), u0, c[a]);
            }
            for (int a = 0; a < 8; a++) _mm512_mask_storeu_ps(w0 + a * ldw, m, c[a]);
        }
        for (; r < rows; r++) {
            float *w0 = W + r * ldw + j;
            __m512 c0 = _mm512_maskz_loadu_ps(m, w0);
            for (int64_t k = 0; k < kb; k++)
                c0 = _mm512_fmadd_ps(_mm512_set1_ps(E[r * lde + k]),
                                     _mm512_maskz_loadu_ps(m, U + k * ldu + j), c0);
            _mm512_mask_storeu_ps(w0, m, c0);
        }
    }
    if (pk && pk != stackbuf) free(pk);
}

/* The avx512 table: AVX-512 quantize / dequantize / mask / rank update / selection bracket
 * (this file), AVX2 for the rest (avx2.c: their cost is in scalar scatter or memory traffic,
 * not lane width); its magnitude mask walks one stream per task and streams large masks
 * (select.c says why). */
const fw_ops fw_ops_avx512 = {
    "avx512",
    fw_avx512_quant_run,
    fw_avx512_dequant_run_s8,
    fw_avx512_dequant_run_u8,
    fw_avx512_absgt_mask,
    fw_avx2_apply_mask,
    fw_avx2_hist_accum,
    fw_avx2_run_sum,
    fw_avx2_col_accum,
    fw_avx512_rank_update,
    fw_avx512_bracket,
    fw_avx512_absgt_mask_nt,
    1,
};

#endif
