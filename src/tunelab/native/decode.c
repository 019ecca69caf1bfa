/* One decode step of a Llama-family model (one new token per row) in a single call: tunelab's "native" step.
 *
 * Why: at batch 1 a decode step must stream every weight from memory once, and that is all it should do. The
 * eager PyTorch step (fastdecode.step) spends ~1,000 small ops per step around its GEMVs and its GEMV library
 * streams bf16 weights well below the read bandwidth (docs/performance.md). Here the whole step is one OpenMP
 * parallel region (torch's own libgomp, so one thread pool): the GEMVs stream the weights (batched rows in 4x4
 * register tiles), and norms, RoPE, the cache write, attention and SiLU run in between at the cost of a barrier.
 *
 * Numerics: weights, norms, the embedding and the KV cache are fp32 or bf16 (all the same; ``bf16`` flag). The
 * residual stream, norms, RoPE, attention and SiLU are fp32. With bf16 weights each GEMV's input is rounded to
 * bf16 and the products are summed by vdpbf16ps into fp32 (oneDNN's bf16 numerics). Keys/values are rounded to
 * the cache dtype when written, as the transformers forward stores them.
 *
 * Batch invariance by construction: every output element of every row is computed by the same instruction
 * sequence whatever the batch size, the other rows, their padding or the thread count: GEMV outputs are
 * independent dot products in a fixed order; attention first compacts the row's attended key positions (its
 * mask), so left padding or virtual tokens in other rows change nothing in this row's sums.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef struct {
    int64_t batch, hidden, heads, kv_heads, head_dim, inter, vocab, layers;
    int64_t length;   /* positions cached before this step; the new key/value is written at index ``length`` */
    int64_t capacity; /* the cache buffers' position stride */
    int64_t bf16;     /* weights, norms, embedding and cache in bf16 (else fp32) */
    int64_t threads;  /* OpenMP threads (torch.get_num_threads() of the caller); <= 0: the runtime's default */
    double eps;
    const void *const *wq, *const *wk, *const *wv, *const *wo; /* per layer: (out, in) row-major */
    const void *const *wgate, *const *wup, *const *wdown;
    const void *const *norm_in, *const *norm_post;          /* per layer: (hidden,) */
    const void *norm, *embed, *head;                        /* (hidden,), (vocab, hidden), (vocab, hidden) */
    void *const *keys, *const *values;                      /* per layer: (batch, kv_heads, capacity, head_dim) */
    const int64_t *tokens;                                  /* (batch,) */
    const float *cos, *sin;                                 /* (batch, head_dim) */
    const uint8_t *mask;                                    /* (batch, length + 1): nonzero = attended */
    float *x, *h, *qkv, *att, *gate, *up, *y;               /* fp32 activations, rows of hidden, hidden,
                                                               (heads + 2 kv_heads) head_dim, heads head_dim,
                                                               inter, inter, hidden */
    float *logits;                                          /* (batch, vocab) */
} Step;

#define R 4 /* output rows per GEMV block: one W block stays in L1 while the batch's rows pass over it */

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float at(const void *p, int64_t i, int bf16) {
    return bf16 ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* 16 values from p[i..] (fewer with ``mk``), widened to fp32 */
static inline __m512 load16(const void *p, int64_t i, int bf16, __mmask16 mk) {
    if (bf16) return widen(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)p + i));
    return _mm512_maskz_loadu_ps(mk, (const float *)p + i);
}

