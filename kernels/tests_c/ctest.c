/* C test driver for the kernel library: known answers, then every kernel under the reference
 * and under the best SIMD variant of the machine (NEON on aarch64, AVX2/AVX-512 on x86-64) and
 * under 1 and 4 threads, compared bit for bit. Used by kernels/cross_arm.sh under qemu-aarch64.
 * Exit status 0 when everything matches. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fw_kernels.h"

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                                          \
    do {                                                                                          \
        checks++;                                                                                 \
        if (!(cond)) {                                                                            \
            failures++;                                                                           \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                           \
            printf(__VA_ARGS__);                                                                  \
            printf("\n");                                                                         \
        }                                                                                         \
    } while (0)

#define OK(call)                                                                                  \
    do {                                                                                          \
        int rc_ = (call);                                                                         \
        CHECK(rc_ == FW_OK, "%s -> %d (%s)", #call, rc_, fw_last_error());                       \
    } while (0)

static uint64_t rng_state = 0x1234567ull;
static double urand(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * 0x1.0p-53;
}
static float nrand(void) {
    double u = urand() + 1e-12, v = urand();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* ------------------------------------------------------------------ known answers */

static void known_answers(void) {
    float x[10] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 2.5f, 3.5f, -2.5f, 1e30f, -1e30f};
    float s = 1.0f;
    int32_t z = 3;
    uint8_t q[10];
    OK(fw_quantize(x, 1, 1, 10, FW_MODE_TENSOR, 1, &s, &z, -128, 127, q));
    int8_t want[10] = {3, 127, -128, 3, 3, 5, 7, 1, 127, -128};
    CHECK(memcmp(q, want, 10) == 0, "quantize special values");
    /* 0.3f / 0.1f == 3.0f exactly in float32 */
    float x3 = 0.3f, s3 = 0.1f;
    int32_t z0 = 0;
    OK(fw_quantize(&x3, 1, 1, 1, FW_MODE_TENSOR, 1, &s3, &z0, -128, 127, q));
    CHECK((int8_t)q[0] == 3, "float32 division: got %d", (int8_t)q[0]);

    uint8_t v4[3] = {1, 2, 3}, packed[2];
    OK(fw_pack(v4, 0, 3, 4, packed, 2));
    CHECK(packed[0] == 0x21 && packed[1] == 0x03, "int4 packing %02x %02x", packed[0], packed[1]);
    int8_t neg[2] = {-1, 0};
    OK(fw_pack((const uint8_t *)neg, 1, 2, 4, packed, 1));
    CHECK(packed[0] == 0x0F, "signed int4 packing");
    uint8_t un[3];
    OK(fw_unpack(packed, 1, 4, 1, 2, un));
    CHECK((int8_t)un[0] == -1 && un[1] == 0, "unpack sign extension");
    uint8_t bad = 16;
    CHECK(fw_pack(&bad, 0, 1, 4, packed, 1) == FW_ERANGE, "pack range check");

    /* bad arguments return errors with a message, never crash */
    CHECK(fw_quantize(x, 1, 1, 10, 7, 1, &s, &z, -128, 127, q) == FW_EINVAL, "bad mode");
    CHECK(strlen(fw_last_error()) > 0, "error message set");
    CHECK(fw_quantize(x, 1, 1, 10, FW_MODE_TENSOR, 1, &s, &z, 5, 2, q) == FW_EINVAL, "bad range");
    CHECK(fw_histogram(x, 10, 0, 0.0f, 1.0f, NULL) == FW_EINVAL, "bad bins");
    CHECK(fw_kth_smallest_abs(NULL, NULL, 0, 1, &s) == FW_EINVAL, "kth of nothing");
    CHECK(fw_set_isa("no-such-isa") == FW_EISA, "unknown isa");

    float w[8] = {0.1f, -3.0f, 2.0f, 0.5f, 1.0f, 1.0f, 1.0f, 1.0f};
    uint8_t m[8];
    OK(fw_nm_mask(w, 1, 8, 1, 2, 4, m));
    uint8_t wantm[8] = {0, 1, 1, 0, 1, 1, 0, 0};
    CHECK(memcmp(m, wantm, 8) == 0, "2:4 mask");
    const float *arr[1] = {w};
    int64_t len[1] = {8};
    float kth;
    OK(fw_kth_smallest_abs(arr, len, 1, 2, &kth));
    CHECK(kth == 0.5f, "kth smallest: %g", kth);
}

