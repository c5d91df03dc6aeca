/* Flat GEMM for decoding: y[M, N] = x[M, K] W[N, K]^T (+ bias) for small M, reading each weight byte
 * once with the dequantization fused into the dot products (FlashDecoding++ section 4, on a CPU).
 *
 * Weight formats (flashdecode/ops/quant.py prepares them, byte for byte from the GGUF blocks):
 *   FD_Q4_0  qs [N, K/32, 16] nibbles (element j in the low nibble of byte j, element j+16 in the high
 *            nibble), d [N, K/32] fp16;             w = d * (q - 8)
 *   FD_Q4_1  as Q4_0 plus m [N, K/32] fp16;         w = d * q + m
 *   FD_Q8_0  qs [N, K/32, 32] int8, d [N, K/32] fp16; w = d * q
 *   FD_BF16  qs [N, K] bfloat16 (any K)
 * and GGUF's K-quants, repacked exactly (every value and scale moved, none rounded) with the products
 * d * sc and dmin * m of their two-level scales precomputed in fp32, where they are exact:
 *   FD_Q4_K  qs as Q4_1, d [N, K/32] fp32, m [N, K/32] fp32 (= -dmin * min); w = d * q + m
 *   FD_Q5_K  qs [N, K/32, 32] uint8 (0..31), d and m as Q4_K;              w = d * q + m
 *   FD_Q6_K  qs [N, K/32, 32] int8 (-32..31), d [N, K/16] fp32 (one per 16); w = d * q
 *   FD_Q2_K  qs as Q4_1 (values 0..3), d and m [N, K/16] fp32 (one per 16);  w = d * q + m
 * Every dequantized weight is bit for bit the fp32 number the gguf package's dequantization gives
 * (d * q + m as one fused multiply-add: d * q is exact, so there is one rounding either way; signed
 * zeros included); products are accumulated in fp32.
 *
 * Plain C ABI over data pointers: no Python or torch headers. The same source is compiled once per
 * instruction set (-mavx512f..., -mavx2..., or nothing) and the loader picks the build the CPU runs.
 * Threads: OpenMP. Loaded into a process that already holds torch's libgomp.so.1, the dynamic linker
 * resolves our libgomp.so.1 to that same library, so the kernels share torch's thread pool.
 */
#include "flat_gemm.h"

/* ---------------------------------------------------------------- vector layer, one per ISA */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define FD_ISA "avx512"
#define VL 16
/* register tile: MT activation rows x NR_MAX weight rows = 24 accumulators of the 32 zmm registers */
#define NR_MAX 4
#define MT 6
typedef __m512 vf;
INLINE vf v_zero(void) { return _mm512_setzero_ps(); }
INLINE vf v_load(const float *p) { return _mm512_loadu_ps(p); }
INLINE vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
INLINE float v_sum(vf a) { return _mm512_reduce_add_ps(a); }
INLINE void v_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
/* One 32-element block into 2 vectors. A 4-bit block looks its 16 possible values up in a table built
 * once per block (vpermps reads only the low 4 bits of each index lane, so no masking): fewer
 * instructions per weight than widening and converting every nibble, and the same fp32 values. */
INLINE __m512 iota16(void) { return _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
INLINE void dq_lut4(const uint8_t *q, vf lut0, vf lut1, vf *w) { /* lut0: low nibbles, lut1: high */
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    w[0] = _mm512_permutexvar_ps(idx, lut0);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), lut1);
}
/* elements 0..15 (low nibbles) scaled by d0, m0 and 16..31 (high nibbles) by d1, m1 */
INLINE void dq_q4x2(const uint8_t *q, float d0, float d1, float m0, float m1, vf *w) {
    dq_lut4(q, _mm512_fmadd_ps(iota16(), _mm512_set1_ps(d0), _mm512_set1_ps(m0)),
            _mm512_fmadd_ps(iota16(), _mm512_set1_ps(d1), _mm512_set1_ps(m1)), w);
}
INLINE void dq_q40(const uint8_t *q, float d, vf *w) { /* (q - 8) * d, signed zeros as gguf gives */
    vf lut = _mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f)), _mm512_set1_ps(d));
    dq_lut4(q, lut, lut, w);
}
INLINE void dq_q8x2(const uint8_t *q, float d0, float d1, vf *w) {
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), _mm512_set1_ps(d0));
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), _mm512_set1_ps(d1));
}
INLINE void dq_q8(const uint8_t *q, float d, vf *w) { dq_q8x2(q, d, d, w); }
INLINE void dq_u8(const uint8_t *q, float d, float m, vf *w) {
    vf vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q))), vd, vm);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), vd, vm);
}
INLINE vf ld_bf16(const uint16_t *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
INLINE void cvt_h2f_row(const uint16_t *h, float *f, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + i))));
    for (; i < n; i++) f[i] = fd_h2f(h[i]);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FD_ISA "avx2"
#define VL 8
#define NR_MAX 2
#define MT 3 /* 6 accumulators + 8 dequantized weight vectors of the 16 ymm registers */
typedef __m256 vf;
INLINE vf v_zero(void) { return _mm256_setzero_ps(); }
INLINE vf v_load(const float *p) { return _mm256_loadu_ps(p); }
INLINE vf v_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
INLINE float v_sum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
INLINE void v_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
INLINE void dq_q4x2(const uint8_t *q, float d0, float d1, float m0, float m1, vf *w) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    vf vd0 = _mm256_set1_ps(d0), vm0 = _mm256_set1_ps(m0), vd1 = _mm256_set1_ps(d1), vm1 = _mm256_set1_ps(m1);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd0, vm0);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd0, vm0);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd1, vm1);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd1, vm1);
}
INLINE void dq_q40(const uint8_t *q, float d, vf *w) {
    __m128i b = _mm_loadu_si128((const __m128i *)q), mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    __m128i lo = _mm_sub_epi8(_mm_and_si128(b, mask), eight);
    __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), eight);
    vf vd = _mm256_set1_ps(d);
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), vd);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), vd);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), vd);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), vd);
}
INLINE void dq_q8x2(const uint8_t *q, float d0, float d1, vf *w) {
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i)))),
                             _mm256_set1_ps(i < 2 ? d0 : d1));
}
INLINE void dq_q8(const uint8_t *q, float d, vf *w) { dq_q8x2(q, d, d, w); }
INLINE void dq_u8(const uint8_t *q, float d, float m, vf *w) {
    vf vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i)))), vd, vm);
}
INLINE vf ld_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
INLINE void cvt_h2f_row(const uint16_t *h, float *f, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) f[i] = fd_h2f(h[i]);
}
#else
#define FD_ISA "generic"
#define VL 1
#define NR_MAX 1
#define MT 4
typedef float vf;
INLINE vf v_zero(void) { return 0.0f; }
INLINE vf v_load(const float *p) { return *p; }
INLINE vf v_fma(vf a, vf b, vf c) { return a * b + c; }
INLINE float v_sum(vf a) { return a; }
INLINE void v_store(float *p, vf a) { *p = a; }
INLINE void dq_q4x2(const uint8_t *q, float d0, float d1, float m0, float m1, vf *w) {
    for (int j = 0; j < 16; j++) {
        w[j] = (float)(q[j] & 0x0F) * d0 + m0;
        w[j + 16] = (float)(q[j] >> 4) * d1 + m1;
    }
}
INLINE void dq_q8x2(const uint8_t *q, float d0, float d1, vf *w) {
    for (int j = 0; j < 32; j++) w[j] = (float)(int8_t)q[j] * (j < 16 ? d0 : d1);
}
INLINE void dq_q8(const uint8_t *q, float d, vf *w) { dq_q8x2(q, d, d, w); }
INLINE void dq_u8(const uint8_t *q, float d, float m, vf *w) {
    for (int j = 0; j < 32; j++) w[j] = fmaf((float)q[j], d, m);
}
INLINE void dq_q40(const uint8_t *q, float d, vf *w) {
    for (int j = 0; j < 16; j++) {
        w[j] = (float)((int)(q[j] & 0x0F) - 8) * d;
        w[j + 16] = (float)((int)(q[j] >> 4) - 8) * d;
    }
}
INLINE vf ld_bf16(const uint16_t *p) { return fd_bf2f(*p); }
INLINE void cvt_h2f_row(const uint16_t *h, float *f, int n) {
    for (int i = 0; i < n; i++) f[i] = fd_h2f(h[i]);
}
#endif

#define BV (32 / VL) /* vectors per 32-element block */

INLINE void dq_q4(const uint8_t *q, float d, float m, vf *w) { dq_q4x2(q, d, d, m, m, w); }

/* RUN(F) with the format a compile-time constant, so every branch on it folds away */
#define FOR_FORMAT(fmt, RUN)                                                                        \
    switch (fmt) {                                                                                  \
    case FD_Q4_0: RUN(FD_Q4_0); break;                                                              \
    case FD_Q4_1: RUN(FD_Q4_1); break;                                                              \
    case FD_Q8_0: RUN(FD_Q8_0); break;                                                              \
    case FD_Q4_K: RUN(FD_Q4_K); break;                                                              \
    case FD_Q5_K: RUN(FD_Q5_K); break;                                                              \
    case FD_Q6_K: RUN(FD_Q6_K); break;                                                              \
    case FD_Q2_K: RUN(FD_Q2_K); break;                                                              \
    default: RUN(FD_BF16); break;                                                                   \
    }

/* Weight row `row`'s scales (and minimums) as fp32, into db [nb * FMT_SCALES_PER_BLOCK] and mb
 * [nb * FMT_MINS_PER_BLOCK]. */
INLINE void row_scales(int fmt, const void *d, const void *m, int64_t row, int nb, float *db, float *mb) {
    if (FMT_F32_SCALES(fmt)) {
        const int ns = nb * FMT_SCALES_PER_BLOCK(fmt), nm = nb * FMT_MINS_PER_BLOCK(fmt);
        memcpy(db, (const float *)d + row * ns, sizeof(float) * (size_t)ns);
        if (FMT_HAS_MIN(fmt)) memcpy(mb, (const float *)m + row * nm, sizeof(float) * (size_t)nm);
        return;
    }
    cvt_h2f_row((const uint16_t *)d + row * nb, db, nb);
    if (fmt == FD_Q4_1) cvt_h2f_row((const uint16_t *)m + row * nb, mb, nb);
}