static inline __mmask16 tail(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

#define MR 4 /* batch rows per tile: a tile reads each weight chunk once for MR rows */
/* The dot products of one tile: MRV rows of x (stride K) against NRV weight rows at ``w`` (stride K), into y.
 * Every (m, n) gets the same sequence whatever the tile shape, M or the thread: acc = 0; for each chunk of
 * 16 (fp32) or 32 (bf16) inputs, acc = fma(w, x, acc) (bf16: vdpbf16ps, pairs summed in hardware; x rounded
 * to bf16 first, as oneDNN's bf16 kernels do); the last chunk masked; then one horizontal sum. */
#define TILE(NAME, MRV, NRV, T, STEP, LOAD, LOAD_M, MASK_T, MASK_OF, MAC)                                      \
static inline void NAME(const T *w, const T *x, int64_t K, float *y, int64_t ldy, int add) {                  \
    __m512 acc[MRV][NRV];                                                                                      \
    for (int i = 0; i < MRV; i++)                                                                              \
        for (int r = 0; r < NRV; r++) acc[i][r] = _mm512_setzero_ps();                                         \
    int64_t k = 0;                                                                                             \
    for (; k + STEP <= K; k += STEP) {                                                                         \
        __m512 wv[NRV];                                                                                        \
        for (int r = 0; r < NRV; r++) wv[r] = LOAD(w + r * K + k);                                             \
        for (int i = 0; i < MRV; i++) {                                                                        \
            const __m512 xv = LOAD(x + i * K + k);                                                             \
            for (int r = 0; r < NRV; r++) acc[i][r] = MAC(acc[i][r], wv[r], xv);                               \
        }                                                                                                      \
    }                                                                                                          \
    if (k < K) {                                                                                               \
        const MASK_T mk = MASK_OF(K - k);                                                                      \
        __m512 wv[NRV];                                                                                        \
        for (int r = 0; r < NRV; r++) wv[r] = LOAD_M(mk, w + r * K + k);                                      \
        for (int i = 0; i < MRV; i++) {                                                                        \
            const __m512 xv = LOAD_M(mk, x + i * K + k);                                                       \
            for (int r = 0; r < NRV; r++) acc[i][r] = MAC(acc[i][r], wv[r], xv);                               \
        }                                                                                                      \
    }                                                                                                          \
    for (int i = 0; i < MRV; i++)                                                                              \
        for (int r = 0; r < NRV; r++) {                                                                        \
            const float s = _mm512_reduce_add_ps(acc[i][r]);                                                   \
            float *out = y + i * ldy + r;                                                                      \
            *out = add ? *out + s : s;                                                                         \
        }                                                                                                      \
}

#define F32_MAC(acc, w, x) _mm512_fmadd_ps(w, x, acc)
#define F32_MASK_OF(n) tail(n)
TILE(f32_4x4, MR, R, float, 16, _mm512_loadu_ps, _mm512_maskz_loadu_ps, __mmask16, F32_MASK_OF, F32_MAC)
TILE(f32_1x4, 1, R, float, 16, _mm512_loadu_ps, _mm512_maskz_loadu_ps, __mmask16, F32_MASK_OF, F32_MAC)
TILE(f32_4x1, MR, 1, float, 16, _mm512_loadu_ps, _mm512_maskz_loadu_ps, __mmask16, F32_MASK_OF, F32_MAC)
TILE(f32_1x1, 1, 1, float, 16, _mm512_loadu_ps, _mm512_maskz_loadu_ps, __mmask16, F32_MASK_OF, F32_MAC)

static inline __mmask32 tail32(int64_t n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u); }
#define BF_LOAD(p) _mm512_castsi512_ps(_mm512_loadu_si512(p))
#define BF_LOAD_M(mk, p) _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mk, p))
#ifdef __AVX512BF16__
#define BF_MAC(acc, w, x) _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(w), (__m512bh)_mm512_castps_si512(x))
#else /* the same pairs, widened exactly and multiplied in fp32 (no AVX512-BF16 on this CPU) */
static inline __m512 bf_mac(__m512 acc, __m512 w, __m512 x) {
    const __m512i wi = _mm512_castps_si512(w), xi = _mm512_castps_si512(x), hi = _mm512_set1_epi32((int)0xffff0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wi, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(xi, 16)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wi, hi)), _mm512_castsi512_ps(_mm512_and_si512(xi, hi)), acc);
}
#define BF_MAC(acc, w, x) bf_mac(acc, w, x)
#endif
TILE(bf_4x4, MR, R, uint16_t, 32, BF_LOAD, BF_LOAD_M, __mmask32, tail32, BF_MAC)
TILE(bf_1x4, 1, R, uint16_t, 32, BF_LOAD, BF_LOAD_M, __mmask32, tail32, BF_MAC)
TILE(bf_4x1, MR, 1, uint16_t, 32, BF_LOAD, BF_LOAD_M, __mmask32, tail32, BF_MAC)
TILE(bf_1x1, 1, 1, uint16_t, 32, BF_LOAD, BF_LOAD_M, __mmask32, tail32, BF_MAC)

/* y[m, n] (+)= sum_k x[m, k] W[n, k] for m < M, n < N (x (M, K) rows of stride K, fp32, or ``xb`` its bf16
 * rounding for bf16 weights; y rows of stride ldy). Orphaned ``omp for ... nowait``: the caller puts the
 * barrier after the GEMVs it runs together. */
