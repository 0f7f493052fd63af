/* Temporary: entry points not implemented yet. */
#include "fw_internal.h"
#define NI return fw_error(FW_EINVAL, "%s: not implemented yet", __func__)
int fw_sign_quantize(const float *w, int64_t outer, int64_t alen, int64_t inner, int8_t *signs, float *alpha) { NI; }
int fw_pack_signs(const int8_t *signs, int64_t n, uint8_t *out, int64_t out_len) { NI; }
int fw_unpack_signs(const uint8_t *packed, int64_t nbytes, int64_t count, int8_t *out) { NI; }
int fw_kth_smallest_abs(const float *const *arrays, const int64_t *lengths, int64_t narrays, int64_t k, float *out) { NI; }
int fw_magnitude_mask(const float *w, int64_t n, float threshold, uint8_t *mask) { NI; }
int fw_apply_mask(const float *w, const uint8_t *mask, int64_t n, float *out) { NI; }
int fw_nm_mask(const float *w, int64_t outer, int64_t alen, int64_t inner, int n, int m, uint8_t *mask) { NI; }
int fw_channel_norms(const float *w, int64_t outer, int64_t alen, int64_t inner, int p, float *out) { NI; }
int fw_kmeans1d(const float *x, int64_t n, int k, int init, int iters, uint64_t seed, float *centroids, uint8_t *labels) { NI; }
int fw_histogram(const float *x, int64_t n, int64_t bins, float lo, float hi, int64_t *counts) { NI; }
int fw_percentile(const int64_t *counts, int64_t bins, double lo, double hi, double p, double *out) { NI; }
int fw_entropy_threshold(const int64_t *counts, int64_t bins, double lo, double hi, int num_quant_bins, double *out) { NI; }
int fw_gptq_quantize(float *w, int64_t rows, int64_t cols, const float *u, const float *scale, const int32_t *zero_point, int64_t group_size, int32_t qmin, int32_t qmax, int64_t block, uint8_t *q, float *w_hat) { NI; }
int fw_sparsegpt_prune(float *w, int64_t rows, int64_t cols, const float *u, double sparsity, int n, int m, int64_t block, float *w_hat, uint8_t *mask) { NI; }