/* Block b of a weight row (q: the row's bytes; db, mb: its scales from row_scales). */
INLINE void dq_block(int fmt, const uint8_t *q, int b, const float *db, const float *mb, vf *w) {
    const uint8_t *qb = q + (int64_t)b * FMT_QBYTES(fmt);
    switch (fmt) {
    case FD_Q4_0: dq_q40(qb, db[b], w); break;
    case FD_Q4_1:
    case FD_Q4_K: dq_q4(qb, db[b], mb[b], w); break;
    case FD_Q5_K: dq_u8(qb, db[b], mb[b], w); break;
    case FD_Q6_K: dq_q8x2(qb, db[2 * b], db[2 * b + 1], w); break;
    case FD_Q2_K: dq_q4x2(qb, db[2 * b], db[2 * b + 1], mb[2 * b], mb[2 * b + 1], w); break;
    default: dq_q8(qb, db[b], w); break;
    }
}

/* A register tile: R (<= MT) activation rows x NR weight rows, dequantizing in registers: every
 * weight block is dequantized once per R rows and read from memory once per pass over M. */
INLINE void tile_fused(const int FMT, const int R, const int NR, const float *x, int64_t ldx, int64_t K,
                       const uint8_t *w, int64_t wstride, const float *db, const float *mb, int nb,
                       float out[MT][NR_MAX]) {
    vf acc[MT][NR_MAX];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = v_zero();
    /* prefetch rows PF_BYTES ahead in the plane (whole rows, at least the next tile's): the hardware
       prefetcher alone falls behind on rows a few hundred bytes long and on row streams that are
       consumed slowly (many activation rows per weight byte) */
    const int64_t pf = (PF_BYTES / wstride > NR ? PF_BYTES / wstride : NR) * wstride;
    if (FMT == FD_BF16) {
        int64_t kv = K - K % VL;
        for (int64_t k = 0; k < kv; k += VL) {
            vf wv[NR_MAX];
            if (k % 32 == 0) /* a cache line per row every 32 values */
                for (int j = 0; j < NR; j++) __builtin_prefetch(w + j * wstride + 2 * k + pf, 0, 3);
            for (int j = 0; j < NR; j++) wv[j] = ld_bf16((const uint16_t *)(w + j * wstride) + k);
            for (int r = 0; r < R; r++) {
                vf xv = v_load(x + r * ldx + k);
                for (int j = 0; j < NR; j++) acc[r][j] = v_fma(wv[j], xv, acc[r][j]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < NR; j++) {
                float s = v_sum(acc[r][j]);
                const uint16_t *wr = (const uint16_t *)(w + j * wstride);
                for (int64_t k = kv; k < K; k++) s += fd_bf2f(wr[k]) * x[r * ldx + k];
                out[r][j] = s;
            }
        return;
    }
    const int qb = FMT_QBYTES(FMT), ns = nb * FMT_SCALES_PER_BLOCK(FMT), nm = nb * FMT_MINS_PER_BLOCK(FMT);
    for (int b = 0; b < nb; b++) {
        vf wv[NR_MAX][BV];
        for (int j = 0; j < NR; j++) __builtin_prefetch(w + j * wstride + (int64_t)b * qb + pf, 0, 3);
        for (int j = 0; j < NR; j++) dq_block(FMT, w + j * wstride, b, db + j * ns, mb + j * nm, wv[j]);
        for (int v = 0; v < BV; v++)
            for (int r = 0; r < R; r++) {
                vf xv = v_load(x + r * ldx + (int64_t)b * 32 + v * VL);
                for (int j = 0; j < NR; j++) acc[r][j] = v_fma(wv[j][v], xv, acc[r][j]);
            }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NR; j++) out[r][j] = v_sum(acc[r][j]);
}

/* Dequantize weight rows [n0, n0 + nr) into dst [nr][K] fp32. */
INLINE void dequant_rows(int fmt, const uint8_t *w, int64_t wstride, const void *d, const void *m,
                         int64_t n0, int nr, int64_t K, float *db, float *mb, float *dst) {
    int nb = (int)(K / 32);
    for (int j = 0; j < nr; j++) {
        const uint8_t *wr = w + (n0 + j) * wstride;
        float *o = dst + j * K;
        if (fmt == FD_BF16) {
            const uint16_t *h = (const uint16_t *)wr;
            int64_t kv = K - K % VL;
            for (int64_t k = 0; k < kv; k += VL) v_store(o + k, ld_bf16(h + k));
            for (int64_t k = kv; k < K; k++) o[k] = fd_bf2f(h[k]);
            continue;
        }
        row_scales(fmt, d, m, n0 + j, nb, db, mb);
        for (int b = 0; b < nb; b++) {
            vf wv[BV];
            dq_block(fmt, wr, b, db, mb, wv);
            for (int v = 0; v < BV; v++) v_store(o + b * 32 + v * VL, wv[v]);
        }
    }
}

/* y[r, n0 + j] = out[r][j] + bias (add: y += that, the residual connection fused into the product) */
#define STORE_TILE(NAME, ROWS, COLS)                                                                \
    INLINE void NAME(float out[ROWS][COLS], int rows, int nr, const float *bias, float *y, int64_t ldy,  \
                     int add, int64_t n0) {                                                         \
        for (int r = 0; r < rows; r++)                                                              \
            for (int j = 0; j < nr; j++) {                                                          \
                float v = out[r][j] + (bias ? bias[n0 + j] : 0.0f);                                 \
                y[r * ldy + n0 + j] = add ? y[r * ldy + n0 + j] + v : v;                            \
            }                                                                                       \
    }
STORE_TILE(store_tile, MT, NR_MAX)

/* One tile of nr (<= NR_MAX) weight rows against all M activation rows, MT rows at a time. */
INLINE void run_tile(const int FMT, const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *w,
                     int64_t wstride, const void *d, const void *m, const float *bias, float *y,
                     int64_t ldy, int add, int64_t n0, int nr, float *db, float *mb) {
    const int nb = (int)(K / 32), ns = nb * FMT_SCALES_PER_BLOCK(FMT), nm = nb * FMT_MINS_PER_BLOCK(FMT);
    const uint8_t *wt = w + n0 * wstride;
    if (FMT != FD_BF16)
        for (int j = 0; j < nr; j++) row_scales(FMT, d, m, n0 + j, nb, db + j * ns, mb + j * nm);
    for (int64_t r0 = 0; r0 < M; r0 += MT) {
        const int rows = (int)(M - r0 < MT ? M - r0 : MT);
        const float *xr = x + r0 * ldx;
        float out[MT][NR_MAX];
/* a row count known at compile time, so that every tile keeps its accumulators in registers */
#define TILE(RV, NRV, WT, DB, MB, O) tile_fused(FMT, (RV) < MT ? (RV) : MT, NRV, xr, ldx, K, WT, wstride, DB, MB, nb, O)
#define TILE_ROWS(NRV, WT, DB, MB, O)                                                               \
    switch (rows) {                                                                                 \
    case 1: TILE(1, NRV, WT, DB, MB, O); break;                                                     \
    case 2: TILE(2, NRV, WT, DB, MB, O); break;                                                     \
    case 3: TILE(3, NRV, WT, DB, MB, O); break;                                                     \
    case 4: TILE(4, NRV, WT, DB, MB, O); break;                                                     \
    case 5: TILE(5, NRV, WT, DB, MB, O); break;                                                     \
    default: TILE(6, NRV, WT, DB, MB, O); break;                                                    \
    }
        if (nr == NR_MAX) {
            TILE_ROWS(NR_MAX, wt, db, mb, out)
        } else {
            for (int j = 0; j < nr; j++) { /* the N tail: one weight row at a time */
                float o1[MT][NR_MAX];
                TILE_ROWS(1, wt + j * wstride, db + j * ns, mb + j * nm, o1)
                for (int r = 0; r < rows; r++) out[r][j] = o1[r][0];
            }
        }
#undef TILE_ROWS
#undef TILE
        store_tile(out, rows, nr, bias, y + r0 * ldy, ldy, add, n0);
    }
}

static int64_t row_bytes(int fmt, int64_t K) {
    switch (fmt) {
    case FD_Q4_0:
    case FD_Q4_1:
    case FD_Q4_K:
    case FD_Q2_K: return K / 2;
    case FD_Q8_0:
    case FD_Q5_K:
    case FD_Q6_K: return K;
    case FD_BF16: return 2 * K;
    }
    return -1;
}

static int pick_threads(int nthreads, int64_t ntiles, double work) {
    int nt = fd_team_size(nthreads);
    if (work < 65536.0) nt = 1; /* fork/join costs more than it saves on tiny products */
    if (nt > ntiles) nt = (int)ntiles;
    return nt < 1 ? 1 : nt;
}

/* Floats of per-thread scale scratch (db, mb each) for rows of K elements. */
size_t fd_scale_scratch(int64_t K) { return (size_t)(2 * (NR_MAX > 4 ? NR_MAX : 4) * (K / 32 > 0 ? K / 32 : 1)); }

/* Every weight tile of one product, shared among a team's threads, so that one parallel region can
   run a whole decoder layer (decode_step.c). */
void fd_linear_tiles(fd_member *me, int fmt, const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *w,
                     const void *d, const void *m, const float *bias, float *y, int64_t ldy, int add,
                     int64_t N, float *db, float *mb) {
    const int64_t wstride = row_bytes(fmt, K), ntiles = (N + NR_MAX - 1) / NR_MAX, chunk = fd_chunk(me, ntiles);
    int64_t lo, hi;
    fd_loop_begin(me);
    while (fd_loop_next(me, ntiles, chunk, &lo, &hi)) for (int64_t tile = lo; tile < hi; tile++) {
        int64_t n0 = tile * NR_MAX;
        int nr = (int)(N - n0 < NR_MAX ? N - n0 : NR_MAX);
#define RUN(F) run_tile(F, x, ldx, M, K, w, wstride, d, m, bias, y, ldy, add, n0, nr, db, mb)
        FOR_FORMAT(fmt, RUN)
#undef RUN
    }
    fd_loop_end(me);
}

static void linear_rows(int fmt, const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *w,
                        const void *d, const void *m, const float *bias, float *y, int64_t ldy, int64_t N,
                        int nthreads) {
    int nt = pick_threads(nthreads, (N + NR_MAX - 1) / NR_MAX, (double)N * (double)K * (double)(M < 8 ? M : 8));
    (void)nt; /* unused without OpenMP */
    fd_team team;
    fd_team_init(&team, nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        fd_team solo;
        fd_member me = fd_join(&team, &solo);
        float db[fd_scale_scratch(K)], mb[fd_scale_scratch(K)]; /* a few KiB: this thread's stack */
        if (me.team) fd_linear_tiles(&me, fmt, x, ldx, M, K, w, d, m, bias, y, ldy, 0, N, db, mb);
    }
}

#define X_PANEL_BYTES (384 * 1024) /* activation rows per pass: their panel stays in a core's L2 */

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) W^T + bias. Returns 0, or -1 on bad arguments.
 * Large M runs in passes of rows whose activations fit in L2: every weight tile sweeps
 * the whole panel, and a panel streamed from L3 for each tile starves the FMAs. */
int fd_linear(int fmt, const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *w,
              const void *d, const void *m, const float *bias, float *y, int64_t ldy, int64_t N,
              int nthreads) {
    if (fmt < 0 || fmt > FD_LAST || M < 0 || N < 0 || K < 0) return -1;
    if (fmt != FD_BF16 && K % 32) return -1;
    if (FMT_HAS_MIN(fmt) && !m) return -1;
    if (M == 0 || N == 0) return 0;
    int64_t fit = X_PANEL_BYTES / (int64_t)(sizeof(float) * (size_t)(K > 0 ? K : 1));
    if (fit < 4 * MT) fit = 4 * MT;
    int64_t passes = (M + fit - 1) / fit, rows = (M + passes - 1) / passes;
    rows = (rows + MT - 1) / MT * MT; /* whole register tiles */
    for (int64_t r0 = 0; r0 < M; r0 += rows) {
        int64_t mr = M - r0 < rows ? M - r0 : rows;
        linear_rows(fmt, x + r0 * ldx, ldx, mr, K, w, d, m, bias, y + r0 * ldy, ldy, N, nthreads);
    }
    return 0;
}

/* Dequantize rows of W: out[i, :] = W[rows[i], :] (rows NULL: every row in order), as fp32 (out_bf16 = 0)
 * or bfloat16 rounded to nearest even (out_bf16 = 1). */
int fd_dequant(int fmt, const uint8_t *w, const void *d, const void *m, int64_t N, int64_t K,
               const int64_t *rows, int64_t nrows, void *out, int out_bf16, int nthreads) {
    if (fmt < 0 || fmt > FD_LAST || K < 0 || nrows < 0) return -1;
    if (fmt != FD_BF16 && K % 32) return -1;
    if (FMT_HAS_MIN(fmt) && !m) return -1;
    if (rows)
        for (int64_t i = 0; i < nrows; i++)
            if (rows[i] < 0 || rows[i] >= N) return -1;
    int64_t wstride = row_bytes(fmt, K);
    int nt = pick_threads(nthreads, nrows, (double)nrows * (double)K);
    (void)nt;
    int nb = (int)(K / 32);
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : failed)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        int64_t i0 = nrows * t / T, i1 = nrows * (t + 1) / T;
        float *db = (float *)malloc(sizeof(float) * (size_t)(2 * nb + 1));
        float *mb = (float *)malloc(sizeof(float) * (size_t)(2 * nb + 1));
        float *tmp = out_bf16 ? (float *)malloc(sizeof(float) * (size_t)(K + VL)) : NULL;
        if (!db || !mb || (out_bf16 && !tmp)) {
            failed = 1;
        } else {
            for (int64_t i = i0; i < i1; i++) {
                int64_t n = rows ? rows[i] : i;
                if (out_bf16) {
                    dequant_rows(fmt, w, wstride, d, m, n, 1, K, db, mb, tmp);
                    uint16_t *o = (uint16_t *)out + i * K;
                    for (int64_t k = 0; k < K; k++) o[k] = fd_f2bf(tmp[k]);
                } else {
                    dequant_rows(fmt, w, wstride, d, m, n, 1, K, db, mb, (float *)out + i * K);
                }
            }
        }
        free(db);
        free(mb);
        free(tmp);
    }
    return failed ? -2 : 0;
}

