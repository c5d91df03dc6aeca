/* A whole model step natively: every layer for a batch of query rows (single-token decodes, prompt
 * chunks and drafted tokens alike: each row is one token with its own context), in one OpenMP
 * parallel region, operation for operation what models/decoder.py's DecoderLayer runs (RMSNorm, QKV
 * projection, optional per-head q/k norm, RoPE, paged KV cache write, attention over the paged
 * cache, output projection and residual, RMSNorm, gate/up projection, SwiGLU, down projection and
 * residual; then the final norm). At batch 1 a layer is ~15 operations of a few microseconds each:
 * launched one by one from Python, each pays interpreter, dispatch and thread-pool wake-up costs
 * larger than its work. Here threads meet at barriers instead, and K and V are read in place from
 * the paged cache (no gather).
 *
 * Attention (FlashDecoding++ section 3, the CPU form of layers/attention.py): the keys of each
 * (sequence, kv head) are split into partitions that threads run independently, each producing its
 * partial sum_j e^(s_j - m) v_j and sum_j e^(s_j - m). Exact mode takes m as the partition's own
 * max and merges partitions with the synchronised rescale e^(m_p - max_p m_p) (Flash-Decoding);
 * unified mode takes m = phi, the layer's calibrated unified max, and the partials are simply added.
 * A unified row whose sum leaves the safe window (layers/attention.py derives it) is recomputed
 * with the exact softmax, so the result is exact either way; such rows are counted.
 *
 * The projections are flat_gemm.c's tile loops (fp32 dequantized in registers, or int8 activations
 * per part as the dataflow plan says), run as worksharing loops of this region.
 */
#include "flat_gemm.h"

#define KV_F32 0
#define KV_BF16 1
#define KV_F16 2
/* keys per attention partition: fixed, so that a row's attention sums in the same order whatever else
 * is in the step and however many threads run it (a drafted row, a prompt chunk's row and a lone
 * decode of the same token give the same bits, which keeps speculative decoding's greedy output
 * that of plain decoding) */
#define PART_KEYS 256
#define GROUP_ROWS 4  /* rows of a prompt chunk that attend together */
/* Steps of at most this many rows prepare a projection's input (norm, SwiGLU, int8 rounding) in
 * every thread at once, each its own copy: the work is a few microseconds, less than the barrier
 * a shared copy would wait at. Larger steps share the work and one copy. Either way the values are
 * the same bits. */
#define PRIVATE_ROWS 4

#define Q8_INTERLEAVED 2 /* fd_part.q8: int8 activations on weights repacked 16 rows at a time */

typedef struct {
    int32_t fmt, q8; /* FD_* format; 1: int8 activations (fd_linear_q8_tiles), Q8_INTERLEAVED: i8 tiles */
    int64_t n;       /* output features of this part */
    const uint8_t *qs;
    const void *d, *m;
    const float *bias;
} fd_part;

typedef struct { /* parts concatenated along N (fused projections whose weights differ in format) */
    int32_t nparts, pad;
    fd_part part[3];
} fd_proj;

typedef struct {
    const float *attn_norm, *mlp_norm, *qk_norm; /* qk_norm: [heads + kv_heads, head_dim] or NULL */
    fd_proj qkv, o, gate_up, down;
} fd_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, num_layers, num_slots;
    float eps, scale;     /* RMSNorm epsilon; attention's softmax scale */
    int32_t kv_dtype;     /* KV_* */
    int32_t unified;      /* 0: exact softmax; 1: unified max phi[layer] */
    const float *phi;     /* [num_layers] */
    float win_lo, win_hi; /* the safe window */
    const float *norm;    /* final norm weight [hidden] */
    const float *cos, *sin; /* RoPE [max_position, head_dim / 2] */
    void *kv;             /* [num_layers, num_slots, kv_heads, 2, head_dim] of kv_dtype */
    const fd_layer *layers;
} fd_model;

/* ---------------------------------------------------------------- vector pieces */

#if defined(__AVX2__)
/* e^x in fp32 (Cephes' range reduction and polynomial, about 1 ulp); -inf gives 0 */
INLINE __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

/* x[i] = e^(x[i] - sub); returns the sum */
static float exp_sum(float *x, int64_t n, float sub) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps(), vs = _mm256_set1_ps(sub);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    s = hsum256(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - sub);
        s += x[i];
    }
    return s;
}

