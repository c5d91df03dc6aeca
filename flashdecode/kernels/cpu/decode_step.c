/* A whole model step natively: every layer for a batch of query rows (single-token decodes, prompt
 * chunks and drafted tokens alike: each row is one token with its own context), in one OpenMP
 * parallel region, operation for operation what models/decoder.py's DecoderLayer runs (RMSNorm, QKV
 * projection, optional per-head q/k norm, RoPE, paged KV cache write, attention over the paged
 * cache, output projection and residual, RMSNorm, gate/up projection, SwiGLU or GeGLU, down
 * projection and residual; then the final norm). Gemma's differences are per-layer data: norms of
 * the attention and MLP outputs before their residual adds, soft-capped scores, a sliding window
 * (the layer reads only its window's keys) and the layer's own RoPE tables.
 *
 * At batch 1 a layer is ~15 operations of a few microseconds each: launched one by one from Python,
 * each pays interpreter, dispatch and thread-pool wake-up costs larger than its work. Here threads
 * meet at barriers instead, and K and V are read in place from the paged cache (no gather).
 *
 * Attention (FlashDecoding++ section 3, the CPU form of layers/attention.py): the keys of each
 * (sequence, kv head) are split into partitions that threads run independently, each producing its
 * partial sum_j e^(s_j - m) v_j and sum_j e^(s_j - m). Exact mode takes m as the partition's own
 * max and merges partitions with the synchronised rescale e^(m_p - max_p m_p) (Flash-Decoding);
 * unified mode takes m = phi, the layer's calibrated unified max, and the partials are simply added.
 * A unified row whose sum leaves the safe window (layers/attention.py derives it) is recomputed
 * with the exact softmax, so the result is exact either way; such rows are counted. Within a
 * partition every query that reads a key block (a chunk's rows times the kv head's query heads) runs
 * through it together, so that prefill's many queries keep independent FMA chains in flight
 * (throughput-bound, 512-bit lanes where built for AVX-512), while each query's sums keep the one
 * order a lone decode row gives them.
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
/* Steps of at most this many rows prepare a projection's input (norm, gated activation, int8
 * rounding) in every thread at once, each its own copy: the work is a few microseconds, less than the barrier
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

#define ACT_SILU 0
#define ACT_GELU_TANH 1

typedef struct {
    const float *attn_norm, *mlp_norm, *qk_norm; /* qk_norm: [heads + kv_heads, head_dim] or NULL */
    const float *attn_post_norm, *mlp_post_norm; /* norms of the attention / MLP output, or NULL */
    const float *cos, *sin; /* this layer's RoPE tables [max_position, head_dim / 2] */
    int64_t window;         /* a sliding layer's keys per row (its own included); 0: every key */
    float softcap;          /* scores s become softcap * tanh(s / softcap); 0: not capped */
    int32_t pad;
    fd_proj qkv, o, gate_up, down;
    const struct fd_moe *moe; /* a mixture of experts in place of gate_up and down, or NULL */
} fd_layer;

/* A layer's mixture of experts (layers/moe.py's SparseMoE): each row runs the top_k of its router's
 * softmax, plus an optional shared expert every row runs, scaled by sigmoid(x . shared_gate). */
typedef struct fd_moe {
    int32_t experts, top_k, renormalize, pad; /* renormalize: the top_k weights divided by their sum */
    int64_t inter, shared_inter;              /* an expert's and the shared expert's width (0: none) */
    /* the router as stored, fp32 [experts, hidden] (llama.cpp never quantizes it), or NULL: router */
    const float *router_f32;
    const float *shared_gate;      /* [hidden] */
    const fd_proj *gate_up, *down; /* [experts] each: views of the stacked expert planes */
    fd_proj router, shared_gate_up, shared_down;
} fd_moe;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, num_layers, num_slots;
    float eps, scale;     /* RMSNorm epsilon; attention's softmax scale */
    int32_t kv_dtype;     /* KV_* */
    int32_t unified;      /* 0: exact softmax; 1: unified max phi[layer] */
    int32_t act, pad;     /* the MLP's gate activation: ACT_* */
    const float *phi;     /* [num_layers] */
    float win_lo, win_hi; /* the safe window */
    const float *norm;    /* final norm weight [hidden] */
    void *kv;             /* [num_layers, num_slots, kv_heads, 2, head_dim] of kv_dtype */
    const fd_layer *layers;
    /* Tensor parallelism: this rank holds its shard (its heads, KV heads and share of the MLP), so o
     * and down give partial sums that all_reduce(buf, n, ctx) sums over the ranks in place (Megatron's
     * two all-reduces a layer). NULL: one process. */
    void (*all_reduce)(float *buf, int64_t n, void *ctx);
    void *reduce_ctx;
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

/* y = act(g) * u with act(g) = g sigmoid(a): a = g for SiLU; a = 2 sqrt(2 / pi) (g + 0.044715 g^3) for
 * the tanh-approximated GELU, since its 0.5 g (1 + tanh(z)) is g sigmoid(2 z) */
static void gated_act(const float *g, const float *u, float *y, int64_t n, int act) {
    const float c = 1.5957691216057308f, k = 0.044715f; /* 2 sqrt(2 / pi) */
    int64_t i = 0;
#if defined(__AVX2__)
    const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f), vc = _mm256_set1_ps(c),
                 vk = _mm256_set1_ps(k);
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i), a = gv;
        if (act == ACT_GELU_TANH)
            a = _mm256_mul_ps(vc, _mm256_fmadd_ps(_mm256_mul_ps(vk, gv), _mm256_mul_ps(gv, gv), gv));
        __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_xor_ps(a, neg))));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) {
        const float a = act == ACT_GELU_TANH ? c * (k * g[i] * (g[i] * g[i]) + g[i]) : g[i];
        y[i] = g[i] / (1.0f + expf(-a)) * u[i];
    }
}

#if defined(__AVX2__)
/* tanh in fp32 (Cephes' tanhf: an odd polynomial below 0.625, 1 - 2 / (e^2|x| + 1) above; under 2
 * ulp); NaN stays NaN */
INLINE __m256 tanh256(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    const __m256 ax = _mm256_andnot_ps(sign, x), s = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
    p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(2.06390887954e-2f));
    p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(-5.37397155531e-2f));
    p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(1.33314422036e-1f));
    p = _mm256_fmadd_ps(p, s, _mm256_set1_ps(-3.33332819422e-1f));
    const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, s), x, x);
    const __m256 e = exp256(_mm256_add_ps(ax, ax));
    __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
    big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
    const __m256 r = _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
    return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

/* x[i] = cap * tanh(x[i] / cap): Gemma 2's soft-capped scores, in transformers' order */
static void soft_cap(float *x, int64_t n, float cap) {
    int64_t i = 0;
#if defined(__AVX2__)
    const __m256 vc = _mm256_set1_ps(cap);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(tanh256(_mm256_div_ps(_mm256_loadu_ps(x + i), vc)), vc));
#endif
    for (; i < n; i++) x[i] = tanhf(x[i] / cap) * cap;
}

/* ---------------------------------------------------------------- sampling */

#define SAMPLE_BLOCK 64 /* tokens a partial sum covers: the scan walks the partials, then one block */