/* ---------------------------------------------------------------- int8 activations, native planes (AVX2)
 *
 * llama.cpp's way with quantized weights on AVX2: each activation row is rounded to int8 per 32-block
 * (xq = rint(x / dx), dx = max|x| / 127, ties to even) and multiplied with the weights' integers by
 * vpmaddubsw + vpmaddwd: 32 multiply-adds in two instructions and no conversion of any weight to
 * float, where the fp32 path spends a conversion and an FMA per 8 weights. Approximate: the
 * activations are rounded (relative error about 1/254 per element). It reads the native planes as
 * they are, so it runs every integer format; per block b of weight row n and activation row r:
 *
 *     sum_k w[n,k] x[r,k] ~= dw[n,b] dx[r,b] sum_k q[n,k] xq[r,k] + mw[n,b] sx[r,b],  sx = dx sum_k xq
 *
 * with Q4_0's w = d (q - 8) as mw = -8 d, and Q6_K's two scales, one per half block; Q2_K's min per
 * half block multiplies that half's activation sum, taken from xq in the kernel. The 4- and
 * 5-bit integers are unsigned and go straight into vpmaddubsw; signed ones (Q8_0, Q6_K) move their
 * sign onto the activations first (|q| times sign(q) xq). Every pair sum stays within int16. */
#define FMT_SIGNED(f) ((f) == FD_Q8_0 || (f) == FD_Q6_K)
#define FMT_NIBBLES(f) ((f) == FD_Q4_0 || (f) == FD_Q4_1 || (f) == FD_Q4_K || (f) == FD_Q2_K || (f) == FD_Q4_K_I8)
#define FMT_HALVES(f) ((f) == FD_Q6_K || (f) == FD_Q2_K || (f) == FD_Q6_K_I8) /* a scale per 16 elements */

/* One 32-block of activations to int8: q[32], its scale and dx * sum(q). */
INLINE void q8_block(const float *x, int8_t *q, float *dx, float *sx) {
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], a = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    __m256i i[4];
    for (int k = 0; k < 4; k++) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(inv)));
    /* the packs interleave 128-bit lanes; one dword permutation restores element order */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), p), _mm256_set1_epi16(1));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    *dx = d;
    *sx = d * (float)_mm_cvtsi128_si32(s4);
#else
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        int v = (int)rintf(x[j] * inv);
        q[j] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
        sum += q[j];
    }
    *dx = d;
    *sx = d * (float)sum;
#endif
}

/* Activation rows [r0, r1) to int8 per 32-block: xq [M, K], dx and sx [M, K/32]. */
void fd_q8_quantize_rows(const float *x, int64_t ldx, int64_t r0, int64_t r1, int64_t K, int8_t *xq,
                             float *dx, float *sx) {
    const int nb = (int)(K / 32);
    for (int64_t r = r0; r < r1; r++)
        for (int b = 0; b < nb; b++)
            q8_block(x + r * ldx + (int64_t)b * 32, xq + r * K + (int64_t)b * 32, dx + r * nb + b, sx + r * nb + b);
}

#if defined(__AVX2__)
#define FD_HAVE_Q8 1
#define Q8_MR 2 /* register tile: 2 activation rows x 4 weight rows, 8 accumulators of 16 ymm */
#define Q8_NR 4

/* A block's 32 weight integers as bytes in element order. */
INLINE __m256i q8_weights(const int FMT, const uint8_t *qb) {
    if (FMT_NIBBLES(FMT)) {
        __m128i t = _mm_loadu_si128((const __m128i *)qb);
        __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
        return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
    }
    return _mm256_loadu_si256((const __m256i *)qb);
}