static float dot(const float *a, const float *b, int64_t n) {
#if defined(__AVX2__)
    return dot_f32(a, b, (int)n);
#else
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

static void axpy(float *y, float a, const float *x, int64_t n) { /* y += a x */
    int64_t i = 0;
#if defined(__AVX2__)
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

static void rms_norm_row(const float *x, const float *w, float *y, int64_t n, float eps) {
    float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

static void silu_mul(const float *g, const float *u, float *y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX2__)
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_xor_ps(gv, neg))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* ---------------------------------------------------------------- the paged cache */

INLINE int64_t kv_index(const fd_model *M, int64_t layer, int64_t slot, int64_t h, int which) {
    return (((layer * M->num_slots + slot) * M->kv_heads + h) * 2 + which) * M->head_dim;
}

#define KV_PREFETCH 16 /* keys ahead: a key's row is a DRAM miss, and a row's dot products are short */

/* ask for the cache row of key j + KV_PREFETCH while key j is used: each key's row lies in its own
 * slot, so the hardware prefetcher sees no stream, and without this every row costs a full miss */
INLINE void kv_prefetch(const fd_model *M, int64_t layer, const int64_t *slots, int64_t j, int64_t end, int64_t h,
                        int which) {
    if (j + KV_PREFETCH >= end) return;
    const size_t bytes = (size_t)M->head_dim * (M->kv_dtype == KV_F32 ? 4 : 2);
    const char *p = (const char *)M->kv + kv_index(M, layer, slots[j + KV_PREFETCH], h, which) * (M->kv_dtype == KV_F32 ? 4 : 2);
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
}

/* a cache row (one slot, one kv head, K or V) as fp32 */
INLINE const float *kv_row(const fd_model *M, int64_t layer, int64_t slot, int64_t h, int which, float *buf) {
    const int64_t D = M->head_dim;
    const int64_t at = kv_index(M, layer, slot, h, which);
    if (M->kv_dtype == KV_F32) return (const float *)M->kv + at;
    const uint16_t *p = (const uint16_t *)M->kv + at;
    int64_t i = 0;
    if (M->kv_dtype == KV_BF16) {
#if defined(__AVX2__)
        for (; i + 8 <= D; i += 8)
            _mm256_storeu_ps(buf + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + i))), 16)));
#endif
        for (; i < D; i++) buf[i] = fd_bf2f(p[i]);
    } else {
#if defined(__F16C__)
        for (; i + 8 <= D; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + i))));
#endif
        for (; i < D; i++) buf[i] = fd_h2f(p[i]);
    }
    return buf;
}

static void kv_store(const fd_model *M, int64_t layer, int64_t slot, int64_t h, int which, const float *x) {
    const int64_t D = M->head_dim, at = kv_index(M, layer, slot, h, which);
    if (M->kv_dtype == KV_F32) {
        memcpy((float *)M->kv + at, x, sizeof(float) * (size_t)D);
        return;
    }
    uint16_t *p = (uint16_t *)M->kv + at;
    for (int64_t i = 0; i < D; i++) p[i] = M->kv_dtype == KV_BF16 ? fd_f2bf(x[i]) : fd_f2h(x[i]);
}

/* ---------------------------------------------------------------- attention */

/* the first of a group's rows (row i sees keys < n0 + i) that sees key j */
INLINE int first_row(int64_t j, int64_t n0) { return j < n0 ? 0 : (int)(j - n0 + 1); }

/* Keys [j0, j1) of one sequence for nr consecutive query rows of it (row i sees the keys before
 * n0 + i: a prompt chunk's causal mask) with ng query heads each, q [nr][ng][D] (rows ldq apart) of
 * kv head h. Writes, per row i and head g, out[i * ldo + g * (D + 2)] = (m, l, acc[D]) with m = phi
 * (unified) or the partition's max over the row's keys, l = sum e^(s - m), acc = sum e^(s - m) v; a
 * row that sees none of these keys gets l = 0 (and m = -inf when exact). Each key row is read, and
 * converted, once for all nr x ng queries. scores: [nr * ng * (j1 - j0)] scratch; buf: [D]. */