static void gemv(const void *W, int bf16, const float *x, const uint16_t *xb, float *y, int64_t ldy, int64_t M,
                 int64_t N, int64_t K, int add) {
    const int64_t blocks = (N + R - 1) / R;
    #pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * R;
        if (n0 + R <= N) {
            int64_t m = 0;
            if (bf16) {
                const uint16_t *w = (const uint16_t *)W + n0 * K;
                for (; m + MR <= M; m += MR) bf_4x4(w, xb + m * K, K, y + m * ldy + n0, ldy, add);
                for (; m < M; m++) bf_1x4(w, xb + m * K, K, y + m * ldy + n0, ldy, add);
            } else {
                const float *w = (const float *)W + n0 * K;
                for (; m + MR <= M; m += MR) f32_4x4(w, x + m * K, K, y + m * ldy + n0, ldy, add);
                for (; m < M; m++) f32_1x4(w, x + m * K, K, y + m * ldy + n0, ldy, add);
            }
        } else { /* the last, partial block: one weight row at a time (the same per-element sequence) */
            for (int64_t n = n0; n < N; n++) {
                int64_t m = 0;
                if (bf16) {
                    const uint16_t *w = (const uint16_t *)W + n * K;
                    for (; m + MR <= M; m += MR) bf_4x1(w, xb + m * K, K, y + m * ldy + n, ldy, add);
                    for (; m < M; m++) bf_1x1(w, xb + m * K, K, y + m * ldy + n, ldy, add);
                } else {
                    const float *w = (const float *)W + n * K;
                    for (; m + MR <= M; m += MR) f32_4x1(w, x + m * K, K, y + m * ldy + n, ldy, add);
                    for (; m < M; m++) f32_1x1(w, x + m * K, K, y + m * ldy + n, ldy, add);
                }
            }
        }
    }
}

/* xb = x rounded to bf16 (nearest even), rows in parallel (barrier at the end) */
static void to_bf16(const float *x, uint16_t *xb, int64_t M, int64_t K) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xb[m * K + k] = f2bf(x[m * K + k]);
}

/* out[m] = w * (x[m] / sqrt(mean(x[m]^2) + eps)), rows in parallel (barrier at the end) */
static void rms_norm(const float *x, const void *w, int bf16, float *out, int64_t M, int64_t C, double eps) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * C;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < C; c += 16) {
            const __m512 v = _mm512_maskz_loadu_ps(tail(C - c), xm + c);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)C + (float)eps);
        for (int64_t c = 0; c < C; c++) out[m * C + c] = at(w, c, bf16) * (xm[c] * inv);
    }
}

/* rotate_half RoPE of one head in place (transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin) */
static void rope(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) {
        const float a = x[d], b = x[d + half];
        x[d] = a * cos[d] - b * sin[d];
        x[d + half] = b * cos[d + half] + a * sin[d + half];
    }
}

/* softmax(q K^T / sqrt(D)) V for one query head over the row's attended positions; ``pos``/``score``: scratch */
static void attend(const float *q, const void *keys, const void *values, const uint8_t *mask, int64_t n, int64_t D,
                   int bf16, int64_t *pos, float *score, float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    int64_t used = 0;
    for (int64_t j = 0; j < n; j++)
        if (mask[j]) pos[used++] = j;
    float top = -INFINITY;
    for (int64_t i = 0; i < used; i++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 mk = tail(D - d);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + d), load16(keys, pos[i] * D + d, bf16, mk), acc);
        }
        score[i] = _mm512_reduce_add_ps(acc) * scale;
        if (score[i] > top) top = score[i];
    }
    float total = 0.0f;
    for (int64_t i = 0; i < used; i++) {
        score[i] = expf(score[i] - top);
        total += score[i];
    }
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 mk = tail(D - d);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < used; i++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(score[i]), load16(values, pos[i] * D + d, bf16, mk), acc);
        _mm512_mask_storeu_ps(out + d, mk, _mm512_mul_ps(acc, _mm512_set1_ps(1.0f / total)));
    }
}

static void store(void *p, int64_t i, float f, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f2bf(f);
    else ((float *)p)[i] = f;
}

static void add_rows(float *x, const float *y, int64_t n) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] = x[i] + y[i];
}

/* Phase p of the step: p = 4 * layer + part, and p = 4 * layers is the LM head.
 *   part 0: x (+)= y (the previous layer's MLP output; layer 0: x = embed[token]); h = norm_in(x); q, k, v = W h
 *   part 1: RoPE; key/value into the cache; attention -> att; y = W_o att
 *   part 2: x += y; h = norm_post(x); gate, up = W h
 *   part 3: gate = silu(gate) * up; y = W_down gate
 *   head:   x += y; h = norm(x); logits = W_head h
 * Between phases the caller may add per-row deltas to what the phase's projections wrote (qkv, y, gate and
 * up, y); without deltas the whole step is one call and the same arithmetic. */