/* sum q * xq over a block as 8 fp32 partial sums (lanes 0-3: elements 0-15, lanes 4-7: 16-31). */
INLINE __m256 q8_dot(const int FMT, __m256i w, __m256i x) {
    __m256i p = FMT_SIGNED(FMT) ? _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
                                : _mm256_maddubs_epi16(w, x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

INLINE void q8_tile(const int FMT, const int R, const int NR, const int8_t *xq, const float *dx, const float *sx,
                    int64_t K, const uint8_t *w, int64_t wstride, const float *db, const float *mb, int nb,
                    float out[Q8_MR][Q8_NR]) {
    const int ns = nb * FMT_SCALES_PER_BLOCK(FMT), nm = nb * FMT_MINS_PER_BLOCK(FMT), qb = FMT_QBYTES(FMT);
    const int64_t pf = (PF_BYTES / wstride > NR ? PF_BYTES / wstride : NR) * wstride;
    __m256 acc[Q8_MR][Q8_NR];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i wv[Q8_NR];
        for (int j = 0; j < NR; j++) {
            __builtin_prefetch(w + j * wstride + (int64_t)b * qb + pf, 0, 3);
            wv[j] = q8_weights(FMT, w + j * wstride + (int64_t)b * qb);
        }
        for (int r = 0; r < R; r++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + (int64_t)b * 32));
            const float dxr = dx[r * nb + b];
            /* Q2_K: the activations' sums per 4 (lanes 0-3: elements 0-15), for its mins per 16 */
            const __m256 xs = FMT == FD_Q2_K ? q8_dot(FD_Q4_0, _mm256_set1_epi8(1), xv) : _mm256_setzero_ps();
            for (int j = 0; j < NR; j++) {
                __m256 sc = FMT_HALVES(FMT) ? _mm256_set_m128(_mm_set1_ps(db[j * ns + 2 * b + 1] * dxr),
                                                              _mm_set1_ps(db[j * ns + 2 * b] * dxr))
                                            : _mm256_set1_ps(db[j * ns + b] * dxr);
                acc[r][j] = _mm256_fmadd_ps(q8_dot(FMT, wv[j], xv), sc, acc[r][j]);
                if (FMT == FD_Q2_K)
                    acc[r][j] = _mm256_fmadd_ps(xs, _mm256_set_m128(_mm_set1_ps(mb[j * nm + 2 * b + 1] * dxr),
                                                                    _mm_set1_ps(mb[j * nm + 2 * b] * dxr)), acc[r][j]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NR; j++) {
            float s = hsum256(acc[r][j]);
            if (FMT_HAS_MIN(FMT) && FMT != FD_Q2_K) s += dot_f32(mb + j * nb, sx + r * nb, nb);
            if (FMT == FD_Q4_0) s -= 8.0f * dot_f32(db + j * nb, sx + r * nb, nb);
            out[r][j] = s;
        }
}

STORE_TILE(store_q8_tile, Q8_MR, Q8_NR)

INLINE void q8_run_tile(const int FMT, const int8_t *xq, const float *dx, const float *sx, int64_t M, int64_t K,
                        const uint8_t *w, int64_t wstride, const void *d, const void *m, const float *bias,
                        float *y, int64_t ldy, int add, int64_t n0, int nr, float *db, float *mb) {
    const int nb = (int)(K / 32), ns = nb * FMT_SCALES_PER_BLOCK(FMT), nm = nb * FMT_MINS_PER_BLOCK(FMT);
    const uint8_t *wt = w + n0 * wstride;
    for (int j = 0; j < nr; j++) row_scales(FMT, d, m, n0 + j, nb, db + j * ns, mb + j * nm);
    for (int64_t r0 = 0; r0 < M; r0 += Q8_MR) {
        const int rows = (int)(M - r0 < Q8_MR ? M - r0 : Q8_MR);
        const int8_t *xr = xq + r0 * K;
        const float *dxr = dx + r0 * nb, *sxr = sx + r0 * nb;
        float out[Q8_MR][Q8_NR];
#define Q8_TILE(RV, NRV, WT, DB, MB, O)                                                             \
    if (rows == 1) q8_tile(FMT, 1, NRV, xr, dxr, sxr, K, WT, wstride, DB, MB, nb, O);               \
    else q8_tile(FMT, RV, NRV, xr, dxr, sxr, K, WT, wstride, DB, MB, nb, O);
        if (nr == Q8_NR) {
            Q8_TILE(Q8_MR, Q8_NR, wt, db, mb, out)
        } else {
            for (int j = 0; j < nr; j++) { /* the N tail: one weight row at a time */
                float o1[Q8_MR][Q8_NR];
                Q8_TILE(Q8_MR, 1, wt + j * wstride, db + j * ns, mb + j * nm, o1)
                for (int r = 0; r < rows; r++) out[r][j] = o1[r][0];
            }
        }
#undef Q8_TILE
        store_q8_tile(out, rows, nr, bias, y + r0 * ldy, ldy, add, n0);
    }
}
#endif

/* 1 when fd_linear_q8 runs in this build (AVX2 or better), else 0. */
int fd_q8_available(void) {
#ifdef FD_HAVE_Q8
    return 1;
#else
    return 0;
#endif
}

/* fd_linear_tiles with activations already rounded by q8_quantize_rows (every integer format). */
void fd_linear_q8_tiles(fd_member *me, int fmt, const int8_t *xq, const float *dx, const float *sx, int64_t M,
                        int64_t K, const uint8_t *w, const void *d, const void *m, const float *bias, float *y,
                        int64_t ldy, int add, int64_t N, float *db, float *mb) {
#ifdef FD_HAVE_Q8
    const int64_t wstride = row_bytes(fmt, K), ntiles = (N + Q8_NR - 1) / Q8_NR, chunk = fd_chunk(me, ntiles);
    int64_t lo, hi;
    fd_loop_begin(me);
    while (fd_loop_next(me, ntiles, chunk, &lo, &hi)) for (int64_t tile = lo; tile < hi; tile++) {
        int64_t n0 = tile * Q8_NR;
        int nr = (int)(N - n0 < Q8_NR ? N - n0 : Q8_NR);
#define RUN(F) q8_run_tile(F, xq, dx, sx, M, K, w, wstride, d, m, bias, y, ldy, add, n0, nr, db, mb)
        FOR_FORMAT(fmt, RUN) /* its BF16 case never runs: fd_linear_q8 and the step refuse BF16 */
#undef RUN
    }
    fd_loop_end(me);
#else
    (void)me;
    (void)fmt; (void)xq; (void)dx; (void)sx; (void)M; (void)K; (void)w; (void)d; (void)m; (void)bias;
    (void)y; (void)ldy; (void)add; (void)N; (void)db; (void)mb;
#endif
}

/* y = x W^T (+ bias) with int8 activations, W in its native planes (any integer format). Returns 0,
 * -1 on bad arguments, -2 out of memory, -3 when this build has no AVX2. */
int fd_linear_q8(int fmt, const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *w, const void *d,
                 const void *m, const float *bias, float *y, int64_t ldy, int64_t N, int nthreads) {
    if (!fd_q8_available()) return -3;
    if (fmt < 0 || fmt > FD_LAST || fmt == FD_BF16 || K % 32 || M < 0 || N < 0 || K < 0) return -1;
    if (FMT_HAS_MIN(fmt) && !m) return -1;
    if (M == 0 || N == 0) return 0;
    const int64_t nb = K / 32;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *dx = (float *)malloc(sizeof(float) * (size_t)(M * nb)), *sx = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    const int ok = xq && dx && sx;
    int nt = pick_threads(nthreads, (N + 3) / 4, (double)N * (double)K * (double)(M < 8 ? M : 8) / 4.0);
    (void)nt;
    fd_team team;
    fd_team_init(&team, nt);
#pragma omp parallel num_threads(nt) if (nt > 1 && ok)
    {
        fd_team solo;
        fd_member me = fd_join(&team, &solo);
        float db[fd_scale_scratch(K)], mb[fd_scale_scratch(K)];
        if (me.team && ok) {
            const int n = me.team->n;
            fd_q8_quantize_rows(x, ldx, M * me.tid / n, M * (me.tid + 1) / n, K, xq, dx, sx);
            fd_barrier(&me);
            fd_linear_q8_tiles(&me, fmt, xq, dx, sx, M, K, w, d, m, bias, y, ldy, 0, N, db, mb);
        }
    }
    free(xq);
    free(dx);
    free(sx);
    return ok ? 0 : -2;
}

/* ---------------------------------------------------------------- int8 activations, rows interleaved
 *
 * The int8-activation product on weights repacked so that a vector lane is a weight row (ik_llama.cpp's
 * "R" layouts do the same): each activation byte loaded serves 16 weight rows, no horizontal sum is
 * needed, and a block's integer dot products for 8 or 16 rows finish in one conversion and one FMA.
 * Activations are rounded exactly as in fd_linear_q8 (same results up to fp32 summation order).
 *
 * Layout (kernels/cpu/build.py repack_i8): groups of 16 rows, per (group, block):
 *   Q4_0/Q4_1/Q4_K/Q2_K  4 x 64 bytes: vector i holds, for each of the 16 rows, elements 4i..4i+3 of the
 *                   block in the low nibbles of 4 bytes and elements 4(i+4)..4(i+4)+3 in the high nibbles
 *   Q5_K            the Q4 layout of the low 4 bits, then 64 bytes of fifth bits: for vector i and
 *                   half h (rows 8h..8h+7), 4 bytes for its low-nibble bytes, then 4 for its high-
 *                   nibble bytes, bit k for byte k of that half
 *   Q8_0/Q6_K       8 x 64 bytes: vector j holds elements 4j..4j+3 of each of the 16 rows, a byte each
 *                   (signed values)
 *   Q6_K_I8         values u = q + 32 (0..63): the Q4 layout of their low 4 bits, then 2 x 64 bytes of
 *                   high bits: byte k of vector p holds, in bits 2t..2t+1, the top two bits of the
 *                   value whose low nibble is in byte k of Q4 vector t, its low (p = 0) or high nibble
 *   d               [groups, K/32, S, 16]: fp16 (Q4_0, Q4_1, Q8_0) or fp32 (K-quants, multiplied out);
 *                   S = 2 for Q6_K and Q2_K (a scale per 16 elements), else 1
 *   m               [groups, K/32, S, 16], the same type (formats with a min; S = 2 for Q2_K)
 * (rows padded to a multiple of 16 with zeros). The lean K-quants keep the file's two-level scales, so
 * that a step reads about the file's bytes (Q6_K_I8 0.82 bytes a weight where Q6_K's fp32 scales make
 * 1.25, Q4_K_I8 0.58 for 0.75); their scale factors multiply in fp32 exactly to the planes' scales:
 *   Q6_K_I8  d: int8 [groups, K/32, 2, 16], a sub-scale per 16;   m: fp16 [groups, K/256, 16]
 *   Q4_K_I8  d: uint8 [groups, K/32, 2, 16], sc then the min's mn; m: fp16 [groups, K/256, 2, 16],
 *            d then -dmin (w = d sc q + (-dmin) mn)
 * AVX512-VNNI runs a 64-byte vector of every format but Q2_K as one vpdpbusd; AVX2 runs every format as two 8-row halves with vpmaddubsw + vpmaddwd. */
#define I8_LEAN(f) ((f) == FD_Q6_K_I8 || (f) == FD_Q4_K_I8) /* two-level scales, see the layout */
#define LEAN_SUPERS(f) ((f) == FD_Q4_K_I8 ? 2 : 1)          /* fp16 scales per 256 per row */
#if defined(__AVX2__)
#define FD_HAVE_I8 1
#define I8_MR 4 /* activation rows per register tile */

INLINE __m256i bcast4(const int8_t *p) {
    int32_t quad;
    memcpy(&quad, p, 4);
    return _mm256_set1_epi32(quad);
}

#define I8_BLOCK_BYTES(f) (FMT_NIBBLES(f) ? 256 : FMT_FIFTH(f) ? 320 : (f) == FD_Q6_K_I8 ? 384 : 512)

/* a lean K-quant's sub-scale k (of a block's two) of block b, a byte per row of the group, and the
 * fp16 scale per row of its super-block (Q4_K_I8: k = 0 the scale's, 1 the min's) */
#define LEAN_SUB(dp, b, k) ((const uint8_t *)(dp) + (int64_t)(b) * 32 + 16 * (k))
#define LEAN_SUP(f, mp, b, k) \
    ((const uint16_t *)(mp) + (int64_t)((b) / 8) * 16 * LEAN_SUPERS(f) + 16 * ((f) == FD_Q4_K_I8 ? (k) : 0))
/* the min of a format whose min is implied by d: Q4_0's -8 d, Q5_0's -16 d */
#define I8_IMPLIED_MIN(f) ((f) == FD_Q5_0_I8 ? -16.0f : -8.0f)

/* 32 bytes of 0x10 where the matching bit of the 4 bytes at p is set (llama.cpp's bytes_from_bits_32) */
INLINE __m256i fifth_bits(const uint8_t *p) {
    int32_t bits;
    memcpy(&bits, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits), _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i hit = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                          _mm256_set1_epi64x(-1));
    return _mm256_and_si256(hit, _mm256_set1_epi8(0x10));
}

/* eight rows' scales of one (block, sub-scale) as fp32 */
INLINE __m256 i8_scales(const int FMT, const void *p, int64_t at) {
    if (FMT_F32_SCALES(FMT)) return _mm256_loadu_ps((const float *)p + at);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + at)));
}

