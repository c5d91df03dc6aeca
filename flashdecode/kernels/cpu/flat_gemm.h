/* What flat_gemm.c shares with decode_step.c: format ids and traits, scalar conversions, small AVX2
 * helpers, and the products' entry points that run inside an enclosing OpenMP parallel region. */
#ifndef FD_FLAT_GEMM_H
#define FD_FLAT_GEMM_H
#define _GNU_SOURCE /* sched_yield */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define FD_Q4_0 0
#define FD_Q4_1 1
#define FD_Q8_0 2
#define FD_BF16 3
#define FD_Q4_K 4
#define FD_Q5_K 5
#define FD_Q6_K 6
#define FD_Q2_K 7
#define FD_LAST FD_Q2_K
/* Q5_0 from a GGUF file in the rows-interleaved int8 layout only (fd_linear_i8): Q5_K's values with
 * the file's fp16 scale per 32 and the min -16 d implied, so a step reads the file's 5.5 bits per
 * weight rather than Q5_K's planes' 7 */
#define FD_Q5_0_I8 8
/* Q6_K and Q4_K in the rows-interleaved int8 layout only, with the file's two-level scales (an
 * integer sub-scale per 16 or 32 times an fp16 per 256) rather than their fp32 products, so a step
 * reads about the file's bytes per weight (flat_gemm.c, "rows interleaved") */
#define FD_Q6_K_I8 9
#define FD_Q4_K_I8 10
#define FD_LAST_I8 FD_Q4_K_I8
#define PF_BYTES 8192 /* software prefetch distance in a weight plane */

/* format traits: every branch on them folds away where the format is a compile-time constant */
#define FMT_F32_SCALES(f) ((f) >= FD_Q4_K && (f) <= FD_Q2_K)
#define FMT_FIFTH(f) ((f) == FD_Q5_K || (f) == FD_Q5_0_I8) /* values 0..31: a fifth bit plane */
#define FMT_HAS_MIN(f) ((f) == FD_Q4_1 || (f) == FD_Q4_K || (f) == FD_Q5_K || (f) == FD_Q2_K || (f) == FD_Q4_K_I8)
#define FMT_SCALES_PER_BLOCK(f) ((f) == FD_Q6_K || (f) == FD_Q2_K ? 2 : 1)
#define FMT_MINS_PER_BLOCK(f) ((f) == FD_Q2_K ? 2 : 1) /* a min per 16 (Q2_K) or per 32 */
#define FMT_QBYTES(f) ((f) == FD_Q4_0 || (f) == FD_Q4_1 || (f) == FD_Q4_K || (f) == FD_Q2_K ? 16 : 32)

#define INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------- scalar helpers (every build) */

INLINE float fd_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-08f; /* man * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

INLINE float fd_bf2f(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

INLINE uint16_t fd_f2bf(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

INLINE uint16_t fd_f2h(float f) { /* fp32 -> fp16, round to nearest even (F16C's rounding) */
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);            /* NaN */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);           /* rounds to inf */
    if (a < 0x38800000u) {                                             /* subnormal or zero */
        float mag;
        memcpy(&mag, &a, 4);
        return (uint16_t)(sign | (uint32_t)rintf(mag * 16777216.0f)); /* mag / 2^-24, ties to even */
    }
    uint32_t r = a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u;
    return (uint16_t)(sign | (r >> 13));
#endif
}