static void attn_partition(const fd_model *M, int64_t layer, int64_t h, const float *q, int64_t ldq, int nr, int ng,
                           int64_t n0, const int64_t *slots, int64_t j0, int64_t j1, int unified, float phi,
                           float *scores, float *buf, float *out, int64_t ldo) {
    const int64_t D = M->head_dim, n = j1 - j0;
    for (int64_t j = 0; j < n; j++) {
        kv_prefetch(M, layer, slots, j0 + j, j1, h, 0);
        const float *k = kv_row(M, layer, slots[j0 + j], h, 0, buf);
        for (int i = first_row(j0 + j, n0); i < nr; i++)
            for (int g = 0; g < ng; g++) scores[(i * ng + g) * n + j] = dot(q + i * ldq + g * D, k, D) * M->scale;
    }
    for (int i = 0; i < nr; i++) {
        const int64_t seen = n0 + i - j0 < n ? n0 + i - j0 : n; /* keys of this partition row i sees */
        for (int g = 0; g < ng; g++) {
            float *o = out + i * ldo + g * (D + 2), *sc = scores + (i * ng + g) * n, m = phi;
            memset(o + 2, 0, sizeof(float) * (size_t)D);
            if (seen <= 0) {
                o[0] = unified ? phi : -INFINITY;
                o[1] = 0.0f;
                continue;
            }
            if (!unified) {
                m = -INFINITY;
                for (int64_t j = 0; j < seen; j++) m = sc[j] > m ? sc[j] : m;
            }
            o[0] = m;
            o[1] = exp_sum(sc, seen, m);
        }
    }
    for (int64_t j = 0; j < n; j++) {
        kv_prefetch(M, layer, slots, j0 + j, j1, h, 1);
        const float *v = kv_row(M, layer, slots[j0 + j], h, 1, buf);
        for (int i = first_row(j0 + j, n0); i < nr; i++)
            for (int g = 0; g < ng; g++) axpy(out + i * ldo + g * (D + 2) + 2, scores[(i * ng + g) * n + j], v, D);
    }
}

/* The exact softmax of one row (one query head over n keys), partition by partition with the online
 * rescale: the fallback of a unified row outside the window. */
static void attn_row_exact(const fd_model *M, int64_t layer, int64_t h, const float *q, const int64_t *slots,
                           int64_t n, int64_t part, float *scores, float *buf, float *tmp, float *y) {
    const int64_t D = M->head_dim;
    float m = -INFINITY, l = 0.0f;
    memset(y, 0, sizeof(float) * (size_t)D);
    for (int64_t j0 = 0; j0 < n; j0 += part) {
        int64_t j1 = j0 + part < n ? j0 + part : n;
        attn_partition(M, layer, h, q, D, 1, 1, n, slots, j0, j1, 0, 0.0f, scores, buf, tmp, 0);
        float mn = tmp[0] > m ? tmp[0] : m, a = expf(m - mn), b = expf(tmp[0] - mn);
        l = l * a + tmp[1] * b;
        for (int64_t i = 0; i < D; i++) y[i] = y[i] * a + tmp[2 + i] * b;
        m = mn;
    }
    for (int64_t i = 0; i < D; i++) y[i] /= l;
}

/* ---------------------------------------------------------------- the step */

typedef struct { /* a step's geometry, fixed across layers */
    int64_t T, part, items, max_k;
    const int64_t *positions, *new_slots, *slots, *lens;
    const int64_t *slot_rows; /* [T]: where each row's key slots start in slots */
    /* attention's work items are (group, kv head, partition); a group is one row, or up to
     * GROUP_ROWS consecutive rows of one prompt chunk, which read each key once between them */
    int64_t groups;
    const int64_t *group_first; /* [groups + 1]: a group's first row */
    const int64_t *group_items; /* [groups + 1]: a group's first item */
    const int64_t *row_base;    /* [T + 1]: a row's first partial (per kv head and partition) */
} fd_geometry;