/* eight rows' (from row0) sub-scale k of block b of a lean K-quant as fp32: the integer times the
 * fp16, exact in fp32 (at most 8 + 11 significant bits), so the planes' fp32 scale bit for bit */
INLINE __m256 i8_lean_scales(const int FMT, const void *dp, const void *mp, int b, int k, int row0) {
    const __m128i s8 = _mm_loadl_epi64((const __m128i *)(LEAN_SUB(dp, b, k) + row0));
    const __m256i s32 = FMT == FD_Q6_K_I8 ? _mm256_cvtepi8_epi32(s8) : _mm256_cvtepu8_epi32(s8);
    const __m128i sup = _mm_loadu_si128((const __m128i *)(LEAN_SUP(FMT, mp, b, k) + row0));
    return _mm256_mul_ps(_mm256_cvtph_ps(sup), _mm256_cvtepi32_ps(s32));
}

/* Q6_K_I8: the top two bits of Q4 vector t's values (bits 2t..2t+1 of each byte of z) at bits 4-5 */
INLINE __m256i i8_high2(__m256i z, int t) {
    return _mm256_and_si256(t == 3 ? _mm256_srli_epi16(z, 2) : _mm256_slli_epi16(z, 4 - 2 * t), _mm256_set1_epi8(0x30));
}

/* the sums of a 32-block's two halves of activations, each in all four lanes of its 128-bit half */
INLINE __m256i i8_half_sums(const int8_t *xb) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i *)xb));
    const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)); /* 4 per 128-bit half */
    const __m256i t = _mm256_hadd_epi32(quads, quads);
    return _mm256_hadd_epi32(t, t);
}

/* sum over quads [j0, j0 + 4) of w * xq as 8 int32 lanes, for Q6_K's byte planes: their values may
 * be any int8 (IQ4_XS and Q3_K are repacked into them), so each pair sum widens at once, and the
 * signs move onto xq (|w| x sign(w) xq) */
INLINE __m256i i8_bytes4(const uint8_t *blk, const int8_t *xb, int j0) {
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i t = _mm256_setzero_si256();
    for (int j = j0; j < j0 + 4; j++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 64 * j)), x = bcast4(xb + 4 * j);
        t = _mm256_add_epi32(t, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), one16));
    }
    return t;
}

/* One 8-row half (h) of a group against MR activation rows, over all K. Nibble products of a block
 * sum in int16 (8 x 2 x 15 x 127 < 2^15), so a block costs one vpmaddwd per row; Q8_0 moves the
 * weights' signs onto the activations (|w| x sign(w) xq, as fd_linear_q8 does) and widens every
 * product; Q6_K keeps its two halves' sums apart for their two scales. */
INLINE void i8_half(const int FMT, const int MR, const int8_t *xq, const float *dx, const float *sx, int64_t K,
                    const uint8_t *qp, const void *dp, const void *mp, int h, __m256 acc[I8_MR]) {
    const int nb = (int)(K / 32), S = FMT_SCALES_PER_BLOCK(FMT);
    const __m256i nib = _mm256_set1_epi8(0x0F), one16 = _mm256_set1_epi16(1);
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int8_t *xb = xq + (int64_t)b * 32;
        const uint8_t *blk = qp + (int64_t)b * I8_BLOCK_BYTES(FMT) + 32 * h;
        __m256i s[I8_MR], s1[I8_MR];
        if (FMT == FD_Q8_0) {
            for (int r = 0; r < MR; r++) s[r] = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 64 * j)), aw = _mm256_sign_epi8(w, w);
                for (int r = 0; r < MR; r++) {
                    const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(xb + r * K + 4 * j), w));
                    s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(p, one16));
                }
            }
        } else if (FMT == FD_Q2_K) { /* the halves' sums apart, for their two scales and mins */
            __m256i t[I8_MR], t1[I8_MR];
            for (int i = 0; i < 4; i++) {
                const __m256i z = _mm256_loadu_si256((const __m256i *)(blk + 64 * i));
                const __m256i lo = _mm256_and_si256(z, nib), hi = _mm256_and_si256(_mm256_srli_epi16(z, 4), nib);
                for (int r = 0; r < MR; r++) {
                    const __m256i p = _mm256_maddubs_epi16(lo, bcast4(xb + r * K + 4 * i));
                    const __m256i p1 = _mm256_maddubs_epi16(hi, bcast4(xb + r * K + 16 + 4 * i));
                    t[r] = i == 0 ? p : _mm256_add_epi16(t[r], p);
                    t1[r] = i == 0 ? p1 : _mm256_add_epi16(t1[r], p1);
                }
            }
            for (int r = 0; r < MR; r++) {
                s[r] = _mm256_madd_epi16(t[r], one16);
                s1[r] = _mm256_madd_epi16(t1[r], one16);
            }
        } else if (FMT_NIBBLES(FMT) || FMT_FIFTH(FMT)) {
            /* 4-bit products sum in int16 over the whole block (8 x 2 x 15 x 127 < 2^15), 5-bit ones
             * over half of it (4 x 2 x 31 x 127 < 2^15) */
            const uint8_t *fifth = qp + (int64_t)b * I8_BLOCK_BYTES(FMT) + 256 + 8 * h;
            __m256i t[I8_MR];
            for (int i = 0; i < 4; i++) {
                const __m256i z = _mm256_loadu_si256((const __m256i *)(blk + 64 * i));
                __m256i lo = _mm256_and_si256(z, nib), hi = _mm256_and_si256(_mm256_srli_epi16(z, 4), nib);
                if (FMT_FIFTH(FMT)) {
                    lo = _mm256_or_si256(lo, fifth_bits(fifth + 16 * i));
                    hi = _mm256_or_si256(hi, fifth_bits(fifth + 16 * i + 4));
                }
                for (int r = 0; r < MR; r++) {
                    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xb + r * K + 4 * i)),
                                                       _mm256_maddubs_epi16(hi, bcast4(xb + r * K + 16 + 4 * i)));
                    t[r] = i == 0 || (FMT_FIFTH(FMT) && i == 2) ? p : _mm256_add_epi16(t[r], p);
                    if (FMT_FIFTH(FMT) && i == 1) s[r] = _mm256_madd_epi16(t[r], one16);
                }
            }
            for (int r = 0; r < MR; r++)
                s[r] = FMT_FIFTH(FMT) ? _mm256_add_epi32(s[r], _mm256_madd_epi16(t[r], one16))
                                      : _mm256_madd_epi16(t[r], one16);
        } else if (FMT == FD_Q6_K_I8) {
            /* unsigned 6-bit values: two vectors' pair sums add in int16 (2 x 2 x 63 x 127 < 2^15);
             * sum (u - 32) x = sum u x - 32 sum x, per half for its scale */
            const uint8_t *high = qp + (int64_t)b * I8_BLOCK_BYTES(FMT) + 256 + 32 * h;
            const __m256i z0 = _mm256_loadu_si256((const __m256i *)high), z1 = _mm256_loadu_si256((const __m256i *)(high + 64));
            __m256i t[I8_MR], t1[I8_MR];
            for (int i = 0; i < 4; i++) {
                const __m256i z = _mm256_loadu_si256((const __m256i *)(blk + 64 * i));
                const __m256i lo = _mm256_or_si256(_mm256_and_si256(z, nib), i8_high2(z0, i));
                const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(z, 4), nib), i8_high2(z1, i));
                for (int r = 0; r < MR; r++) {
                    const __m256i p = _mm256_maddubs_epi16(lo, bcast4(xb + r * K + 4 * i));
                    const __m256i p1 = _mm256_maddubs_epi16(hi, bcast4(xb + r * K + 16 + 4 * i));
                    t[r] = i % 2 == 0 ? p : _mm256_add_epi16(t[r], p);
                    t1[r] = i % 2 == 0 ? p1 : _mm256_add_epi16(t1[r], p1);
                    if (i == 1) {
                        s[r] = _mm256_madd_epi16(t[r], one16);
                        s1[r] = _mm256_madd_epi16(t1[r], one16);
                    } else if (i == 3) {
                        s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(t[r], one16));
                        s1[r] = _mm256_add_epi32(s1[r], _mm256_madd_epi16(t1[r], one16));
                    }
                }
            }
            for (int r = 0; r < MR; r++) {
                const __m256i h2 = _mm256_slli_epi32(i8_half_sums(xb + r * K), 5);
                s[r] = _mm256_sub_epi32(s[r], _mm256_permute2x128_si256(h2, h2, 0x00));
                s1[r] = _mm256_sub_epi32(s1[r], _mm256_permute2x128_si256(h2, h2, 0x11));
            }
        } else { /* Q6_K: a byte per value, two scales */
            for (int r = 0; r < MR; r++) {
                s[r] = i8_bytes4(blk, xb + r * K, 0);
                s1[r] = i8_bytes4(blk, xb + r * K, 4);
            }
        }
        const int64_t at = ((int64_t)b * S) * 16 + 8 * h;
        const __m256 dv = I8_LEAN(FMT) ? i8_lean_scales(FMT, dp, mp, b, 0, 8 * h) : i8_scales(FMT, dp, at);
        const __m256 d1 = FMT == FD_Q6_K_I8 ? i8_lean_scales(FMT, dp, mp, b, 1, 8 * h)
                          : FMT_HALVES(FMT) ? i8_scales(FMT, dp, at + 16) : dv;
        const int64_t mat = (int64_t)b * FMT_MINS_PER_BLOCK(FMT) * 16 + 8 * h;
        const __m256 mv = FMT == FD_Q4_K_I8 ? i8_lean_scales(FMT, dp, mp, b, 1, 8 * h)
                          : FMT_HAS_MIN(FMT) ? i8_scales(FMT, mp, mat) : _mm256_mul_ps(dv, _mm256_set1_ps(I8_IMPLIED_MIN(FMT)));
        const __m256 m1 = FMT == FD_Q2_K ? i8_scales(FMT, mp, mat + 16) : mv;
        for (int r = 0; r < MR; r++) {
            const __m256 dxr = _mm256_set1_ps(dx[r * nb + b]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r]), _mm256_mul_ps(dv, dxr), acc[r]);
            if (FMT_HALVES(FMT)) acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[r]), _mm256_mul_ps(d1, dxr), acc[r]);
            if (FMT == FD_Q2_K) { /* each half's min times that half's activation sum */
                __m256i h2 = i8_half_sums(xb + r * K);
                acc[r] = _mm256_fmadd_ps(mv, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(h2, h2, 0x00)), dxr), acc[r]);
                acc[r] = _mm256_fmadd_ps(m1, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_permute2x128_si256(h2, h2, 0x11)), dxr), acc[r]);
            } else if (FMT_HAS_MIN(FMT) || FMT == FD_Q4_0 || FMT == FD_Q5_0_I8) {
                acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[r * nb + b]), acc[r]);
            }
        }
    }
}