#if defined(__AVX2__)
INLINE float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float dot_f32(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
#endif

/* ---------------------------------------------------------------- a team of threads in one region
 *
 * Worksharing and barriers of our own inside an OpenMP parallel region: libgomp's barrier sleeps on a
 * futex once its spin count runs out, and the count it picks for a machine whose cores are shared
 * with other processes is short, so a decode step's few hundred barriers each cost a wake-up. Ours
 * spin (with pause), then yield the core, never sleep.
 *
 * A loop over n items gives each thread a contiguous share, claimed chunk by chunk from the front
 * (weight rows stream through one core's prefetchers in order; interleaving the two cores' chunks
 * halved the rate). A thread done with its share claims chunks of the others' next, so one slowed by
 * another process on its core does less, and nobody waits at the barrier for its whole share. */
#define FD_MAX_TEAM 64

typedef struct {
    _Alignas(64) atomic_llong v;
} fd_counter;

typedef struct {
    int n;
    /* each on its own cache line: a thread spinning on one must not slow the others' updates */
    _Alignas(64) atomic_int arrived;
    _Alignas(64) atomic_int sense;
    fd_counter next[2][FD_MAX_TEAM]; /* per loop parity, per share: items claimed so far */
} fd_team;

typedef struct {
    fd_team *team;
    int tid, sense, seq, share; /* share: whose items this thread claims now */
    fd_counter *counters;
} fd_member;

INLINE int fd_team_size(int n) { return n < 1 ? 1 : (n > FD_MAX_TEAM ? FD_MAX_TEAM : n); }

INLINE void fd_team_init(fd_team *t, int n) {
    t->n = fd_team_size(n);
    atomic_init(&t->arrived, 0);
    atomic_init(&t->sense, 0);
    for (int p = 0; p < 2; p++)
        for (int i = 0; i < FD_MAX_TEAM; i++) atomic_init(&t->next[p][i].v, 0);
}

INLINE fd_member fd_member_of(fd_team *t, int tid) {
    fd_member me = {t, tid, 0, 0, tid, NULL};
    return me;
}

/* This thread's membership of ``team`` inside the parallel region that ``team`` was sized for. A
 * region that got another number of threads (one nested in another gets one) runs on its first
 * thread alone, in ``solo``; the others get no team (.team NULL) and must not take part. */
INLINE fd_member fd_join(fd_team *team, fd_team *solo) {
    int got = 1, tid = 0;
#ifdef _OPENMP
    got = omp_get_num_threads();
    tid = omp_get_thread_num();
#endif
    if (got == team->n) return fd_member_of(team, tid);
    fd_member none = {NULL, tid, 0, 0, 0, NULL};
    if (tid != 0) return none;
    fd_team_init(solo, 1);
    return fd_member_of(solo, 0);
}

INLINE void fd_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

INLINE void fd_barrier(fd_member *me) {
    fd_team *t = me->team;
    if (t->n == 1) return;
    const int s = me->sense = !me->sense;
    if (atomic_fetch_add_explicit(&t->arrived, 1, memory_order_acq_rel) == t->n - 1) {
        atomic_store_explicit(&t->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&t->sense, s, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&t->sense, memory_order_acquire) != s; spins++) {
        if (spins < (1 << 14)) fd_pause();
        else sched_yield();
    }
}

/* for (lo, hi) claimed chunk by chunk: fd_loop_begin; while (fd_loop_next(...)) ...; fd_loop_end */
INLINE void fd_loop_begin(fd_member *me) {
    fd_team *t = me->team;
    me->counters = t->next[me->seq & 1];
    me->share = me->tid;
    /* this thread's counter of the next loop: the loop before this one used it, and is over */
    atomic_store_explicit(&t->next[(me->seq + 1) & 1][me->tid].v, 0, memory_order_relaxed);
}

INLINE int fd_loop_next(fd_member *me, int64_t n, int64_t chunk, int64_t *lo, int64_t *hi) {
    const int nt = me->team->n;
    for (int k = 0; k < nt; k++) {
        const int s = me->share;
        const int64_t first = n * s / nt, end = n * (s + 1) / nt;
        const int64_t i = first + atomic_fetch_add_explicit(&me->counters[s].v, chunk, memory_order_relaxed);
        if (i < end) {
            *lo = i;
            *hi = i + chunk < end ? i + chunk : end;
            return 1;
        }
        me->share = s + 1 == nt ? 0 : s + 1; /* this share is done: help with the next */
    }
    return 0;
}

INLINE void fd_loop_end(fd_member *me) { /* every thread waits for the loop's last chunk */
    me->seq++;
    fd_barrier(me);
}

/* chunk size for n items: about eight claims per thread */
INLINE int64_t fd_chunk(const fd_member *me, int64_t n) {
    int64_t c = n / ((int64_t)me->team->n * 8);
    return c < 1 ? 1 : c;
}

/* per-thread scale scratch (floats, for each of db and mb) of the tile functions below */
size_t fd_scale_scratch(int64_t K);
/* activation rows [r0, r1) to int8 per 32-block: xq [M, K], dx and sx [M, K/32] */
void fd_q8_quantize_rows(const float *x, int64_t ldx, int64_t r0, int64_t r1, int64_t K, int8_t *xq, float *dx,
                         float *sx);
int fd_q8_available(void);
/* y (+)= x W^T + bias over every weight tile, shared among the team (every member calls it; it ends
 * in the team's barrier); db, mb: this thread's fd_scale_scratch floats */
void fd_linear_tiles(fd_member *me, int fmt, const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *w,
                     const void *d, const void *m, const float *bias, float *y, int64_t ldy, int add,
                     int64_t N, float *db, float *mb);
void fd_linear_q8_tiles(fd_member *me, int fmt, const int8_t *xq, const float *dx, const float *sx, int64_t M,
                        int64_t K, const uint8_t *w, const void *d, const void *m, const float *bias, float *y,
                        int64_t ldy, int add, int64_t N, float *db, float *mb);
/* the same on weights repacked 16 rows at a time (flat_gemm.c, "rows interleaved") */
void fd_linear_i8_tiles(fd_member *me, int fmt, const int8_t *xq, const float *dx, const float *sx, int64_t M,
                        int64_t K, const uint8_t *qp, const void *dp, const void *mp, const float *bias,
                        float *y, int64_t ldy, int add, int64_t N);
#endif