/* ------------------------------------------------------------------ differential run */

typedef struct {
    uint8_t *bytes;
    size_t len;
} blob;

#define NBLOB 64
typedef struct {
    blob b[NBLOB];
    int n;
} results;

static void keep(results *r, const void *p, size_t len) {
    if (r->n >= NBLOB) return;
    r->b[r->n].bytes = (uint8_t *)malloc(len ? len : 1);
    memcpy(r->b[r->n].bytes, p, len);
    r->b[r->n].len = len;
    r->n++;
}

static void free_results(results *r) {
    for (int i = 0; i < r->n; i++) free(r->b[i].bytes);
    r->n = 0;
}

enum { ROWS = 67, COLS = 203 };

static void run_all(results *r, const float *x, const float *fin) {
    const int64_t n = (int64_t)ROWS * COLS;
    uint8_t *q = (uint8_t *)malloc((size_t)n);
    float *d = (float *)malloc((size_t)n * sizeof(float));
    float s[COLS * 2];
    int32_t z[COLS * 2];
    /* per tensor, per axis (both axes), blocked along the last axis */
    struct {
        int64_t o, a, i;
        int mode;
        int64_t blk;
    } lay[5] = {{1, 1, n, FW_MODE_TENSOR, 1},
                {1, ROWS, COLS, FW_MODE_AXIS, 1},
                {ROWS, COLS, 1, FW_MODE_AXIS, 1},
                {ROWS, COLS, 1, FW_MODE_BLOCK, 32},
                {1, ROWS, COLS, FW_MODE_BLOCK, 16}};
    float *sb = (float *)malloc((size_t)n * sizeof(float));
    int32_t *zb = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    for (int L = 0; L < 5; L++) {
        for (int sg = 0; sg < 2; sg++) {
            int32_t qmin = sg ? -8 : 0, qmax = sg ? 7 : 255;
            OK(fw_choose_qparams(fin, lay[L].o, lay[L].a, lay[L].i, lay[L].mode, lay[L].blk, qmin,
                                 qmax, sg, FW_QP_MINMAX, sb, zb));
            OK(fw_quantize(x, lay[L].o, lay[L].a, lay[L].i, lay[L].mode, lay[L].blk, sb, zb, qmin,
                           qmax, q));
            keep(r, q, (size_t)n);
            OK(fw_dequantize(q, sg, lay[L].o, lay[L].a, lay[L].i, lay[L].mode, lay[L].blk, sb, zb,
                             d));
            keep(r, d, (size_t)n * sizeof(float));
        }
    }
    (void)s;
    (void)z;
    const float *arr[1] = {x};
    int64_t len[1] = {n};
    float t;
    OK(fw_kth_smallest_abs(arr, len, 1, n / 3, &t));
    keep(r, &t, sizeof t);
    OK(fw_magnitude_mask(x, n, t, q));
    keep(r, q, (size_t)n);
    OK(fw_apply_mask(x, q, n, d));
    keep(r, d, (size_t)n * sizeof(float));
    int64_t h[301];
    memset(h, 0, sizeof h);
    OK(fw_histogram(x, n, 301, -3.0f, 3.0f, h));
    keep(r, h, sizeof h);
    float nrm[COLS];
    for (int p = 1; p <= 2; p++) {
        OK(fw_channel_norms(x, 1, ROWS, COLS, p, nrm));
        keep(r, nrm, ROWS * sizeof(float));
        OK(fw_channel_norms(x, ROWS, COLS, 1, p, nrm));
        keep(r, nrm, COLS * sizeof(float));
    }
    int8_t *sgn = (int8_t *)malloc((size_t)n);
    OK(fw_sign_quantize(x, 1, ROWS, COLS, sgn, nrm));
    keep(r, sgn, (size_t)n);
    keep(r, nrm, ROWS * sizeof(float));
    OK(fw_nm_mask(x, ROWS, 200, 1, 2, 4, q)); /* first 200 columns viewed as rows of 200 */
    keep(r, q, (size_t)ROWS * 200);
    float cent[16];
    OK(fw_kmeans1d(x, n, 16, FW_INIT_KMEANSPP, 30, 5, cent, q));
    keep(r, cent, sizeof cent);
    keep(r, q, (size_t)n);

    /* GPTQ / SparseGPT on a 67 x 96 problem with a well-conditioned upper factor */
    enum { GC = 96 };
    float *u = (float *)calloc(GC * GC, sizeof(float));
    rng_state = 0xC0FFEEull; /* the same factor on every run */
    for (int i = 0; i < GC; i++) {
        u[i * GC + i] = 0.5f + (float)urand();
        for (int j = i + 1; j < GC; j++) u[i * GC + j] = 0.05f * nrand();
    }
    float *w = (float *)malloc((size_t)ROWS * GC * sizeof(float));
    float *wh = (float *)malloc((size_t)ROWS * GC * sizeof(float));
    float gs[ROWS];
    int32_t gz[ROWS];
    for (int i = 0; i < ROWS; i++) {
        gs[i] = 0.3f;
        gz[i] = 0;
    }
    memcpy(w, fin, (size_t)ROWS * GC * sizeof(float));
    OK(fw_gptq_quantize(w, ROWS, GC, u, gs, gz, 0, -8, 7, 32, q, wh));
    keep(r, q, (size_t)ROWS * GC);
    keep(r, wh, (size_t)ROWS * GC * sizeof(float));
    memcpy(w, fin, (size_t)ROWS * GC * sizeof(float));
    OK(fw_sparsegpt_prune(w, ROWS, GC, u, 0.5, 0, 0, 32, wh, q));
    keep(r, q, (size_t)ROWS * GC);
    keep(r, wh, (size_t)ROWS * GC * sizeof(float));
    memcpy(w, fin, (size_t)ROWS * GC * sizeof(float));
    OK(fw_sparsegpt_prune(w, ROWS, GC, u, 0.0, 2, 4, 32, wh, q));
    keep(r, q, (size_t)ROWS * GC);
    keep(r, wh, (size_t)ROWS * GC * sizeof(float));
    free(u);
    free(w);
    free(wh);
    free(sgn);
    free(sb);
    free(zb);
    free(q);
    free(d);
}