/* y[r, n0 + c] = out[c] + bias (add: y += that) for the group's real columns */
INLINE void i8_store(const float *out, int cols, const float *bias, float *yr, int add, int64_t n0) {
    for (int c = 0; c < cols; c++) {
        const float v = out[c] + (bias ? bias[n0 + c] : 0.0f);
        yr[n0 + c] = add ? yr[n0 + c] + v : v;
    }
}

INLINE void i8_group_avx2(const int FMT, const int8_t *xq, const float *dx, const float *sx, int64_t M, int64_t K,
                          const uint8_t *q, const void *d, const void *mm, const float *bias, float *y,
                          int64_t ldy, int add, int64_t n0, int cols) {
    const int64_t nb = K / 32;
    for (int64_t r0 = 0; r0 < M; r0 += I8_MR) {
        const int mr = (int)(M - r0 < I8_MR ? M - r0 : I8_MR);
        for (int h = 0; h < 2 && 8 * h < cols; h++) {
            __m256 acc[I8_MR];
            float out[8];
#define I8_HALF(R) i8_half(FMT, R, xq + r0 * K, dx + r0 * nb, sx + r0 * nb, K, q, d, mm, h, acc)
            switch (mr) {
            case 1: I8_HALF(1); break;
            case 2: I8_HALF(2); break;
            case 3: I8_HALF(3); break;
            default: I8_HALF(4); break;
            }
#undef I8_HALF
            const int c = cols - 8 * h < 8 ? cols - 8 * h : 8;
            for (int r = 0; r < mr; r++) {
                _mm256_storeu_ps(out, acc[r]);
                i8_store(out, c, bias, y + (r0 + r) * ldy, add, n0 + 8 * h);
            }
        }
    }
}
#endif

#if defined(FD_HAVE_I8) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__GNUC__)
#define FD_HAVE_VNNI 1
#define I8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#define VNNI_MR 8

/* sixteen rows' scales of one (block, sub-scale) as fp32 */
I8_TARGET static inline __m512 vnni_scales(const int FMT, const void *p, int64_t at) {
    if (FMT_F32_SCALES(FMT)) return _mm512_loadu_ps((const float *)p + at);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + at)));
}

/* i8_lean_scales for sixteen rows */
I8_TARGET static inline __m512 vnni_lean_scales(const int FMT, const void *dp, const void *mp, int b, int k) {
    const __m128i s8 = _mm_loadu_si128((const __m128i *)LEAN_SUB(dp, b, k));
    const __m512i s32 = FMT == FD_Q6_K_I8 ? _mm512_cvtepi8_epi32(s8) : _mm512_cvtepu8_epi32(s8);
    const __m256i sup = _mm256_loadu_si256((const __m256i *)LEAN_SUP(FMT, mp, b, k));
    return _mm512_mul_ps(_mm512_cvtph_ps(sup), _mm512_cvtepi32_ps(s32));
}

/* i8_high2 for a 64-byte vector */
I8_TARGET static inline __m512i vnni_high2(__m512i z, int t) {
    return _mm512_and_si512(t == 3 ? _mm512_srli_epi16(z, 2) : _mm512_slli_epi16(z, 4 - 2 * t), _mm512_set1_epi8(0x30));
}

/* Q5_K's fifth bits of vector i as 0x10 bytes: the two 8-row halves' 4-byte masks (see the layout)
 * side by side, one bit per byte of the 64-byte vector */
I8_TARGET static inline __m512i vnni_fifth(const uint8_t *fifth, int i, int high) {
    uint32_t h0, h1;
    memcpy(&h0, fifth + 16 * i + 4 * high, 4);
    memcpy(&h1, fifth + 16 * i + 8 + 4 * high, 4);
    return _mm512_maskz_mov_epi8((__mmask64)h0 | ((__mmask64)h1 << 32), _mm512_set1_epi8(0x10));
}

/* A block's scales for 16 rows: dv, Q6_K's second half's d1, and the min (stored, or implied by d) */
I8_TARGET static inline void vnni_block_scales(const int FMT, const void *dp, const void *mp, int b, __m512 *dv,
                                               __m512 *d1, __m512 *mv) {
    const int S = FMT_SCALES_PER_BLOCK(FMT);
    *dv = I8_LEAN(FMT) ? vnni_lean_scales(FMT, dp, mp, b, 0) : vnni_scales(FMT, dp, (int64_t)b * S * 16);
    *d1 = FMT == FD_Q6_K_I8 ? vnni_lean_scales(FMT, dp, mp, b, 1)
          : FMT_HALVES(FMT) ? vnni_scales(FMT, dp, ((int64_t)b * S + 1) * 16) : *dv;
    *mv = FMT == FD_Q4_K_I8 ? vnni_lean_scales(FMT, dp, mp, b, 1)
          : FMT_HAS_MIN(FMT) ? vnni_scales(FMT, mp, (int64_t)b * 16)
                             : _mm512_mul_ps(*dv, _mm512_set1_ps(I8_IMPLIED_MIN(FMT)));
}

/* A nibble format's block (blk: its I8_BLOCK_BYTES) as the 8 vectors of its bytes' layout: vector j
 * holds elements 4j..4j+3 of each of the 16 rows, a byte each, Q5_K's fifth bits or Q6_K_I8's two
 * high bits added */
I8_TARGET static inline void vnni_unpack(const int FMT, const uint8_t *blk, __m512i wv[8]) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    const __m512i z0 = FMT == FD_Q6_K_I8 ? _mm512_loadu_si512((const void *)(blk + 256)) : nib;
    const __m512i z1 = FMT == FD_Q6_K_I8 ? _mm512_loadu_si512((const void *)(blk + 320)) : nib;
    for (int i = 0; i < 4; i++) {
        __m512i z = _mm512_loadu_si512((const void *)(blk + 64 * i));
        wv[i] = _mm512_and_si512(z, nib);
        wv[i + 4] = _mm512_and_si512(_mm512_srli_epi16(z, 4), nib);
        if (FMT_FIFTH(FMT)) {
            wv[i] = _mm512_or_si512(wv[i], vnni_fifth(blk + 256, i, 0));
            wv[i + 4] = _mm512_or_si512(wv[i + 4], vnni_fifth(blk + 256, i, 1));
        }
        if (FMT == FD_Q6_K_I8) {
            wv[i] = _mm512_or_si512(wv[i], vnni_high2(z0, i));
            wv[i + 4] = _mm512_or_si512(wv[i + 4], vnni_high2(z1, i));
        }
    }
}

/* One activation row's block folded into its fp32 accumulator: isum (isum1: Q6_K's second half) the
 * exact integer dot products, dxr and sxr the row's scale and scaled sum. Every product kernel of the
 * rows-interleaved layout folds through here, so that they agree bit for bit. */
I8_TARGET static inline __m512 vnni_fold(const int FMT, __m512 acc, __m512i isum, __m512i isum1, __m512 dv,
                                         __m512 d1, __m512 mv, float dxr, float sxr) {
    const __m512 vdx = _mm512_set1_ps(dxr);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dv, vdx), acc);
    if (FMT_HALVES(FMT)) acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum1), _mm512_mul_ps(d1, vdx), acc);
    if (!FMT_SIGNED(FMT) && FMT != FD_Q6_K_I8) acc = _mm512_fmadd_ps(mv, _mm512_set1_ps(sxr), acc);
    return acc;
}