/* x[i] = e^(x[i] / t - m) for a row whose max of x / t is m; bsum[b] = the sum over block b */
static void sample_exps(float *x, int64_t V, float t, float m, float *bsum) {
    for (int64_t b0 = 0; b0 < V; b0 += SAMPLE_BLOCK) {
        const int64_t b1 = b0 + SAMPLE_BLOCK < V ? b0 + SAMPLE_BLOCK : V;
        int64_t i = b0;
        float s = 0.0f;
#if defined(__AVX2__)
        __m256 acc = _mm256_setzero_ps();
        const __m256 vt = _mm256_set1_ps(t), vm = _mm256_set1_ps(m);
        for (; i + 8 <= b1; i += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vt), vm));
            _mm256_storeu_ps(x + i, e);
            acc = _mm256_add_ps(acc, e);
        }
        s = hsum256(acc);
#endif
        for (; i < b1; i++) {
            x[i] = expf(x[i] / t - m);
            s += x[i];
        }
        bsum[b0 / SAMPLE_BLOCK] = s;
    }
}

static float row_max(const float *x, int64_t V) {
    int64_t i = 0;
    float m = -INFINITY;
#if defined(__AVX2__)
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= V; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
#endif
    for (; i < V; i++) m = x[i] > m || x[i] != x[i] ? x[i] : m;
    return m;
}

/* For each row r of x [R, V] (rows ld apart; overwritten): the token where softmax(x / temps[r])'s
 * cumulative distribution first exceeds u[r] * its total, u[r] in [0, 1): exponentials and partial
 * sums per block of tokens in one pass, then a walk over the partials and one block, where torch takes
 * several passes and temporaries. A token of probability 0 (a masked logit: e^-inf is exactly 0 here)
 * is never picked: the running sum does not grow there. Returns 0, or -1 for a row with no finite
 * logit, a NaN, or a temperature that is not positive. */
int fd_sample(float *x, int64_t ld, int64_t R, int64_t V, const float *temps, const float *u, int64_t *out) {
    float bsum[(V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK];
    for (int64_t r = 0; r < R; r++) {
        float *row = x + r * ld;
        const float t = temps[r], xm = row_max(row, V);
        if (!(t > 0.0f) || !(xm > -INFINITY) || xm != xm || xm == INFINITY) return -1;
        const int64_t nb = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK;
        sample_exps(row, V, t, xm / t, bsum);
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) total += bsum[b];
        const float target = u[r] * total;
        int64_t pick = -1, b = 0;
        float c = 0.0f;
        while (b < nb && c + bsum[b] <= target) c += bsum[b++];
        if (b < nb) /* the draw lies in block b: walk its tokens */
            for (int64_t i = b * SAMPLE_BLOCK; i < V && i < (b + 1) * SAMPLE_BLOCK && pick < 0; i++) {
                c += row[i];
                if (c > target) pick = i;
            }
        /* rounding left the walk short of the draw (u * total rounded up to the total, or a block's
         * tokens summed one by one falling below its partial): the last token that can be drawn there */
        for (int64_t i = (b < nb ? (b + 1) * SAMPLE_BLOCK : V) - 1; pick < 0 && i >= 0; i--)
            if (i < V && row[i] > 0.0f) pick = i;
        out[r] = pick;
    }
    return 0;
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

/* one past the last of nr such rows that sees key j, where row i sees only the keys from n0 + i - w on
 * (a window of w keys; w = 0: every key) */
INLINE int end_row(int64_t j, int64_t n0, int64_t w, int nr) {
    const int64_t e = j + w - n0 + 1;
    return !w || e >= nr ? nr : (e < 0 ? 0 : (int)e);
}

/* the first key that a row seeing the n keys before it reads under a window of w keys (0: all) */
INLINE int64_t first_key(int64_t w, int64_t n) { return w && n > w ? n - w : 0; }

/* Keys are read KV_BLOCK at a time from block boundaries fixed from the partition's start: a block's
 * K and V rows are converted once for every query that reads them, its dot products run as
 * independent FMA chains (per key, and per query beside it), and the queries' outputs stay in
 * registers across the block. */
#define KV_BLOCK 8

/* rows[b] = key j + b's K or V row (which) as fp32, for the nk keys of a block; buf: [KV_BLOCK * D] */
static void kv_block(const fd_model *M, int64_t layer, const int64_t *slots, int64_t j, int64_t end, int nk,
                     int64_t h, int which, float *buf, const float **rows) {
    for (int b = 0; b < nk; b++) {
        kv_prefetch(M, layer, slots, j + b, end, h, which);
        rows[b] = kv_row(M, layer, slots[j + b], h, which, buf + b * M->head_dim);
    }
}

/* t[c] = q . r[c] for four rows of D floats */
INLINE void dot4(const float *q, const float *const *r, int64_t D, float *t) {
    int64_t d = 0;
#if defined(__AVX2__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    for (; d + 8 <= D; d += 8) {
        const __m256 x = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r0 + d), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r1 + d), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r2 + d), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r3 + d), a3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(t, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
    t[0] = t[1] = t[2] = t[3] = 0.0f;
#endif
    for (; d < D; d++)
        for (int c = 0; c < 4; c++) t[c] += q[d] * r[c][d];
}

#if defined(__AVX512F__)
/* 512-bit lanes: a key's sum runs in 16 lane chains (lane l adds d = l, l + 16, ...), then one tree over
 * the lanes. Partial-sum vectors are summed 16 (or 8) at once by four levels that each add lanes i and
 * i + 8, then i + 4, i + 2, i + 1: every vector gets the same tree wherever it sits in the batch, and
 * the batch costs 2 shuffles and an add per pair of vectors instead of a reduction per key. */
INLINE __m512 lanes_half(__m512 a, __m512 b, int level) {
    switch (level) {
    case 0: /* [a.lo256 + a.hi256, b.lo256 + b.hi256] */
        return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    case 1: /* 128-bit quarters: [a.q0 + a.q1, a.q2 + a.q3, b.q0 + b.q1, b.q2 + b.q3] */
        return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    case 2: /* within each quarter: pairs 2 apart */
        return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    default: /* neighbours */
        return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    }
}

/* lane c = the sum of v[c]'s lanes, for n = 8 or 16 vectors (v is overwritten); n = 8 pairs its
 * last level with itself, so lanes 0..7 hold the same bits n = 16 would give */
INLINE __m512 lane_sums(__m512 *v, int n) {
    for (int i = 0; i < n / 2; i++) v[i] = lanes_half(v[2 * i], v[2 * i + 1], 0);
    for (int i = 0; i < n / 4; i++) v[i] = lanes_half(v[2 * i], v[2 * i + 1], 1);
    for (int i = 0; i < n / 8; i++) v[i] = lanes_half(v[2 * i], v[2 * i + 1], 2);
    const __m512 r = lanes_half(v[0], n == 16 ? v[1] : v[0], 3); /* lane 4r + s holds v[4s + r] */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

/* the lanes [d, d + 16) of a row of D floats that exist */
INLINE __mmask16 lanes_from(int64_t D, int64_t d) {
    const int64_t left = D - d;
    return left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1));
}

/* lanes 8 c + b = q[c] . k[b] for nq = 1 or 2 queries and the KV_BLOCK rows of a block: 8 nq independent
 * FMA chains, each key row loaded once for both queries */