/* k with base[k] <= i < base[k + 1], for ascending base[0 .. n] */
static int64_t find_range(const int64_t *base, int64_t n, int64_t i) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (base[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

typedef struct { /* the step's buffers, carved from one workspace */
    float *xn, *qkv, *attn, *gu, *act, *dx, *sx, *partials, *thread;
    int8_t *xq;
    int64_t thread_floats;
} fd_buffers;

typedef struct { /* a projection's input: T rows in fp32, and rounded to int8 per 32-block if a part wants it */
    const float *x;
    const int8_t *xq;
    const float *dx, *sx;
} fd_input;

/* floats of one thread's private input (PRIVATE_ROWS rows of up to max_k: fp32, int8, block scales) */
static int64_t private_floats(int64_t max_k) { return PRIVATE_ROWS * (max_k + max_k / 4 + 2 * (max_k / 32 + 1)); }

static int64_t thread_floats(const fd_model *M, int64_t max_k) {
    const int64_t G = M->heads / M->kv_heads;
    return 2 * (int64_t)fd_scale_scratch(max_k) + GROUP_ROWS * G * PART_KEYS + 2 * M->head_dim + (M->head_dim + 2) +
           private_floats(max_k) + 64;
}

/* Bytes of workspace fd_decode needs for T tokens whose longest context is max_len. */
int64_t fd_decode_workspace(const fd_model *M, int64_t T, int64_t max_len, int nthreads) {
    nthreads = fd_team_size(nthreads);
    const int64_t q = M->heads * M->head_dim, kv = M->kv_heads * M->head_dim, G = M->heads / M->kv_heads;
    int64_t max_k = M->hidden > q ? M->hidden : q;
    max_k = max_k > M->inter ? max_k : M->inter;
    const int64_t items = T * M->kv_heads * ((max_len + PART_KEYS - 1) / PART_KEYS);
    int64_t floats = T * (M->hidden + q + 2 * kv + q + 3 * M->inter) + 2 * T * (max_k / 32 + 1) +
                     items * G * (M->head_dim + 2) + (int64_t)nthreads * thread_floats(M, max_k);
    return floats * 4 + T * max_k + 64 * 16;
}

static int wants_q8(const fd_proj *P) {
    int q8 = 0;
    for (int i = 0; i < P->nparts; i++) q8 |= P->part[i].q8;
    return q8;
}

/* y = P a for T rows of K (this thread's share; every thread calls it) */
static void proj(fd_member *me, const fd_proj *P, const fd_input *a, int64_t T, int64_t K, float *y, int64_t ldy,
                 int add, float *db, float *mb) {
    int64_t off = 0;
    for (int i = 0; i < P->nparts; i++) {
        const fd_part *p = &P->part[i];
        if (p->q8 == Q8_INTERLEAVED)
            fd_linear_i8_tiles(me, p->fmt, a->xq, a->dx, a->sx, T, K, p->qs, p->d, p->m, p->bias, y + off, ldy, add,
                               p->n);
        else if (p->q8)
            fd_linear_q8_tiles(me, p->fmt, a->xq, a->dx, a->sx, T, K, p->qs, p->d, p->m, p->bias, y + off, ldy, add,
                               p->n, db, mb);
        else
            fd_linear_tiles(me, p->fmt, a->x, K, T, K, p->qs, p->d, p->m, p->bias, y + off, ldy, add, p->n, db, mb);
        off += p->n;
    }
}

/* for (i = lo; i < hi; i++) over [0, n), shared among the team, then its barrier */
#define TEAM_FOR(me, n, chunk, i)                                                                   \
    for (int64_t lo_, hi_, once_ = (fd_loop_begin(me), 1); once_; once_ = 0, fd_loop_end(me))     \
        while (fd_loop_next(me, n, chunk, &lo_, &hi_))                                              \
            for (int64_t i = lo_; i < hi_; i++)

static void norm_rows(fd_member *me, const float *x, const float *w, float *y, int64_t T, int64_t n, float eps) {
    TEAM_FOR(me, T, 1, t) rms_norm_row(x + t * n, w, y + t * n, n, eps);
}

#define IN_AS_IS 0 /* what prepare() makes of its rows */
#define IN_NORM 1  /* RMSNorm by w */
#define IN_SWIGLU 2 /* silu(gate) * up of rows [gate | up], 2K wide */

/* The input of a projection of K features from T rows of src, made as ``how`` says. With at most
 * PRIVATE_ROWS rows every thread makes its own copy in tb (no barrier); else the team shares the
 * work, into dst (fp32) and the step's int8 buffers. */
static fd_input prepare(fd_member *me, const fd_buffers *B, int how, const float *src, const float *w, float eps,
                        int64_t T, int64_t K, int q8, float *tb, float *dst) {
    if (T <= PRIVATE_ROWS) {
        float *x = how == IN_AS_IS ? (float *)src : tb;
        int8_t *xq = (int8_t *)(tb + PRIVATE_ROWS * K);
        float *dx = (float *)(xq + PRIVATE_ROWS * K), *sx = dx + PRIVATE_ROWS * (K / 32 + 1);
        for (int64_t t = 0; t < T; t++) {
            if (how == IN_NORM) rms_norm_row(src + t * K, w, x + t * K, K, eps);
            if (how == IN_SWIGLU) silu_mul(src + t * 2 * K, src + t * 2 * K + K, x + t * K, K);
        }
        if (q8) fd_q8_quantize_rows(x, K, 0, T, K, xq, dx, sx);
        return (fd_input){x, xq, dx, sx};
    }
    if (how == IN_NORM) norm_rows(me, src, w, dst, T, K, eps);
    if (how == IN_SWIGLU) {
        TEAM_FOR(me, T * 8, 1, i) { /* eight slices per row: work for every thread */
            const int64_t t = i / 8, c0 = K * (i % 8) / 8, c1 = K * (i % 8 + 1) / 8;
            silu_mul(src + t * 2 * K + c0, src + t * 2 * K + K + c0, dst + t * K + c0, c1 - c0);
        }
    }
    const float *x = how == IN_AS_IS ? src : dst;
    if (q8) {
        const int n = me->team->n;
        fd_q8_quantize_rows(x, K, T * me->tid / n, T * (me->tid + 1) / n, K, B->xq, B->dx, B->sx);
        fd_barrier(me);
    }
    return (fd_input){x, B->xq, B->dx, B->sx};
}

/* per-head q/k norm and RoPE on the step's q and k (in the qkv rows), then K and V into the cache */
static void rope_and_store(fd_member *me, const fd_model *M, int64_t layer, const fd_layer *L, const fd_geometry *S,
                           float *qkv) {
    const int64_t H = M->heads, KVH = M->kv_heads, D = M->head_dim, half = D / 2;
    const int64_t width = (H + 2 * KVH) * D, heads = H + 2 * KVH;
    TEAM_FOR(me, S->T * heads, 4, i) {
        const int64_t t = i / heads, h = i % heads;
        float *x = qkv + t * width + h * D;
        if (h < H + KVH) {
            if (L->qk_norm) rms_norm_row(x, L->qk_norm + h * D, x, D, M->eps);
            const float *c = M->cos + S->positions[t] * half, *s = M->sin + S->positions[t] * half;
            for (int64_t j = 0; j < half; j++) {
                float a = x[j], b = x[j + half];
                x[j] = a * c[j] - b * s[j];
                x[j + half] = b * c[j] + a * s[j];
            }
        }
        if (h >= H) kv_store(M, layer, S->new_slots[t], (h - H) % KVH, h < H + KVH ? 0 : 1, x);
    }
}

/* Row t, query head hq: its partials merged (the exact rescale, or unified's plain sum) into
 * B->attn; a unified row whose sum left the safe window is recomputed exactly (returns 1 then). */
static int finish_row(const fd_model *M, int64_t layer, const fd_geometry *S, const fd_buffers *B, int64_t t,
                      int64_t hq, float *tb) {
    const int64_t H = M->heads, KVH = M->kv_heads, D = M->head_dim, G = H / KVH, h = hq / G, g = hq % G;
    const int64_t width = (H + 2 * KVH) * D, np = (S->row_base[t + 1] - S->row_base[t]) / KVH;
    const int unified = M->unified;
    const float *first = B->partials + (S->row_base[t] + h * np) * G * (D + 2) + g * (D + 2);
    float *y = B->attn + t * H * D + hq * D, m = -INFINITY, l = 0.0f;
    for (int64_t p = 0; p < np; p++) m = first[p * G * (D + 2)] > m ? first[p * G * (D + 2)] : m;
    memset(y, 0, sizeof(float) * (size_t)D);
    for (int64_t p = 0; p < np; p++) {
        const float *o = first + p * G * (D + 2);
        const float a = unified ? 1.0f : expf(o[0] - m); /* exact: the synchronised rescale */
        l += o[1] * a;
        axpy(y, a, o + 2, D);
    }
    const int64_t n = S->lens[t];
    if (unified && !(l >= (float)n * expf(M->win_lo) && l <= expf(M->win_hi))) { /* NaN fails too */
        float *scores = tb, *buf = tb + GROUP_ROWS * G * PART_KEYS, *tmp = buf + D;
        attn_row_exact(M, layer, h, B->qkv + t * width + hq * D, S->slots + S->slot_rows[t], n, S->part, scores, buf,
                       tmp, y);
        return 1;
    }
    for (int64_t i = 0; i < D; i++) y[i] /= l;
    return 0;
}

/* Every (group, kv head, partition) item, then every row's merge. When each row's keys fit one
 * partition, the thread that ran an item merges its rows at once: one barrier less per layer. */
static void attention(fd_member *me, const fd_model *M, int64_t layer, const fd_geometry *S, const fd_buffers *B,
                      float *tb, atomic_llong *fallbacks) {
    const int64_t H = M->heads, KVH = M->kv_heads, D = M->head_dim, G = H / KVH;
    const int64_t width = (H + 2 * KVH) * D;
    const int unified = M->unified, one_part = S->row_base[S->T] == S->T * KVH;
    const float phi = unified ? M->phi[layer] : 0.0f;
    float *scores = tb, *buf = tb + GROUP_ROWS * G * PART_KEYS;
    int64_t fb = 0;
    TEAM_FOR(me, S->items, 1, it) {
        const int64_t gi = find_range(S->group_items, S->groups, it), t = S->group_first[gi];
        const int nr = (int)(S->group_first[gi + 1] - t);
        const int64_t np = (S->group_items[gi + 1] - S->group_items[gi]) / KVH, k = it - S->group_items[gi];
        const int64_t h = k / np, p = k % np, n = S->lens[t + nr - 1];
        const int64_t j0 = p * S->part, j1 = j0 + S->part < n ? j0 + S->part : n;
        attn_partition(M, layer, h, B->qkv + t * width + h * G * D, width, nr, (int)G, S->lens[t],
                       S->slots + S->slot_rows[t], j0, j1, unified, phi, scores, buf,
                       B->partials + (S->row_base[t] + h * np + p) * G * (D + 2), KVH * np * G * (D + 2));
        if (one_part)
            for (int64_t r = t; r < t + nr; r++)
                for (int64_t g = 0; g < G; g++) fb += finish_row(M, layer, S, B, r, h * G + g, tb);
    }
    if (!one_part) TEAM_FOR(me, S->T * H, 1, r) fb += finish_row(M, layer, S, B, r / H, r % H, tb);
    atomic_fetch_add(fallbacks, fb);
}

static void carve(const fd_model *M, const fd_geometry *S, void *ws, int nt, fd_buffers *B) {
    const int64_t T = S->T, q = M->heads * M->head_dim, kv = M->kv_heads * M->head_dim;
    const int64_t G = M->heads / M->kv_heads;
    float *f = (float *)ws;
    B->xn = f, f += T * M->hidden;
    B->qkv = f, f += T * (q + 2 * kv);
    B->attn = f, f += T * q;
    B->gu = f, f += T * 2 * M->inter;
    B->act = f, f += T * M->inter;
    B->dx = f, f += T * (S->max_k / 32 + 1);
    B->sx = f, f += T * (S->max_k / 32 + 1);
    B->partials = f, f += S->row_base[S->T] * G * (M->head_dim + 2);
    B->thread_floats = thread_floats(M, S->max_k);
    B->thread = f, f += (int64_t)nt * B->thread_floats;
    B->xq = (int8_t *)f;
}

/* every layer, then the final norm: what each member of the team runs */
static void run_layers(fd_member *me, const fd_model *M, const fd_geometry *S, const fd_buffers *B, float *x,
                       atomic_llong *fallbacks) {
    const int64_t T = S->T, q = M->heads * M->head_dim, width = (M->heads + 2 * M->kv_heads) * M->head_dim;
    float *tb = B->thread + me->tid * B->thread_floats;
    float *db = tb, *mb = tb + fd_scale_scratch(S->max_k), *pv = mb + fd_scale_scratch(S->max_k);
    float *at = pv + private_floats(S->max_k);
    const float eps = M->eps;
    for (int64_t l = 0; l < M->num_layers; l++) {
        const fd_layer *L = &M->layers[l];
        fd_input a = prepare(me, B, IN_NORM, x, L->attn_norm, eps, T, M->hidden, wants_q8(&L->qkv), pv, B->xn);
        proj(me, &L->qkv, &a, T, M->hidden, B->qkv, width, 0, db, mb);
        rope_and_store(me, M, l, L, S, B->qkv);
        attention(me, M, l, S, B, at, fallbacks);
        a = prepare(me, B, IN_AS_IS, B->attn, NULL, eps, T, q, wants_q8(&L->o), pv, NULL);
        proj(me, &L->o, &a, T, q, x, M->hidden, 1, db, mb);
        a = prepare(me, B, IN_NORM, x, L->mlp_norm, eps, T, M->hidden, wants_q8(&L->gate_up), pv, B->xn);
        proj(me, &L->gate_up, &a, T, M->hidden, B->gu, 2 * M->inter, 0, db, mb);
        a = prepare(me, B, IN_SWIGLU, B->gu, NULL, eps, T, M->inter, wants_q8(&L->down), pv, B->act);
        proj(me, &L->down, &a, T, M->inter, x, M->hidden, 1, db, mb);
    }
    norm_rows(me, x, M->norm, x, T, M->hidden, M->eps);
}

/* Runs every layer and the final norm for T query rows, each one token of some sequence: decodes,
 * prompt chunks (a chunk's rows share their sequence's key slots, each seeing its own prefix), or
 * drafted tokens. Every layer writes all T rows' K and V before any row attends, so a row sees the
 * rows before it in its sequence. x [T, hidden]: the embeddings in, the final hidden states out.
 * positions, new_slots, lens [T]: each row's position, the cache slot its K and V go to, its context
 * length (itself included); row t's key slots are slots[slot_rows[t] .. slot_rows[t] + lens[t]) of
 * the nslots in slots. workspace: fd_decode_workspace bytes for (T, max lens). stats[2] += rows
 * checked, unified rows recomputed exactly. Returns 0, or -1 on bad arguments. */
int fd_decode(const fd_model *M, int64_t T, float *x, const int64_t *positions, const int64_t *new_slots,
              const int64_t *slots, int64_t nslots, const int64_t *slot_rows, const int64_t *lens, void *workspace,
              int64_t workspace_bytes, int64_t *stats, int nthreads) {
    if (!M || T < 1 || !x || M->heads % M->kv_heads || M->head_dim % 2) return -1;
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; t++) {
        if (lens[t] < 1 || slot_rows[t] < 0 || slot_rows[t] + lens[t] > nslots) return -1;
        max_len = lens[t] > max_len ? lens[t] : max_len;
    }
    const int nt = fd_team_size(nthreads);
    if (fd_decode_workspace(M, T, max_len, nt) > workspace_bytes) return -1;
    const int64_t q = M->heads * M->head_dim;
    fd_geometry S = {T, 0, 0, 0, positions, new_slots, slots, lens, slot_rows, 0, NULL, NULL, NULL};
    S.max_k = M->hidden > q ? M->hidden : q;
    S.max_k = S.max_k > M->inter ? S.max_k : M->inter;
    int64_t group_first[T + 1], group_items[T + 1], row_base[T + 1];
    for (int64_t t = 0; t < T;) { /* consecutive rows of one chunk: same slots, each one key further */
        int64_t e = t + 1;
        while (e < T && e - t < GROUP_ROWS && slot_rows[e] == slot_rows[t] && lens[e] == lens[e - 1] + 1) e++;
        group_first[S.groups++] = t;
        t = e;
    }
    group_first[S.groups] = T;
    S.part = PART_KEYS;
    group_items[0] = row_base[0] = 0;
    for (int64_t g = 0; g < S.groups; g++) {
        const int64_t per_row = M->kv_heads * ((lens[group_first[g + 1] - 1] + S.part - 1) / S.part);
        group_items[g + 1] = group_items[g] + per_row;
        for (int64_t t = group_first[g]; t < group_first[g + 1]; t++) row_base[t + 1] = row_base[t] + per_row;
    }
    S.items = group_items[S.groups];
    S.group_first = group_first, S.group_items = group_items, S.row_base = row_base;
    fd_buffers B;
    carve(M, &S, workspace, nt, &B);
    atomic_llong fallbacks;
    atomic_init(&fallbacks, 0);
    fd_team team;
    fd_team_init(&team, nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        fd_team solo;
        fd_member me = fd_join(&team, &solo);
        if (me.team) run_layers(&me, M, &S, &B, x, &fallbacks);
    }
    if (stats) {
        stats[0] += M->unified ? M->num_layers * T * M->heads : 0;
        stats[1] += atomic_load(&fallbacks);
    }
    return 0;
}