/* A whole 16-row group against MR activation rows: one vpdpbusd per 64-byte vector. Formats with
 * signed bytes (Q8_0, Q6_K) run unsigned activations (xq + 128) against the signed weights and
 * subtract 128 x the weights' sum; nibble formats (Q5_K with its fifth bits added, Q6_K_I8 with its
 * two high bits, then 32 x each half's activation sum subtracted) run unsigned weights against the
 * signed activations. Q6_K's two halves keep their sums apart for their scales.
 * Q2_K (a min per half as well) stays on the AVX2 path. */
I8_TARGET static inline void vnni_group(const int FMT, const int MR, const int8_t *xq, const float *dx,
                                        const float *sx, int64_t K, const uint8_t *qp, const void *dp,
                                        const void *mp, __m512 *acc) {
    const int nb = (int)(K / 32);
    const int bytes = FMT_SIGNED(FMT);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512 dv, d1, mv;
        vnni_block_scales(FMT, dp, mp, b, &dv, &d1, &mv);
        __m512i wv[8];
        __m512i wsum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        if (bytes) {
            const uint8_t *blk = qp + (int64_t)b * 512;
            for (int j = 0; j < 8; j++) {
                wv[j] = _mm512_loadu_si512((const void *)(blk + 64 * j));
                wsum[FMT_HALVES(FMT) && j >= 4] = _mm512_dpbusd_epi32(wsum[FMT_HALVES(FMT) && j >= 4], ones, wv[j]);
            }
            wsum[0] = _mm512_slli_epi32(wsum[0], 7);
            wsum[1] = _mm512_slli_epi32(wsum[1], 7);
        } else {
            vnni_unpack(FMT, qp + (int64_t)b * I8_BLOCK_BYTES(FMT), wv);
        }
        /* rows innermost: MR independent dot-product chains in flight, not one chain of 8 */
        __m512i isum[VNNI_MR], isum1[VNNI_MR];
        for (int r = 0; r < MR; r++) isum[r] = isum1[r] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++)
            for (int r = 0; r < MR; r++) {
                int32_t quad;
                memcpy(&quad, xq + r * K + (int64_t)b * 32 + 4 * j, 4);
                __m512i *t = FMT_HALVES(FMT) && j >= 4 ? &isum1[r] : &isum[r];
                if (bytes)
                    *t = _mm512_dpbusd_epi32(*t, _mm512_set1_epi32(quad ^ (int32_t)0x80808080), wv[j]);
                else
                    *t = _mm512_dpbusd_epi32(*t, wv[j], _mm512_set1_epi32(quad));
            }
        for (int r = 0; r < MR; r++) {
            if (bytes) {
                isum[r] = _mm512_sub_epi32(isum[r], wsum[0]);
                isum1[r] = _mm512_sub_epi32(isum1[r], wsum[1]);
            }
            if (FMT == FD_Q6_K_I8) { /* sum (u - 32) x = sum u x - 32 sum x, per half */
                const __m256i h2 = _mm256_slli_epi32(i8_half_sums(xq + r * K + (int64_t)b * 32), 5);
                isum[r] = _mm512_sub_epi32(isum[r], _mm512_broadcastd_epi32(_mm256_castsi256_si128(h2)));
                isum1[r] = _mm512_sub_epi32(isum1[r], _mm512_broadcastd_epi32(_mm256_extracti128_si256(h2, 1)));
            }
            acc[r] = vnni_fold(FMT, acc[r], isum[r], isum1[r], dv, d1, mv, dx[r * nb + b], sx[r * nb + b]);
        }
    }
}

I8_TARGET static void vnni_group_rows(const int FMT, const int8_t *xq, const float *dx, const float *sx, int64_t M,
                                      int64_t K, const uint8_t *q, const void *d, const void *mm,
                                      const float *bias, float *y, int64_t ldy, int add, int64_t n0, int cols) {
    const int64_t nb = K / 32;
    for (int64_t r0 = 0; r0 < M; r0 += VNNI_MR) {
        const int mr = (int)(M - r0 < VNNI_MR ? M - r0 : VNNI_MR);
        __m512 acc[VNNI_MR];
        float out[16];
#define VNNI_CALL(R) vnni_group(FMT, R, xq + r0 * K, dx + r0 * nb, sx + r0 * nb, K, q, d, mm, acc)
        switch (mr) {
        case 1: VNNI_CALL(1); break;
        case 2: VNNI_CALL(2); break;
        case 3: VNNI_CALL(3); break;
        case 4: VNNI_CALL(4); break;
        case 5: VNNI_CALL(5); break;
        case 6: VNNI_CALL(6); break;
        case 7: VNNI_CALL(7); break;
        default: VNNI_CALL(8); break;
        }
#undef VNNI_CALL
        for (int r = 0; r < mr; r++) {
            _mm512_storeu_ps(out, acc[r]);
            i8_store(out, cols, bias, y + (r0 + r) * ldy, add, n0);
        }
    }
}
#endif

#ifdef FD_HAVE_VNNI
static int i8_use_vnni(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
    }
    return known;
}
#endif

/* ---------------------------------------------------------------- int8 activations on AMX
 *
 * Intel AMX's tile multiply on the same layout (FlashDecoding++ section 4's flat GEMM for prefill's
 * large M, where the products are compute bound): an A tile is 16 activation rows x one 32-byte
 * block, read from xq with stride K; a B tile is one block of a group, 8 rows of 64 bytes, which is
 * exactly the layout's 8 vectors (row j = elements 4j..4j+3 of each of the 16 weight rows): Q8_0's
 * block as stored, a nibble format's unpacked once per group into scratch and reused for every row
 * tile. TDPBSSD (signed x signed) runs Q8_0, TDPBSUD (signed activations x unsigned weights) the
 * nibble formats and Q5's, so no +128 correction is needed. The scales differ per block, so each
 * block's 16 x 16 int32 tile is stored and folded by vnni_fold, as vnni_group folds: the integer
 * sums are exact in both, so the results are the VNNI path's bit for bit. Two C tiles alternate so
 * that one block's fold overlaps the next block's multiply. Q6_K (a scale per half block: two dot
 * products a block) and Q2_K stay on VNNI/AVX2.
 * Linux gives a process the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); without it
 * the first tile instruction faults, so a refusal keeps the VNNI path for good. */
#if defined(FD_HAVE_VNNI) && defined(__x86_64__) && defined(__linux__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define FD_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#define AMX_FMT(f)                                                                                  \
    ((f) == FD_Q4_0 || (f) == FD_Q4_1 || (f) == FD_Q8_0 || (f) == FD_Q4_K || (f) == FD_Q4_K_I8 || \
     (f) == FD_Q5_K || (f) == FD_Q5_0_I8)
#define AMX_ROWS 16 /* an A tile's activation rows; a product's last M % 16 rows run on VNNI */
/* the tile intrinsics are asm statements that declare no memory they read: order them after the
 * stores they depend on (the unpacked weights, the activations of the team's quantization) */
#define AMX_FENCE() __asm__ volatile("" ::: "memory")

/* palette 1: tmm0, tmm1 the C tiles (16 x 16 int32), tmm2, tmm3 the A tiles, tmm4, tmm5 the B tiles */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;
static const _Alignas(64) amx_config amx_tiles = {1, 0, {0}, {64, 64, 32, 32, 64, 64}, {16, 16, 16, 16, 8, 8}};

/* the CPU has AMX-INT8, the OS saves its state (XCR0 bits 17, 18) and grants it to this process */
static int amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x60000u) != 0x60000u) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

static int amx_granted(void) {
    static int known = -1;
    if (known < 0) known = amx_probe() && i8_use_vnni();
    return known;
}

static atomic_int amx_enabled = -1; /* -1: FLASHDECODE_AMX not read yet */

static int amx_on(void) {
    int on = atomic_load_explicit(&amx_enabled, memory_order_relaxed);
    if (on < 0) {
        const char *env = getenv("FLASHDECODE_AMX");
        on = amx_granted() && !(env && strcmp(env, "0") == 0);
        atomic_store_explicit(&amx_enabled, on, memory_order_relaxed);
    }
    return on;
}

/* The B tiles of one group, block after block (512 bytes each): Q8_0's blocks are their own; a
 * nibble format's are unpacked into buf. */
AMX_TARGET static const uint8_t *amx_weights(const int FMT, const uint8_t *qp, int nb, uint8_t *buf) {
    if (FMT == FD_Q8_0) return qp;
    for (int b = 0; b < nb; b++) {
        __m512i wv[8];
        vnni_unpack(FMT, qp + (int64_t)b * I8_BLOCK_BYTES(FMT), wv);
        for (int j = 0; j < 8; j++) _mm512_store_si512((void *)(buf + (int64_t)b * 512 + 64 * j), wv[j]);
    }
    AMX_FENCE();
    return buf;
}

/* C = the block's 16 x 16 integer dot products (tile numbers must be constants) */
#define AMX_DOT(FMT, C, A, B, xb, wb, K)                                                            \
    do {                                                                                            \
        _tile_zero(C);                                                                              \
        _tile_loadd(A, xb, K);                                                                      \
        _tile_loadd(B, wb, 64);                                                                     \
        if ((FMT) == FD_Q8_0) _tile_dpbssd(C, A, B);                                                \
        else _tile_dpbsud(C, A, B);                                                                 \
    } while (0)

/* block b's stored C tile (row r: activation row r's sums for the 16 weight rows) into acc */
AMX_TARGET static inline __attribute__((always_inline)) void amx_fold(const int FMT, const int32_t *ct, int b,
                                                                      int nb, const float *dx, const float *sx,
                                                                      const void *dp, const void *mp,
                                                                      __m512 acc[AMX_ROWS]) {
    __m512 dv, d1, mv;
    vnni_block_scales(FMT, dp, mp, b, &dv, &d1, &mv);
    for (int r = 0; r < AMX_ROWS; r++) {
        const __m512i isum = _mm512_load_si512((const void *)(ct + 16 * r));
        acc[r] = vnni_fold(FMT, acc[r], isum, isum, dv, d1, mv, dx[r * nb + b], sx[r * nb + b]);
    }
}