INLINE __m512 dot_block(const float *const *q, int nq, const float *const *k, int64_t D) {
    __m512 a[2 * KV_BLOCK];
    for (int i = 0; i < 2 * KV_BLOCK; i++) a[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = lanes_from(D, d);
        const __m512 x0 = _mm512_maskz_loadu_ps(m, q[0] + d), x1 = _mm512_maskz_loadu_ps(m, q[nq - 1] + d);
        for (int b = 0; b < KV_BLOCK; b++) {
            const __m512 r = _mm512_maskz_loadu_ps(m, k[b] + d);
            a[b] = _mm512_fmadd_ps(x0, r, a[b]);
            if (nq == 2) a[KV_BLOCK + b] = _mm512_fmadd_ps(x1, r, a[KV_BLOCK + b]);
        }
    }
    return lane_sums(a, nq * KV_BLOCK);
}
#endif

/* s[c][b] = scale * q[c] . k[b] for nq queries and the nk <= KV_BLOCK rows of a block. Each key's sum
 * runs in the same order wherever it falls in the block (a short block repeats its last row) and
 * whatever queries share the call, so its score has the same bits in any step: a row's attention must
 * not depend on the other rows beside it (PART_KEYS). */
INLINE void block_scores(const float *const *q, int nq, const float **k, int nk, int64_t D, float scale,
                         float *const *s) {
    const float *r[KV_BLOCK];
    for (int b = 0; b < KV_BLOCK; b++) r[b] = k[b < nk ? b : nk - 1];
#if defined(__AVX512F__)
    const __mmask8 m = (__mmask8)((1u << nk) - 1);
    for (int c = 0; c < nq; c += 2) { /* query pairs fill both FMA pipes */
        const __m512 t = _mm512_mul_ps(nq - c >= 2 ? dot_block(q + c, 2, r, D) : dot_block(q + c, 1, r, D),
                                       _mm512_set1_ps(scale));
        _mm256_mask_storeu_ps(s[c], m, _mm512_castps512_ps256(t));
        if (nq - c >= 2) _mm256_mask_storeu_ps(s[c + 1], m, _mm512_extractf32x8_ps(t, 1));
    }
#else
    for (int c = 0; c < nq; c++) {
        float t[KV_BLOCK];
        dot4(q[c], r, D, t);
        if (nk > 4) dot4(q[c], r + 4, D, t + 4);
        for (int b = 0; b < nk; b++) s[c][b] = t[b] * scale;
    }
#endif
}

/* y += sum_b p[b] v[b] over the rows [b0, b1) of a block, key after key as axpy would */
INLINE void block_axpy(float *y, const float *p, const float **v, int b0, int b1, int64_t D) {
    int64_t d = 0;
#if defined(__AVX2__)
    for (; d + 32 <= D; d += 32) {
        __m256 y0 = _mm256_loadu_ps(y + d), y1 = _mm256_loadu_ps(y + d + 8);
        __m256 y2 = _mm256_loadu_ps(y + d + 16), y3 = _mm256_loadu_ps(y + d + 24);
        for (int b = b0; b < b1; b++) {
            const __m256 w = _mm256_set1_ps(p[b]);
            y0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[b] + d), y0);
            y1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[b] + d + 8), y1);
            y2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[b] + d + 16), y2);
            y3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v[b] + d + 24), y3);
        }
        _mm256_storeu_ps(y + d, y0), _mm256_storeu_ps(y + d + 8, y1);
        _mm256_storeu_ps(y + d + 16, y2), _mm256_storeu_ps(y + d + 24, y3);
    }
    for (; d + 8 <= D; d += 8) {
        __m256 y0 = _mm256_loadu_ps(y + d);
        for (int b = b0; b < b1; b++) y0 = _mm256_fmadd_ps(_mm256_set1_ps(p[b]), _mm256_loadu_ps(v[b] + d), y0);
        _mm256_storeu_ps(y + d, y0);
    }
#endif
    for (; d < D; d++)
        for (int b = b0; b < b1; b++) y[d] += p[b] * v[b][d];
}

#if defined(__AVX512F__)
#define AXPY_QUERIES 4 /* queries a V row is loaded for: 4 x 4 accumulators of 16 lanes, 64 of D at a time */

/* block_axpy for nq <= AXPY_QUERIES queries over the same keys: each y[c] element still adds its keys
 * one after another (the same bits as alone), but the nq x 4 chains run side by side */
INLINE void block_axpy_n(float *const *y, const float *const *p, int nq, const float **v, int b0, int b1, int64_t D) {
    for (int64_t d = 0; d < D; d += 64) {
        __mmask16 m[4];
        __m512 acc[AXPY_QUERIES][4];
        for (int u = 0; u < 4; u++) m[u] = lanes_from(D, d + 16 * u);
        for (int c = 0; c < nq; c++)
            for (int u = 0; u < 4; u++) acc[c][u] = _mm512_maskz_loadu_ps(m[u], y[c] + d + 16 * u);
        for (int b = b0; b < b1; b++) {
            __m512 r[4];
            for (int u = 0; u < 4; u++) r[u] = _mm512_maskz_loadu_ps(m[u], v[b] + d + 16 * u);
            for (int c = 0; c < nq; c++) {
                const __m512 w = _mm512_set1_ps(p[c][b]);
                for (int u = 0; u < 4; u++) acc[c][u] = _mm512_fmadd_ps(w, r[u], acc[c][u]);
            }
        }
        for (int c = 0; c < nq; c++)
            for (int u = 0; u < 4; u++) _mm512_mask_storeu_ps(y[c] + d + 16 * u, m[u], acc[c][u]);
    }
}
#endif

/* y[c] += sum_b p[c][b] v[b] over the rows [b0, b1) of a block for nq queries */
INLINE void block_axpy_queries(float *const *y, const float *const *p, int nq, const float **v, int b0, int b1,
                               int64_t D) {
#if defined(__AVX512F__)
    for (int c = 0; c < nq; c += AXPY_QUERIES) {
        const int n = nq - c < AXPY_QUERIES ? nq - c : AXPY_QUERIES;
        /* constant counts, so that each form keeps its accumulators in registers */
        if (n == 4) block_axpy_n(y + c, p + c, 4, v, b0, b1, D);
        else if (n == 3) block_axpy_n(y + c, p + c, 3, v, b0, b1, D);
        else if (n == 2) block_axpy_n(y + c, p + c, 2, v, b0, b1, D);
        else block_axpy_n(y + c, p + c, 1, v, b0, b1, D);
    }
#else
    for (int c = 0; c < nq; c++) block_axpy(y[c], p[c], v, b0, b1, D);
#endif
}

/* exact mode between its passes: each row's scores over its keys [a, b) become e^(s - m), m their max */
static void exact_weights(const fd_layer *L, int nr, int ng, const int64_t *a, const int64_t *b, int64_t n,
                          float *scores, float *out, int64_t ldo, int64_t D) {
    for (int i = 0; i < nr; i++)
        for (int g = 0; b[i] > a[i] && g < ng; g++) {
            float *o = out + i * ldo + g * (D + 2), *sc = scores + (i * ng + g) * n, m = -INFINITY;
            if (L->softcap) soft_cap(sc + a[i], b[i] - a[i], L->softcap);
            for (int64_t j = a[i]; j < b[i]; j++) m = sc[j] > m ? sc[j] : m;
            o[0] = m;
            o[1] = exp_sum(sc + a[i], b[i] - a[i], m);
        }
}