static void compare(const char *what, results *a, results *b) {
    CHECK(a->n == b->n, "%s: result counts %d vs %d", what, a->n, b->n);
    for (int i = 0; i < a->n && i < b->n; i++)
        CHECK(a->b[i].len == b->b[i].len && memcmp(a->b[i].bytes, b->b[i].bytes, a->b[i].len) == 0,
              "%s: result %d differs", what, i);
}

int main(void) {
    known_answers();

    const int64_t n = (int64_t)ROWS * COLS;
    float *x = (float *)malloc((size_t)n * sizeof(float));
    float *fin = (float *)malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        x[i] = 2.0f * nrand();
        fin[i] = x[i];
    }
    for (int64_t i = 0; i < n; i += 97) x[i] = NAN;
    for (int64_t i = 5; i < n; i += 199) x[i] = INFINITY;
    for (int64_t i = 7; i < n; i += 211) x[i] = -INFINITY;
    for (int64_t i = 11; i < n; i += 101) x[i] = -0.0f;

    OK(fw_set_isa("auto"));
    const char *best = fw_isa();
    printf("isa: best=%s threads=%d\n", best, fw_get_threads());

    results ref = {0}, four = {0};
    OK(fw_set_isa("ref"));
    fw_set_threads(1);
    run_all(&ref, x, fin);
    fw_set_threads(4);
    run_all(&four, x, fin);
    compare("ref 1 thread vs ref 4 threads", &ref, &four);
    free_results(&four);
    const char *variants[3] = {"avx2", "avx512", "neon"};
    int tested = 0;
    for (int v = 0; v < 3; v++) {
        if (!fw_isa_supported(variants[v])) continue;
        results one = {0}, many = {0};
        OK(fw_set_isa(variants[v]));
        fw_set_threads(1);
        run_all(&one, x, fin);
        fw_set_threads(4);
        run_all(&many, x, fin);
        char what[64];
        snprintf(what, sizeof what, "ref vs %s (1 thread)", variants[v]);
        compare(what, &ref, &one);
        snprintf(what, sizeof what, "ref vs %s (4 threads)", variants[v]);
        compare(what, &ref, &many);
        free_results(&one);
        free_results(&many);
        printf("ref == %s: checked\n", variants[v]);
        tested++;
    }
    free_results(&ref);
    CHECK(tested > 0 || strcmp(best, "ref") == 0, "no SIMD variant tested");
    free(x);
    free(fin);
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