/* 16 activation rows against one group's B tiles bt, over all K */
AMX_TARGET static inline __attribute__((always_inline)) void amx_rows(const int FMT, const int8_t *xq,
                                                                      const float *dx, const float *sx, int64_t K,
                                                                      const uint8_t *bt, const void *dp,
                                                                      const void *mp, __m512 acc[AMX_ROWS]) {
    const int nb = (int)(K / 32);
    _Alignas(64) int32_t ct[2][AMX_ROWS * 16];
    for (int r = 0; r < AMX_ROWS; r++) acc[r] = _mm512_setzero_ps();
    AMX_DOT(FMT, 0, 2, 4, xq, bt, K);
    for (int b = 0; b < nb; b += 2) {
        if (b + 1 < nb) AMX_DOT(FMT, 1, 3, 5, xq + 32 * (b + 1), bt + 512 * (b + 1), K);
        _tile_stored(0, ct[0], 64);
        amx_fold(FMT, ct[0], b, nb, dx, sx, dp, mp, acc);
        if (b + 2 < nb) AMX_DOT(FMT, 0, 2, 4, xq + 32 * (b + 2), bt + 512 * (b + 2), K);
        if (b + 1 < nb) {
            _tile_stored(1, ct[1], 64);
            amx_fold(FMT, ct[1], b + 1, nb, dx, sx, dp, mp, acc);
        }
    }
}

/* vnni_group_rows on AMX: every whole 16 rows on tiles, the rest on VNNI (bit for bit the same) */
AMX_TARGET static void amx_group_rows(const int FMT, const int8_t *xq, const float *dx, const float *sx, int64_t M,
                                      int64_t K, const uint8_t *q, const void *d, const void *mm,
                                      const float *bias, float *y, int64_t ldy, int add, int64_t n0, int cols,
                                      uint8_t *buf) {
    const int64_t nb = K / 32, whole = M - M % AMX_ROWS;
    AMX_FENCE();
    const uint8_t *bt = amx_weights(FMT, q, (int)nb, buf);
    for (int64_t r0 = 0; r0 < whole; r0 += AMX_ROWS) {
        __m512 acc[AMX_ROWS];
        float out[16];
        amx_rows(FMT, xq + r0 * K, dx + r0 * nb, sx + r0 * nb, K, bt, d, mm, acc);
        for (int r = 0; r < AMX_ROWS; r++) {
            _mm512_storeu_ps(out, acc[r]);
            i8_store(out, cols, bias, y + (r0 + r) * ldy, add, n0);
        }
    }
    if (whole < M)
        vnni_group_rows(FMT, xq + whole * K, dx + whole * nb, sx + whole * nb, M - whole, K, q, d, mm, bias,
                        y + whole * ldy, ldy, add, n0, cols);
}

/* This thread's tiles for one product (the configuration is per thread, and OpenMP reuses threads):
 * its weight scratch, or NULL where AMX does not run it. amx_end gives the tile state back. */
AMX_TARGET static uint8_t *amx_begin(int fmt, int64_t M, int64_t K) {
    if (!AMX_FMT(fmt) || M < AMX_ROWS || !amx_on()) return NULL;
    uint8_t *buf = (uint8_t *)aligned_alloc(64, (size_t)(K / 32) * 512);
    if (buf) _tile_loadconfig(&amx_tiles);
    return buf;
}

AMX_TARGET static void amx_end(uint8_t *buf) {
    if (!buf) return;
    _tile_release();
    free(buf);
}
#endif

/* 1 when the CPU and OS let this process run the AMX products, else 0 */
int fd_amx_available(void) {
#ifdef FD_HAVE_AMX
    return amx_granted();
#else
    return 0;
#endif
}

/* AMX for the rows-interleaved products: mode 0 off, 1 on (where the CPU and OS grant it), else
 * unchanged; returns whether it is on. FLASHDECODE_AMX=0 turns it off at the first product. */
int fd_amx(int mode) {
#ifdef FD_HAVE_AMX
    if (mode == 0 || mode == 1) atomic_store_explicit(&amx_enabled, mode && amx_granted(), memory_order_relaxed);
    return amx_on();
#else
    (void)mode;
    return 0;
#endif
}

/* 1 when fd_linear_i8 runs in this build (AVX2 or better; VNNI where the CPU has it), else 0. */
int fd_i8_available(void) {
#ifdef FD_HAVE_I8
    return 1;
#else
    return 0;
#endif
}

/* The 16-row groups of one product, shared among a team (every member calls it; it ends in the
 * team's barrier), on activations already rounded by fd_q8_quantize_rows. */
void fd_linear_i8_tiles(fd_member *me, int fmt, const int8_t *xq, const float *dx, const float *sx, int64_t M,
                        int64_t K, const uint8_t *qp, const void *dp, const void *mp, const float *bias,
                        float *y, int64_t ldy, int add, int64_t N) {
#ifdef FD_HAVE_I8
    const int64_t groups = (N + 15) / 16, nb = K / 32, chunk = fd_chunk(me, groups);
    const int64_t gbytes = nb * I8_BLOCK_BYTES(fmt);
    const int64_t scale = FMT_F32_SCALES(fmt) ? 4 : 2; /* bytes of one scale */
    /* a group's bytes of d and m (the lean K-quants': see the layout) */
    const int64_t dstride = I8_LEAN(fmt) ? nb * 32 : nb * FMT_SCALES_PER_BLOCK(fmt) * 16 * scale;
    const int64_t mstride = I8_LEAN(fmt) ? nb / 8 * 32 * LEAN_SUPERS(fmt) : nb * FMT_MINS_PER_BLOCK(fmt) * 16 * scale;
#ifdef FD_HAVE_VNNI
    const int vnni = i8_use_vnni();
#endif
#ifdef FD_HAVE_AMX
    uint8_t *amx = amx_begin(fmt, M, K);
#endif
    int64_t lo, hi;
    fd_loop_begin(me);
    while (fd_loop_next(me, groups, chunk, &lo, &hi)) for (int64_t g = lo; g < hi; g++) {
        const uint8_t *q = qp + g * gbytes;
        const void *d = (const char *)dp + g * dstride;
        const void *mm = mp ? (const char *)mp + g * mstride : NULL;
        const int64_t n0 = g * 16;
        const int cols = (int)(N - n0 < 16 ? N - n0 : 16);
#define I8_AVX2(F) i8_group_avx2(F, xq, dx, sx, M, K, q, d, mm, bias, y, ldy, add, n0, cols);
#ifdef FD_HAVE_AMX
#define I8_AMX(F) if (AMX_FMT(F) && amx) amx_group_rows(F, xq, dx, sx, M, K, q, d, mm, bias, y, ldy, add, n0, cols, amx); else
#else
#define I8_AMX(F)
#endif
#ifdef FD_HAVE_VNNI
#define I8_RUN(F)                                                                                   \
    I8_AMX(F) if (vnni) vnni_group_rows(F, xq, dx, sx, M, K, q, d, mm, bias, y, ldy, add, n0, cols); \
    else I8_AVX2(F)
#else
#define I8_RUN(F) I8_AVX2(F)
#endif
        switch (fmt) {
        case FD_Q4_0: I8_RUN(FD_Q4_0) break;
        case FD_Q4_1: I8_RUN(FD_Q4_1) break;
        case FD_Q8_0: I8_RUN(FD_Q8_0) break;
        case FD_Q4_K: I8_RUN(FD_Q4_K) break;
        case FD_Q5_K: I8_RUN(FD_Q5_K) break;
        case FD_Q6_K: I8_RUN(FD_Q6_K) break;
        case FD_Q2_K: I8_AVX2(FD_Q2_K) break;
        case FD_Q5_0_I8: I8_RUN(FD_Q5_0_I8) break;
        case FD_Q6_K_I8: I8_RUN(FD_Q6_K_I8) break;
        case FD_Q4_K_I8: I8_RUN(FD_Q4_K_I8) break;
        }
#undef I8_RUN
#undef I8_AMX
#undef I8_AVX2
    }
#ifdef FD_HAVE_AMX
    amx_end(amx);
#endif
    fd_loop_end(me);
#else
    (void)me; (void)fmt; (void)xq; (void)dx; (void)sx; (void)M; (void)K; (void)qp; (void)dp; (void)mp;
    (void)bias; (void)y; (void)ldy; (void)add; (void)N;
#endif
}

/* y = x W^T (+ bias) with int8 activations, W repacked as described above. Returns 0, -1 on bad
 * arguments, -2 out of memory, -3 when this build has no AVX2. */
int fd_linear_i8(int fmt, const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *qp,
                 const void *dp, const void *mp, const float *bias, float *y, int64_t ldy, int64_t N,
                 int nthreads) {
    if (!fd_i8_available()) return -3;
    if (fmt < 0 || fmt > FD_LAST_I8 || fmt == FD_BF16 || K % 32 || M < 0 || N < 0 || (FMT_HAS_MIN(fmt) && !mp))
        return -1;
    if (I8_LEAN(fmt) && (K % 256 || !mp)) return -1; /* fp16 scales per 256 */
    if (M == 0 || N == 0) return 0;
    const int64_t nb = K / 32;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *dx = (float *)malloc(sizeof(float) * (size_t)(M * nb)), *sx = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    const int ok = xq && dx && sx;
    int nt = pick_threads(nthreads, (N + 15) / 16, (double)N * (double)K * (double)(M < 8 ? M : 8) / 4.0);
    fd_team team;
    fd_team_init(&team, nt);
#pragma omp parallel num_threads(nt) if (nt > 1 && ok)
    {
        fd_team solo;
        fd_member me = fd_join(&team, &solo);
        if (me.team && ok) {
            const int n = me.team->n;
            fd_q8_quantize_rows(x, ldx, M * me.tid / n, M * (me.tid + 1) / n, K, xq, dx, sx);
            fd_barrier(&me);
            fd_linear_i8_tiles(&me, fmt, xq, dx, sx, M, K, qp, dp, mp, bias, y, ldy, 0, N);
        }
    }
    free(xq);
    free(dx);
    free(sx);
    return ok ? 0 : -2;
}

const char *fd_isa(void) { return FD_ISA; }

int fd_abi_version(void) { return 8; }
