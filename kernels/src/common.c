/* Library state: error messages, worker threads, layouts, small shared helpers. */
#define _GNU_SOURCE
#include "fw_internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

/* ---------------------------------------------------------------- errors */

static _Thread_local char fw_errbuf[512];

int fw_error(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fw_errbuf, sizeof fw_errbuf, fmt, ap);
    va_end(ap);
    return code;
}

void fw_clear_error(void) { fw_errbuf[0] = 0; }

const char *fw_last_error(void) { return fw_errbuf; }

int fw_abi_version(void) { return FW_ABI_VERSION; }

/* ---------------------------------------------------------------- threads */

#define FW_MAX_THREADS 256

static int fw_threads_cfg = 0; /* 0: not initialised */

static int fw_default_threads(void) {
    const char *env = getenv("FW_KERNELS_THREADS");
    if (env && *env) {
        char *end = NULL;
        long v = strtol(env, &end, 10);
        if (end && *end == 0 && v >= 1) return v > FW_MAX_THREADS ? FW_MAX_THREADS : (int)v;
    }
    int n = 0;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    return n > FW_MAX_THREADS ? FW_MAX_THREADS : n;
}

int fw_get_threads(void) {
    int t = __atomic_load_n(&fw_threads_cfg, __ATOMIC_RELAXED);
    if (t <= 0) {
        t = fw_default_threads();
        __atomic_store_n(&fw_threads_cfg, t, __ATOMIC_RELAXED);
    }
    return t;
}

int fw_set_threads(int n) {
    if (n <= 0) n = fw_default_threads();
    if (n > FW_MAX_THREADS) n = FW_MAX_THREADS;
    __atomic_store_n(&fw_threads_cfg, n, __ATOMIC_RELAXED);
    return FW_OK;
}

int fw_threads_for(int64_t n, int64_t grain) {
    int t = fw_get_threads();
    if (grain < 1) grain = 1;
    if (n <= grain) return 1;
    int64_t by_work = n / grain;
    if (by_work < t) t = (int)by_work;
    return t < 1 ? 1 : t;
}

typedef struct {
    fw_range_fn fn;
    void *ctx;
    int64_t begin, end;
    int tid;
} fw_job;

static void *fw_job_main(void *arg) {
    fw_job *j = (fw_job *)arg;
    j->fn(j->ctx, j->begin, j->end, j->tid);
    return NULL;
}