static void phase(const Step *s, int64_t p, int t, int64_t *pos, float *score, uint16_t *xb) {
    const int64_t B = s->batch, C = s->hidden, H = s->heads, KV = s->kv_heads, D = s->head_dim, I = s->inter;
    const int64_t L = s->length, n = L + 1, cap = s->capacity, QKV = (H + 2 * KV) * D, l = p / 4;
    const int bf16 = (int)s->bf16;
    if (l == s->layers) {
        add_rows(s->x, s->y, B * C);
        rms_norm(s->x, s->norm, bf16, s->h, B, C, s->eps);
        if (bf16) to_bf16(s->h, xb, B, C);
        gemv(s->head, bf16, s->h, xb, s->logits, s->vocab, B, s->vocab, C, 0);
        #pragma omp barrier
        return;
    }
    switch (p % 4) {
    case 0:
        if (l == 0) {
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < B; m++)
                for (int64_t c = 0; c < C; c++) s->x[m * C + c] = at(s->embed, s->tokens[m] * C + c, bf16);
        } else {
            add_rows(s->x, s->y, B * C);
        }
        rms_norm(s->x, s->norm_in[l], bf16, s->h, B, C, s->eps);
        if (bf16) to_bf16(s->h, xb, B, C);
        gemv(s->wq[l], bf16, s->h, xb, s->qkv, QKV, B, H * D, C, 0);
        gemv(s->wk[l], bf16, s->h, xb, s->qkv + H * D, QKV, B, KV * D, C, 0);
        gemv(s->wv[l], bf16, s->h, xb, s->qkv + (H + KV) * D, QKV, B, KV * D, C, 0);
        break;
    case 1: {
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * KV; i++) { /* RoPE the new key; write key and value into the cache */
            const int64_t m = i / KV, g = i % KV, dst = ((m * KV + g) * cap + L) * D;
            float *key = s->qkv + m * QKV + (H + g) * D, *val = s->qkv + m * QKV + (H + KV + g) * D;
            rope(key, s->cos + m * D, s->sin + m * D, D);
            for (int64_t d = 0; d < D; d++) {
                store(s->keys[l], dst + d, key[d], bf16);
                store(s->values[l], dst + d, val[d], bf16);
            }
        }
        const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * H; i++) { /* each query head over its key/value head (grouped) */
            const int64_t m = i / H, head = i % H, g = head / (H / KV), base = (m * KV + g) * cap * D;
            float *query = s->qkv + m * QKV + head * D;
            rope(query, s->cos + m * D, s->sin + m * D, D);
            attend(query, (const char *)s->keys[l] + base * size, (const char *)s->values[l] + base * size,
                   s->mask + m * n, n, D, bf16, pos + t * n, score + t * n, s->att + m * H * D + head * D);
        }
        if (bf16) to_bf16(s->att, xb, B, H * D);
        gemv(s->wo[l], bf16, s->att, xb, s->y, C, B, C, H * D, 0);
        break;
    }
    case 2:
        add_rows(s->x, s->y, B * C);
        rms_norm(s->x, s->norm_post[l], bf16, s->h, B, C, s->eps);
        if (bf16) to_bf16(s->h, xb, B, C);
        gemv(s->wgate[l], bf16, s->h, xb, s->gate, I, B, I, C, 0);
        gemv(s->wup[l], bf16, s->h, xb, s->up, I, B, I, C, 0);
        break;
    default:
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * I; i++) s->gate[i] = s->gate[i] / (1.0f + expf(-s->gate[i])) * s->up[i];
        if (bf16) to_bf16(s->gate, xb, B, I);
        gemv(s->wdown[l], bf16, s->gate, xb, s->y, C, B, C, I, 0);
        break;
    }
    #pragma omp barrier
}

/* Phases [start, end) of one decode step in one parallel region (torch's OpenMP pool and thread count).
 * Returns 0, or -1 when the attention scratch could not be allocated (nothing was run then). */
int tunelab_decode(const Step *s, int64_t start, int64_t end) {
    const int threads = s->threads > 0 ? (int)s->threads : omp_get_max_threads();
    const int64_t n = s->length + 1;
    const int64_t widest = s->inter > s->hidden ? s->inter : s->hidden, att = s->heads * s->head_dim;
    float *score = malloc(sizeof(float) * threads * n);
    int64_t *pos = malloc(sizeof(int64_t) * threads * n);
    uint16_t *xb = malloc(sizeof(uint16_t) * s->batch * (widest > att ? widest : att));
    if (!score || !pos || !xb) {
        free(score);
        free(pos);
        free(xb);
        return -1;
    }
    #pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        for (int64_t p = start; p < end; p++) phase(s, p, t, pos, score, xb);
    }
    free(score);
    free(pos);
    free(xb);
    return 0;
}
