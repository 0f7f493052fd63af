/*
 * fw_kernels.h -- Featherweight's C kernel library (public API).
 *
 * Every entry point returns an int status (FW_OK == 0 on success) and, on failure, leaves a
 * message retrievable with fw_last_error() (thread-local). No entry point aborts the process on
 * bad arguments: sizes, ranges and pointers are checked first.
 *
 * Tensor layouts: an N-d C-contiguous tensor seen along one axis is described by
 *   (outer, alen, inner): outer = prod(shape[:axis]), alen = shape[axis], inner = prod(shape[axis+1:]).
 * Quantization parameter layouts (mode):
 *   FW_MODE_TENSOR  one scale / zero point;
 *   FW_MODE_AXIS    alen of them, indexed by the position along the axis;
 *   FW_MODE_BLOCK   outer * ceil(alen / block) * inner of them (ONNX blocked quantization), C order.
 *
 * The section between CDEF-BEGIN and CDEF-END is fed verbatim to cffi's cdef(): plain
 * declarations only there.
 */
#ifndef FW_KERNELS_H
#define FW_KERNELS_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF-BEGIN */
#define FW_ABI_VERSION 3

#define FW_OK 0
#define FW_EINVAL 1
#define FW_ENOMEM 2
#define FW_ERANGE 3
#define FW_EISA 4

#define FW_MODE_TENSOR 0
#define FW_MODE_AXIS 1
#define FW_MODE_BLOCK 2

#define FW_QP_ABSMAX 0
#define FW_QP_MINMAX 1
#define FW_QP_MSE 2

#define FW_INIT_KMEANSPP 0
#define FW_INIT_QUANTILE 1

/* ---- library state ---- */
int fw_abi_version(void);
const char *fw_last_error(void);
const char *fw_isa(void);                 /* "ref", "avx2", "avx512", "neon" */
int fw_set_isa(const char *name);         /* "auto" or one of the above; FW_EISA if unsupported */
int fw_isa_supported(const char *name);   /* 1 if the CPU and OS support it, else 0 */
int fw_get_threads(void);
int fw_set_threads(int n);                /* n <= 0: default (FW_KERNELS_THREADS or all cores) */
int fw_memcpy(void *dst, const void *src, int64_t nbytes);   /* threaded; for the benchmark */
/* min and max over the finite values (+Inf / -Inf when there are none) and their count */
int fw_minmax_finite(const float *x, int64_t n, float *mn, float *mx, int64_t *nfinite);

/* ---- affine quantization (ONNX QuantizeLinear / DequantizeLinear) ----
 * q = clamp(nearbyint(x / s) + z, qmin, qmax); NaN -> z; +-Inf -> qmax / qmin.
 * out is one byte per element (int8 two's complement when qmin < 0, else uint8). */
int fw_quantize(const float *x, int64_t outer, int64_t alen, int64_t inner, int mode, int64_t block,
                const float *scale, const int32_t *zero_point, int32_t qmin, int32_t qmax,
                uint8_t *out);
/* x' = (q - z) * s; q is int8 when q_signed else uint8. */
int fw_dequantize(const uint8_t *q, int q_signed, int64_t outer, int64_t alen, int64_t inner,
                  int mode, int64_t block, const float *scale, const int32_t *zero_point,
                  float *out);
/* ONNX packing: element i at bit (i*bits)%8 of byte (i*bits)/8; bits in {1,2,4,8}.
 * Values must fit: signed in [-2^(bits-1), 2^(bits-1)-1], unsigned in [0, 2^bits-1] (FW_ERANGE). */
int fw_pack(const uint8_t *q, int q_signed, int64_t n, int bits, uint8_t *out, int64_t out_len);
int fw_unpack(const uint8_t *packed, int64_t nbytes, int bits, int out_signed, int64_t count,
              uint8_t *out);
/* scale / zero point per slice; method FW_QP_*; non-finite x ignored; empty / all-zero slice: s=1. */
int fw_choose_qparams(const float *x, int64_t outer, int64_t alen, int64_t inner, int mode,
                      int64_t block, int32_t qmin, int32_t qmax, int symmetric, int method,
                      float *scale, int32_t *zero_point);

/* ---- sign quantization ----
 * signs[i] = w[i] < 0 ? -1 : +1 (0, -0 and NaN -> +1); alpha[a] = mean |w| over the slice a. */
int fw_sign_quantize(const float *w, int64_t outer, int64_t alen, int64_t inner, int8_t *signs,
                     float *alpha);
/* one bit per sign, LSB first: bit 1 = +1, bit 0 = -1. */
int fw_pack_signs(const int8_t *signs, int64_t n, uint8_t *out, int64_t out_len);
int fw_unpack_signs(const uint8_t *packed, int64_t nbytes, int64_t count, int8_t *out);

/* ---- selection and masks ---- */
/* k-th smallest |w| (1-based) over the concatenation of narrays arrays; NaN sorts after +Inf. */
int fw_kth_smallest_abs(const float *const *arrays, const int64_t *lengths, int64_t narrays,
                        int64_t k, float *out);
int fw_magnitude_mask(const float *w, int64_t n, float threshold, uint8_t *mask);
int fw_apply_mask(const float *w, const uint8_t *mask, int64_t n, float *out);
/* keep the n largest |w| of every m consecutive elements along the axis (ties: lower index kept,
 * NaN ranks lowest). alen % m == 0, 1 <= n <= m <= 256. */
int fw_nm_mask(const float *w, int64_t outer, int64_t alen, int64_t inner, int n, int m,
               uint8_t *mask);
/* per-slice L1 (p=1) or L2 (p=2) norm; accumulated in double in a fixed order. */
int fw_channel_norms(const float *w, int64_t outer, int64_t alen, int64_t inner, int p,
                     float *out);

/* ---- clustering ---- */
int fw_kmeans1d(const float *x, int64_t n, int k, int init, int iters, uint64_t seed,
                float *centroids, uint8_t *labels);

/* ---- histograms (calibration) ---- */
/* ADDS into counts[bins]: bin = floor((x - lo) * (bins / (hi - lo))) in float32, clamped to the
 * edge bins; NaN skipped. */
int fw_histogram(const float *x, int64_t n, int64_t bins, float lo, float hi, int64_t *counts);
int fw_percentile(const int64_t *counts, int64_t bins, double lo, double hi, double p,
                  double *out);
/* TensorRT-style KL threshold on |x|; the histogram must be over [0, hi] (of |x|) or over
 * [-hi, hi] with an even bin count (folded). */
int fw_entropy_threshold(const int64_t *counts, int64_t bins, double lo, double hi,
                         int num_quant_bins, double *out);

/* ---- GPTQ / SparseGPT column sweeps ----
 * w: [rows, cols] float32, overwritten (working copy); u: [cols, cols] upper Cholesky factor of
 * H^-1 (only the upper triangle is read). */
int fw_gptq_quantize(float *w, int64_t rows, int64_t cols, const float *u, const float *scale,
                     const int32_t *zero_point, int64_t group_size, int32_t qmin, int32_t qmax,
                     int64_t block, uint8_t *q, float *w_hat);
int fw_sparsegpt_prune(float *w, int64_t rows, int64_t cols, const float *u, double sparsity,
                       int n, int m, int64_t block, float *w_hat, uint8_t *mask);
/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* FW_KERNELS_H */
