/* AVX-512 (F) primitives (x86-64): the GPTQ / SparseGPT rank-k update, the one compute-bound
 * loop. Same per-element operation order as ref.c (one FMA per k, k ascending). The rest of the
 * avx512 table reuses the AVX2 primitives (see avx2.c). */
#include "fw_internal.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(FW_NO_SIMD)
#include <immintrin.h>

#define T __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

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
                    __m512 ev = _mm512_set1_ps(-e[a * lde + k]);
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
                __m512 ev = _mm512_set1_ps(-E[r * lde + k]);
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
        for (int64_t r = 0; r < rows; r++) {
            float *w0 = W + r * ldw + j;
            __m512 c0 = _mm512_maskz_loadu_ps(m, w0);
            for (int64_t k = 0; k < kb; k++)
                c0 = _mm512_fmadd_ps(_mm512_set1_ps(-E[r * lde + k]),
                                     _mm512_maskz_loadu_ps(m, U + k * ldu + j), c0);
            _mm512_mask_storeu_ps(w0, m, c0);
        }
    }
    if (pk && pk != stackbuf) free(pk);
}

#endif