void fw_parallel_run(int nt, int64_t n, fw_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (nt <= 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    if (nt > FW_MAX_THREADS) nt = FW_MAX_THREADS;
    fw_job jobs[FW_MAX_THREADS];
    pthread_t th[FW_MAX_THREADS];
    int started[FW_MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        jobs[t].fn = fn;
        jobs[t].ctx = ctx;
        jobs[t].begin = (int64_t)((__int128)n * t / nt);
        jobs[t].end = (int64_t)((__int128)n * (t + 1) / nt);
        jobs[t].tid = t;
        started[t] = 0;
    }
    for (int t = 1; t < nt; t++) {
        if (jobs[t].begin >= jobs[t].end) continue;
        started[t] = pthread_create(&th[t], NULL, fw_job_main, &jobs[t]) == 0;
    }
    fn(ctx, jobs[0].begin, jobs[0].end, 0);
    for (int t = 1; t < nt; t++) {
        if (started[t])
            pthread_join(th[t], NULL);
        else if (jobs[t].begin < jobs[t].end)
            fn(ctx, jobs[t].begin, jobs[t].end, t); /* could not start: run it here */
    }
}

int fw_parallel_for(int64_t n, int64_t grain, fw_range_fn fn, void *ctx) {
    int nt = fw_threads_for(n, grain);
    fw_parallel_run(nt, n, fn, ctx);
    return nt;
}

typedef struct {
    fw_range_fn fn;
    void *ctx;
    int64_t n, piece, next;
} fw_dyn_ctx;

static void fw_dyn_worker(void *vctx, int64_t b, int64_t e, int tid) {
    (void)b;
    (void)e;
    fw_dyn_ctx *d = (fw_dyn_ctx *)vctx;
    for (;;) {
        int64_t s = __atomic_fetch_add(&d->next, d->piece, __ATOMIC_RELAXED);
        if (s >= d->n) return;
        int64_t t = s + d->piece < d->n ? s + d->piece : d->n;
        d->fn(d->ctx, s, t, tid);
    }
}

void fw_parallel_run_dynamic(int nt, int64_t n, fw_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (nt <= 1) {
        fn(ctx, 0, n, 0);
        return;
    }
    int64_t piece = (n / ((int64_t)nt * FW_DYN_PIECES) + 63) & ~(int64_t)63;
    if (piece < 64) piece = 64;
    fw_dyn_ctx d = {fn, ctx, n, piece, 0};
    /* one job per thread (range [t, t + 1)); each loops over the shared pieces */
    fw_parallel_run(nt, nt, fw_dyn_worker, &d);
}

int fw_parallel_for_dynamic(int64_t n, int64_t grain, fw_range_fn fn, void *ctx) {
    int nt = fw_threads_for(n, grain);
    fw_parallel_run_dynamic(nt, n, fn, ctx);
    return nt;
}

void fw_interleaved(int64_t b, int64_t e, int64_t chunk, fw_piece_fn fn, void *ctx) {
    int64_t n = e - b;
    if (n <= 0) return;
    if (n < FW_IL_MIN || chunk < 1) {
        fn(ctx, b, e);
        return;
    }
    int64_t pos[FW_IL_STREAMS], end[FW_IL_STREAMS];
    for (int s = 0; s < FW_IL_STREAMS; s++) {
        /* sub-range starts on a multiple of 64 elements (cache-line aligned for aligned arrays) */
        int64_t st = s == 0 ? b : b + ((n * s / FW_IL_STREAMS) & ~(int64_t)63);
        pos[s] = st;
        if (s) end[s - 1] = st;
    }
    end[FW_IL_STREAMS - 1] = e;
    for (int busy = 1; busy;) {
        busy = 0;
        for (int s = 0; s < FW_IL_STREAMS; s++) {
            int64_t left = end[s] - pos[s];
            if (left <= 0) continue;
            int64_t len = left < chunk ? left : chunk;
            fn(ctx, pos[s], pos[s] + len);
            pos[s] += len;
            busy = 1;
        }
    }
}

/* ---------------------------------------------------------------- layouts */

int fw_mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

int fw_layout_init(fw_layout *L, int64_t outer, int64_t alen, int64_t inner, int mode,
                   int64_t block) {
    int64_t t;
    FW_REQUIRE(outer >= 0 && alen >= 0 && inner >= 0, "negative dimension");
    FW_REQUIRE(fw_mul_ok(outer, alen, &t) && fw_mul_ok(t, inner, &t) && t <= (INT64_MAX >> 2),
               "tensor too large");
    FW_REQUIRE(mode == FW_MODE_TENSOR || mode == FW_MODE_AXIS || mode == FW_MODE_BLOCK,
               "unknown parameter mode %d", mode);
    L->outer = outer;
    L->alen = alen;
    L->inner = inner;
    L->mode = mode;
    L->block = 1;
    L->nblk = alen;
    if (mode == FW_MODE_BLOCK) {
        FW_REQUIRE(block >= 1, "block_size must be >= 1, got %lld", (long long)block);
        L->block = block;
        L->nblk = alen == 0 ? 0 : (alen - 1) / block + 1;
    }
    return FW_OK;
}

int64_t fw_layout_nparams(const fw_layout *L) {
    switch (L->mode) {
    case FW_MODE_TENSOR: return 1;
    case FW_MODE_AXIS: return L->alen;
    default: return L->outer * L->nblk * L->inner;
    }
}

/* ---------------------------------------------------------------- memcpy */

typedef struct {
    char *dst;
    const char *src;
} fw_memcpy_ctx;

static void fw_memcpy_task(void *vctx, int64_t b, int64_t e, int tid) {
    (void)tid;
    fw_memcpy_ctx *c = (fw_memcpy_ctx *)vctx;
    memcpy(c->dst + b, c->src + b, (size_t)(e - b));
}

int fw_memcpy(void *dst, const void *src, int64_t nbytes) {
    FW_REQUIRE(nbytes >= 0, "negative size");
    FW_REQUIRE(nbytes == 0 || (dst && src), "null pointer");
    fw_memcpy_ctx c = {(char *)dst, (const char *)src};
    fw_parallel_for_dynamic(nbytes, 1 << 22, fw_memcpy_task, &c);
    return FW_OK;
}

/* ---------------------------------------------------------------- streaming stores */

/* Non-temporal output stores are off by default: the Python API writes into freshly allocated
 * arrays, whose pages the kernel has just zeroed (so they are in cache), and measured slower
 * with them on. FW_KERNELS_STREAM=1 enables them for outputs of FW_STREAM_MIN_BYTES or more
 * (for callers writing into long-lived buffers), FW_KERNELS_STREAM=all for every size (tests).
 * Read on each call. */
int fw_stream_wanted(int64_t out_bytes) {
    const char *env = getenv("FW_KERNELS_STREAM");
    if (!env || !*env || env[0] == '0') return 0;
    if (strcmp(env, "all") == 0) return 1;
    return out_bytes >= FW_STREAM_MIN_BYTES;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h> /* SSE2: baseline on x86-64 */

void fw_stream_store(void *dst, const void *src, size_t n) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > n) head = n;
    memcpy(d, s, head);
    d += head;
    s += head;
    n -= head;
    for (; n >= 64; n -= 64, d += 64, s += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    memcpy(d, s, n);
}

void fw_stream_fence(void) { _mm_sfence(); }
#else
void fw_stream_store(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
void fw_stream_fence(void) {}
#endif

/* ---------------------------------------------------------------- min / max of finite values */

typedef struct {
    const float *x;
    float mn[FW_MAX_THREADS], mx[FW_MAX_THREADS];
    int64_t cnt[FW_MAX_THREADS];
} fw_minmax_ctx;

static void fw_minmax_task(void *vctx, int64_t b, int64_t e, int tid) {
    fw_minmax_ctx *c = (fw_minmax_ctx *)vctx;
    float mn = INFINITY, mx = -INFINITY;
    int64_t cnt = 0;
    for (int64_t i = b; i < e; i++) {
        float v = c->x[i];
        if (isfinite(v)) {
            cnt++;
            if (v < mn) mn = v;
            if (v > mx) mx = v;
        }
    }
    c->mn[tid] = mn;
    c->mx[tid] = mx;
    c->cnt[tid] = cnt;
}

int fw_minmax_finite(const float *x, int64_t n, float *mn, float *mx, int64_t *nfinite) {
    FW_REQUIRE(n >= 0, "negative size");
    FW_REQUIRE(n == 0 || x, "null pointer");
    fw_minmax_ctx *c = (fw_minmax_ctx *)malloc(sizeof *c);
    if (!c) return fw_error(FW_ENOMEM, "out of memory");
    c->x = x;
    int nt = fw_threads_for(n, 1 << 18);
    for (int t = 0; t < nt; t++) {
        c->mn[t] = INFINITY;
        c->mx[t] = -INFINITY;
        c->cnt[t] = 0;
    }
    fw_parallel_run(nt, n, fw_minmax_task, c);
    float a = INFINITY, b = -INFINITY;
    int64_t cnt = 0;
    for (int t = 0; t < nt; t++) {
        if (c->mn[t] < a) a = c->mn[t];
        if (c->mx[t] > b) b = c->mx[t];
        cnt += c->cnt[t];
    }
    free(c);
    *mn = a;
    *mx = b;
    *nfinite = cnt;
    return FW_OK;
}