/* One block of keys [j, j + nk) of one kv head for its nr x ng queries, in attn_partition's pass (and
 * layout: q [nr][ng][D] rows ldq apart, scores [nr * ng][n] from key j, out (m, l, acc) rows ldo
 * apart). The queries of every row that sees some of the block run together: scores in query pairs,
 * the V products for the rows that see the same keys of it (all of them but at a causal or window
 * edge) at once, so that independent FMA chains fill the pipes; each query's sums keep their order. */
static void attend_block(const fd_layer *L, const float *q, int64_t ldq, int nr, int ng, const int64_t *a,
                         const int64_t *b, int64_t j, int nk, const float **k, const float **v, int pass, float phi,
                         float scale, float *scores, int64_t n, float *out, int64_t ldo, int64_t D) {
    const float *qs[GROUP_ROWS * ng];
    float *ss[GROUP_ROWS * ng], *ys[GROUP_ROWS * ng];
    int lo[GROUP_ROWS], hi[GROUP_ROWS], row[GROUP_ROWS * ng], nq = 0;
    for (int i = 0; i < nr; i++) {
        lo[i] = (int)((a[i] > j ? a[i] : j) - j), hi[i] = (int)((b[i] < j + nk ? b[i] : j + nk) - j);
        for (int g = 0; hi[i] > lo[i] && g < ng; g++, nq++)
            qs[nq] = q + i * ldq + g * D, ss[nq] = scores + (i * ng + g) * n, ys[nq] = out + i * ldo + g * (D + 2) + 2,
            row[nq] = i;
    }
    if (pass != 1) block_scores(qs, nq, k, nk, D, scale, ss);
    for (int c = 0; pass == 2 && c < nq; c++) {
        const int r = row[c];
        if (L->softcap) soft_cap(ss[c] + lo[r], hi[r] - lo[r], L->softcap);
        ys[c][-1] += exp_sum(ss[c] + lo[r], hi[r] - lo[r], phi);
    }
    for (int c = 0, e; pass != 0 && c < nq; c = e) { /* runs of queries whose rows see the same keys */
        const int r = row[c];
        for (e = c + 1; e < nq && lo[row[e]] == lo[r] && hi[row[e]] == hi[r]; e++) {}
        block_axpy_queries(ys + c, (const float *const *)ss + c, e - c, v, lo[r], hi[r], D);
    }
}

/* Keys [j0, j1) of one sequence in layer L for nr consecutive query rows of it (row i sees the keys
 * before n0 + i: a prompt chunk's causal mask; in a sliding layer only the last L->window of them),
 * for kv heads h0 .. h0 + nh - 1 with ng query heads each, q [nr][nh * ng][D] (rows ldq apart).
 * Writes, per kv head c, row i and head g, out[c * ldh + i * ldo + g * (D + 2)] = (m, l, acc[D]) with
 * m = phi (unified) or the partition's max over the row's keys, l = sum e^(s - m), acc = sum e^(s - m)
 * v, s the scaled (and soft-capped) scores; a row that sees none of these keys gets l = 0 (and m = -inf
 * when exact). Each key row some row sees is read, and converted, once for all nr x ng queries. Unified
 * mode needs no max, so it reads each key's K and V in one pass (section 3's point); exact mode reads K,
 * takes the max, then reads V. A block's kv heads run one after another: a slot holds every kv head's K
 * and V side by side, so the block's cache lines are read in address order, a stream the hardware
 * prefetcher follows (a head at a time strides over the others' lines).
 * scores: [nh * nr * ng * (j1 - j0)] scratch; buf: [2 * KV_BLOCK * D]. */
static void attn_partition(const fd_model *M, int64_t layer, const fd_layer *L, int64_t h0, int nh, const float *q,
                           int64_t ldq, int nr, int ng, int64_t n0, const int64_t *slots, int64_t j0, int64_t j1,
                           int unified, float phi, float *scores, float *buf, float *out, int64_t ldo, int64_t ldh) {
    const int64_t D = M->head_dim, n = j1 - j0;
    const int64_t fk = first_key(L->window, n0), kb = ((fk > j0 ? fk : j0) - j0) / KV_BLOCK * KV_BLOCK;
    int64_t a[GROUP_ROWS], b[GROUP_ROWS]; /* the keys [a, b) of this partition row i sees */
    const float *k[KV_BLOCK], *v[KV_BLOCK];
    for (int i = 0; i < nr; i++) {
        const int64_t lo = first_key(L->window, n0 + i), hi = n0 + i;
        a[i] = (lo > j0 ? lo : j0) - j0, b[i] = (hi < j1 ? hi : j1) - j0;
        for (int c = 0; c < nh; c++)
            for (int g = 0; g < ng; g++) {
                float *o = out + c * ldh + i * ldo + g * (D + 2);
                o[0] = unified ? phi : -INFINITY, o[1] = 0.0f;
                memset(o + 2, 0, sizeof(float) * (size_t)D);
            }
    }
    for (int pass = unified ? 2 : 0; pass < (unified ? 3 : 2); pass++) { /* exact: 0 K, 1 V; unified: 2 both */
        if (pass == 1)
            for (int c = 0; c < nh; c++) exact_weights(L, nr, ng, a, b, n, scores + c * nr * ng * n, out + c * ldh, ldo, D);
        for (int64_t j = kb; j < n; j += KV_BLOCK) {
            const int nk = n - j < KV_BLOCK ? (int)(n - j) : KV_BLOCK;
            for (int c = 0; c < nh; c++) {
                if (pass != 1) kv_block(M, layer, slots, j0 + j, j1, nk, h0 + c, 0, buf, k);
                if (pass != 0) kv_block(M, layer, slots, j0 + j, j1, nk, h0 + c, 1, buf + KV_BLOCK * D, v);
                attend_block(L, q + c * ng * D, ldq, nr, ng, a, b, j, nk, k, v, pass, phi, M->scale,
                             scores + c * nr * ng * n + j, n, out + c * ldh, ldo, D);
            }
        }
    }
}


/* The exact softmax of one row (one query head over the n keys before it, or its window of them),
 * partition by partition with the online rescale: the fallback of a unified row outside the window. */
static void attn_row_exact(const fd_model *M, int64_t layer, const fd_layer *L, int64_t h, const float *q,
                           const int64_t *slots, int64_t n, int64_t part, float *scores, float *buf, float *tmp,
                           float *y) {
    const int64_t D = M->head_dim;
    float m = -INFINITY, l = 0.0f;
    memset(y, 0, sizeof(float) * (size_t)D);
    for (int64_t j0 = first_key(L->window, n) / part * part; j0 < n; j0 += part) {
        int64_t j1 = j0 + part < n ? j0 + part : n;
        attn_partition(M, layer, L, h, 1, q, D, 1, 1, n, slots, j0, j1, 0, 0.0f, scores, buf, tmp, 0, 0);
        float mn = tmp[0] > m ? tmp[0] : m, a = expf(m - mn), b = expf(tmp[0] - mn);
        l = l * a + tmp[1] * b;
        for (int64_t i = 0; i < D; i++) y[i] = y[i] * a + tmp[2 + i] * b;
        m = mn;
    }
    for (int64_t i = 0; i < D; i++) y[i] /= l;
}

/* ---------------------------------------------------------------- the step */

typedef struct { /* attention's work items in the layers of one window (0: global layers) */
    int64_t items;
    const int64_t *group_items; /* [groups + 1]: a group's first item */
    const int64_t *row_base;    /* [T + 1]: a row's first partial (per kv head and partition) */
    const int64_t *part0;       /* [groups]: a group's first partition, keys part0 * part on */
} fd_keys;

typedef struct { /* a step's geometry, fixed across layers */
    int64_t T, part, max_k;
    const int64_t *positions, *new_slots, *slots, *lens;
    const int64_t *slot_rows; /* [T]: where each row's key slots start in slots */
    /* attention's work items are (group, kv head, partition); a group is one row, or up to
     * GROUP_ROWS consecutive rows of one prompt chunk, which read each key once between them.
     * Partitions are PART_KEYS keys from key 0 on, so a row's keys split alike in any step; a
     * sliding layer's items cover only the partitions its window reaches. */
    int64_t groups;
    const int64_t *group_first; /* [groups + 1]: a group's first row */
    const fd_keys *keys;        /* one per distinct window of the layers */
    const int32_t *layer_keys;  /* [num_layers]: which of them a layer's attention runs */
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

/* The layers' distinct windows (global and one sliding window, in Gemma) into windows[num_layers];
 * layer_keys[l] (unless NULL): the index of layer l's. Returns how many. */
static int distinct_windows(const fd_model *M, int64_t *windows, int32_t *layer_keys) {
    int nw = 0;
    for (int64_t l = 0; l < M->num_layers; l++) {
        int k = 0;
        while (k < nw && windows[k] != M->layers[l].window) k++;
        if (k == nw) windows[nw++] = M->layers[l].window;
        if (layer_keys) layer_keys[l] = k;
    }
    return nw;
}

typedef struct { /* the step's buffers, carved from one workspace */
    float *xn, *qkv, *attn, *gu, *act, *dx, *sx, *partials, *thread, *moe;
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

/* floats of one thread's attention scores: a partition's, for a group's rows and every head */
INLINE int64_t score_floats(const fd_model *M) { return GROUP_ROWS * M->heads * PART_KEYS; }

static int64_t thread_floats(const fd_model *M, int64_t max_k) {
    return 2 * (int64_t)fd_scale_scratch(max_k) + score_floats(M) + 2 * KV_BLOCK * M->head_dim + (M->head_dim + 2) +
           private_floats(max_k) + 64;
}

/* int64s of workspace holding the fd_keys of nw windows for T rows (a multiple of 8: 64 bytes) */
INLINE int64_t keys_int64s(int nw, int64_t T) { return (3 * (int64_t)nw * (T + 1) + 7) / 8 * 8; }

/* the widest MLP of any layer: the dense one, an expert or a shared expert */
static int64_t widest_inter(const fd_model *M) {
    int64_t w = M->inter;
    for (int64_t l = 0; l < M->num_layers; l++) {
        const fd_moe *E = M->layers[l].moe;
        if (E && E->inter > w) w = E->inter;
        if (E && E->shared_inter > w) w = E->shared_inter;
    }
    return w;
}

/* the widest input any projection of the step reads */
static int64_t widest_k(const fd_model *M) {
    const int64_t q = M->heads * M->head_dim, w = widest_inter(M);
    const int64_t k = M->hidden > q ? M->hidden : q;
    return k > w ? k : w;
}

/* floats of an MoE layer's routing buffers for T rows (moe_routing carves them) */
static int64_t routing_floats(const fd_moe *E, int64_t T, int64_t hidden) {
    const int64_t pairs = T * E->top_k;
    return T * E->experts + 4 * pairs + E->experts + 1 + pairs * (2 * hidden + 3 * E->inter) + T * hidden;
}

static int64_t moe_floats(const fd_model *M, int64_t T) {
    int64_t most = 0;
    for (int64_t l = 0; l < M->num_layers; l++) {
        const fd_moe *E = M->layers[l].moe;
        const int64_t f = E ? routing_floats(E, T, M->hidden) : 0;
        most = f > most ? f : most;
    }
    return most;
}

/* Bytes of workspace fd_decode needs for T tokens whose longest context is max_len. */
int64_t fd_decode_workspace(const fd_model *M, int64_t T, int64_t max_len, int nthreads) {
    nthreads = fd_team_size(nthreads);
    const int64_t q = M->heads * M->head_dim, kv = M->kv_heads * M->head_dim, G = M->heads / M->kv_heads;
    const int64_t max_k = widest_k(M);
    /* a sliding layer's partitions are never more than a global layer's */
    const int64_t items = T * M->kv_heads * ((max_len + PART_KEYS - 1) / PART_KEYS);
    int64_t floats = T * (M->hidden + q + 2 * kv + q + 3 * widest_inter(M)) + 2 * T * (max_k / 32 + 1) +
                     items * G * (M->head_dim + 2) + (int64_t)nthreads * thread_floats(M, max_k) +
                     moe_floats(M, T);
    int64_t windows[M->num_layers > 0 ? M->num_layers : 1];
    return 8 * keys_int64s(distinct_windows(M, windows, NULL), T) + floats * 4 + T * max_k + 64 * 16;
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
#define IN_GATED 2 /* act(gate) * up of rows [gate | up], 2K wide: IN_GATED + ACT_* */

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
            if (how >= IN_GATED) gated_act(src + t * 2 * K, src + t * 2 * K + K, x + t * K, K, how - IN_GATED);
        }
        if (q8) fd_q8_quantize_rows(x, K, 0, T, K, xq, dx, sx);
        return (fd_input){x, xq, dx, sx};
    }
    if (how == IN_NORM) norm_rows(me, src, w, dst, T, K, eps);
    if (how >= IN_GATED) {
        TEAM_FOR(me, T * 8, 1, i) { /* eight slices per row: work for every thread */
            const int64_t t = i / 8, c0 = K * (i % 8) / 8, c1 = K * (i % 8 + 1) / 8;
            gated_act(src + t * 2 * K + c0, src + t * 2 * K + K + c0, dst + t * K + c0, c1 - c0, how - IN_GATED);
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

/* the ranks' partial sums y [T, hidden] summed: the first thread calls out (the caller's own thread,
 * which the callback needs to take the interpreter's lock) while the team waits */
static void all_reduce_rows(fd_member *me, const fd_model *M, float *y, int64_t T) {
    if (me->tid == 0) M->all_reduce(y, T * M->hidden, M->reduce_ctx);
    fd_barrier(me);
}

/* x += P a, or where the layer norms the output (Gemma's post-norms) x += RMSNorm(P a) * post; under
 * tensor parallelism P a is summed over the ranks first (the bias is on one rank's shard only, as
 * models/tensor_parallel.py cuts it). y: [T, hidden] scratch */
static void residual(fd_member *me, const fd_model *M, const fd_proj *P, const fd_input *a, int64_t T, int64_t K,
                     const float *post, float *x, float *y, float *db, float *mb) {
    if (!post && !M->all_reduce) {
        proj(me, P, a, T, K, x, M->hidden, 1, db, mb);
        return;
    }
    proj(me, P, a, T, K, y, M->hidden, 0, db, mb);
    if (M->all_reduce) all_reduce_rows(me, M, y, T);
    TEAM_FOR(me, T, 1, t) {
        float *yt = y + t * M->hidden, *xt = x + t * M->hidden;
        if (post) rms_norm_row(yt, post, yt, M->hidden, M->eps);
        for (int64_t i = 0; i < M->hidden; i++) xt[i] += yt[i];
    }
}

/* per-head q/k norm and RoPE (the layer's tables) on the step's q and k (in the qkv rows), then K and
 * V into the cache */
static void rope_and_store(fd_member *me, const fd_model *M, int64_t layer, const fd_layer *L, const fd_geometry *S,
                           float *qkv) {
    const int64_t H = M->heads, KVH = M->kv_heads, D = M->head_dim, half = D / 2;
    const int64_t width = (H + 2 * KVH) * D, heads = H + 2 * KVH;
    TEAM_FOR(me, S->T * heads, 4, i) {
        const int64_t t = i / heads, h = i % heads;
        float *x = qkv + t * width + h * D;
        if (h < H + KVH) {
            if (L->qk_norm) rms_norm_row(x, L->qk_norm + h * D, x, D, M->eps);
            const float *c = L->cos + S->positions[t] * half, *s = L->sin + S->positions[t] * half;
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
static int finish_row(const fd_model *M, int64_t layer, const fd_geometry *S, const fd_keys *K, const fd_buffers *B,
                      int64_t t, int64_t hq, float *tb) {
    const fd_layer *L = &M->layers[layer];
    const int64_t H = M->heads, KVH = M->kv_heads, D = M->head_dim, G = H / KVH, h = hq / G, g = hq % G;
    const int64_t width = (H + 2 * KVH) * D, np = (K->row_base[t + 1] - K->row_base[t]) / KVH;
    const int unified = M->unified;
    const float *first = B->partials + (K->row_base[t] + h * np) * G * (D + 2) + g * (D + 2);
    float *y = B->attn + t * H * D + hq * D, m = -INFINITY, l = 0.0f;
    for (int64_t p = 0; p < np; p++) m = first[p * G * (D + 2)] > m ? first[p * G * (D + 2)] : m;
    memset(y, 0, sizeof(float) * (size_t)D);
    for (int64_t p = 0; p < np; p++) {
        const float *o = first + p * G * (D + 2);
        const float a = unified ? 1.0f : expf(o[0] - m); /* exact: the synchronised rescale */
        l += o[1] * a;
        axpy(y, a, o + 2, D);
    }
    const int64_t n = S->lens[t], seen = n - first_key(L->window, n);
    if (unified && !(l >= (float)seen * expf(M->win_lo) && l <= expf(M->win_hi))) { /* NaN fails too */
        float *scores = tb, *buf = tb + score_floats(M), *tmp = buf + 2 * KV_BLOCK * D;
        attn_row_exact(M, layer, L, h, B->qkv + t * width + hq * D, S->slots + S->slot_rows[t], n, S->part, scores,
                       buf, tmp, y);
        return 1;
    }
    for (int64_t i = 0; i < D; i++) y[i] /= l;
    return 0;
}

/* Every (group, kv head, partition) item of the layer's window, then every row's merge. When each
 * row's keys fit one partition, the thread that ran an item merges its rows at once: one barrier
 * less per layer. A team with items to spare runs a partition's kv heads as one item (attn_partition
 * says why); which it does changes no result. */
static void attention(fd_member *me, const fd_model *M, int64_t layer, const fd_geometry *S, const fd_buffers *B,
                      float *tb, atomic_llong *fallbacks) {
    const fd_layer *L = &M->layers[layer];
    const fd_keys *K = &S->keys[S->layer_keys[layer]];
    const int64_t H = M->heads, KVH = M->kv_heads, D = M->head_dim, G = H / KVH;
    const int64_t width = (H + 2 * KVH) * D;
    const int unified = M->unified, one_part = K->row_base[S->T] == S->T * KVH;
    float phi = unified ? M->phi[layer] : 0.0f;
    /* capped scores never exceed the cap, so the cap bounds them as a unified max (layers/attention.py) */
    if (L->softcap && phi > L->softcap) phi = L->softcap;
    float *scores = tb, *buf = tb + score_floats(M);
    const int64_t nh = K->items >= 2 * KVH * (int64_t)me->team->n ? KVH : 1;
    int64_t fb = 0;
    TEAM_FOR(me, K->items / nh, 1, item) { /* a group's items: its partitions, kv heads innermost */
        const int64_t it = item * nh, gi = find_range(K->group_items, S->groups, it), t = S->group_first[gi];
        const int nr = (int)(S->group_first[gi + 1] - t);
        const int64_t np = (K->group_items[gi + 1] - K->group_items[gi]) / KVH, k = it - K->group_items[gi];
        const int64_t h = k % KVH, p = k / KVH, n = S->lens[t + nr - 1];
        const int64_t j0 = (K->part0[gi] + p) * S->part, j1 = j0 + S->part < n ? j0 + S->part : n;
        attn_partition(M, layer, L, h, (int)nh, B->qkv + t * width + h * G * D, width, nr, (int)G, S->lens[t],
                       S->slots + S->slot_rows[t], j0, j1, unified, phi, scores, buf,
                       B->partials + (K->row_base[t] + h * np + p) * G * (D + 2), KVH * np * G * (D + 2),
                       np * G * (D + 2));
        if (one_part)
            for (int64_t r = t; r < t + nr; r++)
                for (int64_t hq = h * G; hq < (h + nh) * G; hq++) fb += finish_row(M, layer, S, K, B, r, hq, tb);
    }
    if (!one_part) TEAM_FOR(me, S->T * H, 1, r) fb += finish_row(M, layer, S, K, B, r / H, r % H, tb);
    atomic_fetch_add(fallbacks, fb);
}

/* the work items of the layers of window w (0: global) for the step's groups, in base[3 * (T + 1)] */
static void plan_keys(const fd_geometry *S, int64_t kv_heads, int64_t w, int64_t *base, fd_keys *K) {
    int64_t *group_items = base, *row_base = base + S->T + 1, *part0 = base + 2 * (S->T + 1);
    group_items[0] = row_base[0] = 0;
    for (int64_t g = 0; g < S->groups; g++) {
        const int64_t t0 = S->group_first[g], t1 = S->group_first[g + 1];
        part0[g] = first_key(w, S->lens[t0]) / S->part;
        const int64_t per_row = kv_heads * ((S->lens[t1 - 1] + S->part - 1) / S->part - part0[g]);
        group_items[g + 1] = group_items[g] + per_row;
        for (int64_t t = t0; t < t1; t++) row_base[t + 1] = row_base[t] + per_row;
    }
    K->items = group_items[S->groups];
    K->group_items = group_items, K->row_base = row_base, K->part0 = part0;
}

static void carve(const fd_model *M, const fd_geometry *S, int64_t partial_rows, float *f, int nt, fd_buffers *B) {
    const int64_t T = S->T, q = M->heads * M->head_dim, kv = M->kv_heads * M->head_dim;
    const int64_t G = M->heads / M->kv_heads;
    B->xn = f, f += T * M->hidden;
    B->qkv = f, f += T * (q + 2 * kv);
    B->attn = f, f += T * q;
    B->gu = f, f += T * 2 * widest_inter(M);
    B->act = f, f += T * widest_inter(M);
    B->dx = f, f += T * (S->max_k / 32 + 1);
    B->sx = f, f += T * (S->max_k / 32 + 1);
    B->partials = f, f += partial_rows * G * (M->head_dim + 2);
    B->thread_floats = thread_floats(M, S->max_k);
    B->thread = f, f += (int64_t)nt * B->thread_floats;
    B->moe = f, f += moe_floats(M, T);
    B->xq = (int8_t *)f;
}

/* ---------------------------------------------------------------- mixture of experts */

typedef struct { /* an MoE layer's step: its (row, choice) pairs, grouped by expert */
    float *logits;  /* [T, experts]: the router's, then their softmax */
    int32_t *ids;   /* [T * top_k]: row t's choices t * top_k + j, by descending weight */
    float *w;       /* [T * top_k]: their weights */
    int32_t *pos;   /* [T * top_k]: where each choice lies in the grouped order */
    int32_t *row;   /* [T * top_k]: the row of each grouped pair */
    int32_t *start; /* [experts + 1]: an expert's first grouped pair */
    /* per grouped pair: input row [hidden], gate | up [2 inter], act(gate) * up [inter], output
     * [hidden]; y's last T rows hold the shared expert's outputs */
    float *xd, *gu, *act, *y;
} fd_routing;

static fd_routing moe_routing(float *f, const fd_moe *E, int64_t T, int64_t hidden) {
    const int64_t pairs = T * E->top_k;
    fd_routing R;
    R.logits = f, f += T * E->experts;
    R.ids = (int32_t *)f, f += pairs;
    R.w = f, f += pairs;
    R.pos = (int32_t *)f, f += pairs;
    R.row = (int32_t *)f, f += pairs;
    R.start = (int32_t *)f, f += E->experts + 1;
    R.xd = f, f += pairs * hidden;
    R.gu = f, f += pairs * 2 * E->inter;
    R.act = f, f += pairs * E->inter;
    R.y = f; /* (pairs + T) * hidden: routing_floats counts it all */
    return R;
}

/* layers/moe.py's route for one row: softmax over p [n] (in place), then the top k (a tie goes to the
 * lower index, as torch.topk's), optionally renormalised over the k */
static void route_row(float *p, int64_t n, int k, int renormalize, int32_t *ids, float *w) {
    float m = -INFINITY, s = 0.0f;
    for (int64_t e = 0; e < n; e++) m = p[e] > m ? p[e] : m;
    for (int64_t e = 0; e < n; e++) s += p[e] = expf(p[e] - m);
    for (int64_t e = 0; e < n; e++) p[e] /= s;
    for (int j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < n; e++)
            if (best < 0 || p[e] > p[best]) best = e;
        ids[j] = (int32_t)best, w[j] = p[best];
        p[best] = -1.0f; /* below any probability: taken */
    }
    float sum = 0.0f;
    for (int j = 0; j < k; j++) sum += w[j];
    for (int j = 0; renormalize && j < k; j++) w[j] /= sum;
}

/* every row's routing, then its pairs grouped by expert, rows ascending within one (a stable sort
 * by expert, as layers/moe.py's argsort) */
static void route_and_group(const fd_moe *E, int64_t T, fd_routing *R) {
    const int64_t n = E->experts, k = E->top_k;
    int32_t next[n];
    for (int64_t t = 0; t < T; t++)
        route_row(R->logits + t * n, n, (int)k, E->renormalize, R->ids + t * k, R->w + t * k);
    memset(R->start, 0, sizeof(int32_t) * (size_t)(n + 1));
    for (int64_t p = 0; p < T * k; p++) R->start[R->ids[p] + 1]++;
    for (int64_t e = 0; e < n; e++) R->start[e + 1] += R->start[e];
    for (int64_t e = 0; e < n; e++) next[e] = R->start[e];
    for (int64_t p = 0; p < T * k; p++) {
        const int32_t q = next[R->ids[p]]++;
        R->pos[p] = q, R->row[q] = (int32_t)(p / k);
    }
}

/* y = down(act(gate) * up) of rows of x [rows, hidden]: one expert over exactly the rows that
 * chose it, as a flat GEMM of that many rows (FlashDecoding++ section 4's decode shape) */
static void expert_rows(fd_member *me, const fd_model *M, const fd_buffers *B, const fd_proj *gate_up,
                        const fd_proj *down, int64_t inter, const float *x, int64_t rows, float *gu, float *act,
                        float *y, float *pv, float *db, float *mb) {
    fd_input a = prepare(me, B, IN_AS_IS, x, NULL, M->eps, rows, M->hidden, wants_q8(gate_up), pv, NULL);
    proj(me, gate_up, &a, rows, M->hidden, gu, 2 * inter, 0, db, mb);
    a = prepare(me, B, IN_GATED + M->act, gu, NULL, M->eps, rows, inter, wants_q8(down), pv, act);
    proj(me, down, &a, rows, inter, y, M->hidden, 0, db, mb);
}

static void router_logits(fd_member *me, const fd_model *M, const fd_moe *E, const fd_buffers *B, int64_t T,
                          float *logits, float *pv, float *db, float *mb) {
    const int64_t H = M->hidden, n = E->experts;
    if (E->router_f32) {
        TEAM_FOR(me, T * n, 8, i) logits[i] = dot(B->xn + (i / n) * H, E->router_f32 + (i % n) * H, H);
        return;
    }
    fd_input a = prepare(me, B, IN_AS_IS, B->xn, NULL, M->eps, T, H, wants_q8(&E->router), pv, NULL);
    proj(me, &E->router, &a, T, H, logits, n, 0, db, mb);
}

/* out = the sum of row t's experts' outputs, each times its weight, in ascending expert order
 * (index_add_'s order in layers/moe.py), plus the gated shared expert's; out: [hidden], holding the
 * row's normed input until then (read first, for the shared gate) */
static void combine_row(const fd_model *M, const fd_moe *E, const fd_routing *R, int64_t T, int64_t t, float *out) {
    const int64_t H = M->hidden, k = E->top_k;
    const float gate = E->shared_inter ? 1.0f / (1.0f + expf(-dot(out, E->shared_gate, H))) : 0.0f;
    const int32_t *ids = R->ids + t * k;
    memset(out, 0, sizeof(float) * (size_t)H);
    for (int64_t done = 0, last = -1; done < k; done++) { /* the next expert above last: k is small */
        int64_t j = -1;
        for (int64_t c = 0; c < k; c++)
            if (ids[c] > last && (j < 0 || ids[c] < ids[j])) j = c;
        axpy(out, R->w[t * k + j], R->y + R->pos[t * k + j] * H, H);
        last = ids[j];
    }
    if (E->shared_inter) axpy(out, gate, R->y + (T * k + t) * H, H);
}

static void add_row(const fd_model *M, const fd_layer *L, float *out, float *x) {
    if (L->mlp_post_norm) rms_norm_row(out, L->mlp_post_norm, out, M->hidden, M->eps);
    for (int64_t i = 0; i < M->hidden; i++) x[i] += out[i];
}

/* x += the layer's mixture of experts of RMSNorm(x): route every row, gather the rows of each chosen
 * expert, run each chosen expert once over its rows, then add each row's weighted outputs back */
static void moe_block(fd_member *me, const fd_model *M, const fd_layer *L, const fd_buffers *B, int64_t T,
                      float *x, float *pv, float *db, float *mb, atomic_llong *products) {
    const fd_moe *E = L->moe;
    const int64_t H = M->hidden, I = E->inter, k = E->top_k;
    fd_routing R = moe_routing(B->moe, E, T, H);
    norm_rows(me, x, L->mlp_norm, B->xn, T, H, M->eps);
    router_logits(me, M, E, B, T, R.logits, pv, db, mb);
    TEAM_FOR(me, 1, 1, once) route_and_group(E, T, &R);
    TEAM_FOR(me, T * k, 1, p) memcpy(R.xd + p * H, B->xn + R.row[p] * H, sizeof(float) * (size_t)H);
    for (int64_t e = 0; e < E->experts; e++) {
        const int64_t s = R.start[e], rows = R.start[e + 1] - s;
        if (!rows) continue;
        expert_rows(me, M, B, &E->gate_up[e], &E->down[e], I, R.xd + s * H, rows, R.gu + s * 2 * I, R.act + s * I,
                    R.y + s * H, pv, db, mb);
        if (me->tid == 0) atomic_fetch_add(products, 1);
    }
    if (E->shared_inter)
        expert_rows(me, M, B, &E->shared_gate_up, &E->shared_down, E->shared_inter, B->xn, T, B->gu, B->act,
                    R.y + T * k * H, pv, db, mb);
    if (!M->all_reduce) {
        TEAM_FOR(me, T, 1, t) {
            combine_row(M, E, &R, T, t, B->xn + t * H);
            add_row(M, L, B->xn + t * H, x + t * H);
        }
        return;
    }
    /* tensor parallelism: each rank's experts hold a shard of their width, so the outputs are partial
     * sums, summed over the ranks before the residual (as residual() does) */
    TEAM_FOR(me, T, 1, t) combine_row(M, E, &R, T, t, B->xn + t * H);
    all_reduce_rows(me, M, B->xn, T);
    TEAM_FOR(me, T, 1, t) add_row(M, L, B->xn + t * H, x + t * H);
}

/* every layer, then the final norm: what each member of the team runs; counts: unified rows recomputed
 * exactly, expert products run */
static void run_layers(fd_member *me, const fd_model *M, const fd_geometry *S, const fd_buffers *B, float *x,
                       atomic_llong *counts) {
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
        attention(me, M, l, S, B, at, &counts[0]);
        a = prepare(me, B, IN_AS_IS, B->attn, NULL, eps, T, q, wants_q8(&L->o), pv, NULL);
        residual(me, M, &L->o, &a, T, q, L->attn_post_norm, x, B->xn, db, mb);
        if (L->moe) {
            moe_block(me, M, L, B, T, x, pv, db, mb, &counts[1]);
            continue;
        }
        a = prepare(me, B, IN_NORM, x, L->mlp_norm, eps, T, M->hidden, wants_q8(&L->gate_up), pv, B->xn);
        proj(me, &L->gate_up, &a, T, M->hidden, B->gu, 2 * M->inter, 0, db, mb);
        a = prepare(me, B, IN_GATED + M->act, B->gu, NULL, eps, T, M->inter, wants_q8(&L->down), pv, B->act);
        residual(me, M, &L->down, &a, T, M->inter, L->mlp_post_norm, x, B->xn, db, mb);
    }
    norm_rows(me, x, M->norm, x, T, M->hidden, M->eps);
}

static int bad_moe(const fd_moe *E) {
    return E->experts < 1 || E->top_k < 1 || E->top_k > E->experts || E->inter < 1 || !E->gate_up || !E->down ||
           (!E->router_f32 && E->router.nparts < 1) || E->shared_inter < 0 || (E->shared_inter && !E->shared_gate);
}

static int bad_model(const fd_model *M) {
    if (M->heads % M->kv_heads || M->head_dim % 2 || (M->act != ACT_SILU && M->act != ACT_GELU_TANH)) return 1;
    for (int64_t l = 0; l < M->num_layers; l++) {
        const fd_layer *L = &M->layers[l];
        if (L->window < 0 || !(L->softcap >= 0.0f) || (L->moe && bad_moe(L->moe))) return 1;
    }
    return 0;
}

/* Runs every layer and the final norm for T query rows, each one token of some sequence: decodes,
 * prompt chunks (a chunk's rows share their sequence's key slots, each seeing its own prefix), or
 * drafted tokens. Every layer writes all T rows' K and V before any row attends, so a row sees the
 * rows before it in its sequence. x [T, hidden]: the embeddings in, the final hidden states out.
 * positions, new_slots, lens [T]: each row's position, the cache slot its K and V go to, its context
 * length (itself included); row t's key slots are slots[slot_rows[t] .. slot_rows[t] + lens[t]) of
 * the nslots in slots (a sliding layer reads only the last window of them). workspace:
 * fd_decode_workspace bytes for (T, max lens). stats[3] += rows checked, unified rows recomputed
 * exactly, expert products run (one per chosen expert per MoE layer). Returns 0, or -1 on bad
 * arguments. */
int fd_decode(const fd_model *M, int64_t T, float *x, const int64_t *positions, const int64_t *new_slots,
              const int64_t *slots, int64_t nslots, const int64_t *slot_rows, const int64_t *lens, void *workspace,
              int64_t workspace_bytes, int64_t *stats, int nthreads) {
    if (!M || T < 1 || !x || M->num_layers < 1 || bad_model(M)) return -1;
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; t++) {
        if (lens[t] < 1 || slot_rows[t] < 0 || slot_rows[t] + lens[t] > nslots) return -1;
        max_len = lens[t] > max_len ? lens[t] : max_len;
    }
    const int nt = fd_team_size(nthreads);
    if (fd_decode_workspace(M, T, max_len, nt) > workspace_bytes) return -1;
    fd_geometry S = {T, PART_KEYS, 0, positions, new_slots, slots, lens, slot_rows, 0, NULL, NULL, NULL};
    S.max_k = widest_k(M);
    int64_t group_first[T + 1];
    for (int64_t t = 0; t < T;) { /* consecutive rows of one chunk: same slots, each one key further */
        int64_t e = t + 1;
        while (e < T && e - t < GROUP_ROWS && slot_rows[e] == slot_rows[t] && lens[e] == lens[e - 1] + 1) e++;
        group_first[S.groups++] = t;
        t = e;
    }
    group_first[S.groups] = T;
    S.group_first = group_first;
    int64_t windows[M->num_layers], partial_rows = 0;
    int32_t layer_keys[M->num_layers];
    const int nw = distinct_windows(M, windows, layer_keys);
    fd_keys keys[nw];
    int64_t *iw = (int64_t *)workspace;
    for (int k = 0; k < nw; k++) {
        plan_keys(&S, M->kv_heads, windows[k], iw + 3 * k * (T + 1), &keys[k]);
        partial_rows = keys[k].row_base[T] > partial_rows ? keys[k].row_base[T] : partial_rows;
    }
    S.keys = keys, S.layer_keys = layer_keys;
    fd_buffers B;
    carve(M, &S, partial_rows, (float *)(iw + keys_int64s(nw, T)), nt, &B);
    atomic_llong counts[2];
    atomic_init(&counts[0], 0);
    atomic_init(&counts[1], 0);
    fd_team team;
    fd_team_init(&team, nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        fd_team solo;
        fd_member me = fd_join(&team, &solo);
        if (me.team) run_layers(&me, M, &S, &B, x, counts);
    }
    if (stats) {
        stats[0] += M->unified ? M->num_layers * T * M->heads : 0;
        stats[1] += atomic_load(&counts[0]);
        stats[2] += atomic_load(&counts[1]);
    }
    return 0;
}
