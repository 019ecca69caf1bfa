/* One decode step of a Llama-family model (one new token per row) in a single call: tunelab's "native" step.
 *
 * Why: at batch 1 a decode step must stream every weight from memory once, and that is all it should do. The
 * eager PyTorch step (inference.torch_step.step) spends ~1,000 small ops per step around its GEMVs and its GEMV library
 * streams bf16 weights well below the read bandwidth (docs/performance.md). Here the whole step is one OpenMP
 * parallel region (torch's own libgomp, so one thread pool): the GEMVs stream the weights (batched rows in
 * register tiles), and norms, RoPE, the cache write, attention and SiLU run in between at the cost of a barrier.
 *
 * Numerics: weights, norms, the embedding and the KV cache are fp32 or bf16 (all the same; ``bf16`` flag). The
 * residual stream, norms, RoPE, attention and SiLU are fp32. Keys/values are rounded to the cache dtype when
 * written, as the transformers forward stores them. The GEMVs with bf16 weights depend on the build (ISA below):
 * AVX-512 rounds each GEMV's input to bf16 and sums the products by vdpbf16ps into fp32 (oneDNN's bf16 numerics;
 * without AVX512-BF16 the same pairs widened and multiplied in fp32); AVX2 and the generic build widen the bf16
 * weights to fp32 in registers (exact: AVX2 takes a lane's pair by a shift and a mask, with the input's even and
 * odd elements laid out once per GEMV) and multiply them with the fp32 input by FMA, which needs no bf16 units
 * and still streams half the bytes of fp32 weights.
 *
 * ISA, chosen when it is built (tunelab.native, from the CPU's flags or TUNELAB_NATIVE_ISA): one -D flag
 * selects the vector layer below, and everything after it is written once against that layer:
 *   TUNELAB_ISA_AVX512   512-bit vectors (AVX-512 F/BW/VL + FMA), 4x4 register tiles
 *   TUNELAB_ISA_AVX2     256-bit vectors (AVX2 + FMA), 2x4 tiles
 *   TUNELAB_ISA_GENERIC  GCC/Clang vector extensions (8 lanes) that the compiler lowers for any CPU (ARM NEON);
 *                        built with -ffp-contract=off, so a multiply-add is the same two roundings everywhere
 *
 * Batch invariance by construction (in each build): every output element of every row is computed by the same
 * instruction sequence whatever the batch size, the other rows, their padding or the thread count: GEMV outputs are
 * independent dot products in a fixed order; attention first compacts the row's attended key positions (its
 * mask), so left padding or virtual tokens in other rows change nothing in this row's sums.
 */
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

/* ---- The vector layer: V fp32 lanes per ``vf``; loads of the first n values (the rest zero); MR x R GEMV tiles
 * (MR batch rows, each weight chunk loaded once for them; R weight rows per block: one block stays in L1 while
 * the batch's rows pass over it); and how bf16 weights meet their input (BF_*). ---- */
#if defined(TUNELAB_ISA_AVX512)
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__))
#error "TUNELAB_ISA_AVX512 needs AVX-512 F/BW/VL and FMA"
#endif
#include <immintrin.h>
#define ISA "avx512"
#define V 16
#define MR 4
#define R 4
typedef __m512 vf;
static inline __mmask16 tail(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float f) { return _mm512_set1_ps(f); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); } /* a * b + c */
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vload_n(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(tail(n), p); }
static inline void vstore_n(float *p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, tail(n), v); }
static inline vf vload_bf_n(const uint16_t *p, int64_t n) { /* widened exactly: bf16 is fp32's top half */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail(n), p)), 16));
}
/* bf16 GEMVs: 32 weights and 32 inputs (rounded to bf16) per step, their pairs summed into 16 fp32 lanes */
#define BF_PREPARES_X 1 /* bf_prepare: each GEMV input rounded to bf16 once (xb, stride K) */
typedef uint16_t bfx_t;
typedef vf bfxv;
#define BF_XSTRIDE(K) (K)
#define BF_STEP 32
static inline __mmask32 tail32(int64_t n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u); }
#define BF_LW(p) _mm512_castsi512_ps(_mm512_loadu_si512(p))
#define BF_LW_N(p, n) _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(tail32(n), p))
#define BF_LX BF_LW
#define BF_LX_N BF_LW_N
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

#elif defined(TUNELAB_ISA_AVX2)
#if !(defined(__AVX2__) && defined(__FMA__))
#error "TUNELAB_ISA_AVX2 needs AVX2 and FMA"
#endif
#include <immintrin.h>
#define ISA "avx2"
#define V 8
#define MR 2 /* 2x4 tiles: 8 accumulators + 4 weight vectors + 1 input in the 16 ymm registers, no spills */
#define R 4
typedef __m256 vf;
static inline __m256i lanes(int64_t n) { /* the first min(n, 8) lanes set */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < V ? n : V)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float f) { return _mm256_set1_ps(f); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf v) { /* fixed order: the two halves, then pairs, then the last two */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vload_n(const float *p, int64_t n) { return n >= V ? vload(p) : _mm256_maskload_ps(p, lanes(n)); }
static inline void vstore_n(float *p, vf v, int64_t n) {
    if (n >= V) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes(n), v);
}
static inline vf vload_bf(const uint16_t *p) { /* 8 bf16 widened to fp32 in registers: a 16-bit shift, exact */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf vload_bf_n(const uint16_t *p, int64_t n) {
    if (n >= V) return vload_bf(p);
    uint16_t part[V] = {0};
    memcpy(part, p, sizeof(uint16_t) * (size_t)n);
    return vload_bf(part);
}
/* bf16 GEMVs: 16 weights per step in one 256-bit load, widened in registers without a shuffle: a 32-bit lane j
 * holds the pair (w[2j], w[2j+1]), so w[2j] as fp32 is the lane shifted left by 16 and w[2j+1] the lane with its
 * low half cleared. Each GEMV input is prepared once (bf_prepare: per chunk of 16, the even inputs then the odd
 * ones, fp32, not rounded; rows of stride K rounded up to 16, zero-padded), so no shuffle runs per weight and
 * the weight stream is the only traffic that scales with N. No bf16 units needed. */
#define BF_PREPARES_X 1
typedef float bfx_t;
typedef struct { __m256 even, odd; } bfxv;
#define BF_XSTRIDE(K) (((K) + 15) / 16 * 16)
#define BF_STEP 16
static inline vf bf_lw(const uint16_t *p) { return _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf bf_lw_n(const uint16_t *p, int64_t n) {
    if (n >= 16) return bf_lw(p);
    uint16_t part[16] = {0};
    memcpy(part, p, sizeof(uint16_t) * (size_t)n);
    return bf_lw(part);
}
static inline bfxv bf_lx(const float *p) { return (bfxv){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline bfxv bf_lx_n(const float *p, int64_t n) { (void)n; return bf_lx(p); } /* rows are zero-padded */
static inline vf bf_mac(vf acc, vf w, bfxv x) {
    const __m256i wi = _mm256_castps_si256(w);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wi, 16)), x.even, acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wi, _mm256_set1_epi32((int)0xffff0000u))), x.odd, acc);
}
#define BF_LW bf_lw
#define BF_LW_N bf_lw_n
#define BF_LX bf_lx
#define BF_LX_N bf_lx_n
#define BF_MAC(acc, w, x) bf_mac(acc, w, x)

#elif defined(TUNELAB_ISA_GENERIC)
/* GCC/Clang vector extensions: the compiler lowers them to what the CPU has (NEON, SSE, ...) */
#define ISA "generic"
#define V 8
#define MR 2
#define R 4
typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
static inline vf vzero(void) { return (vf){0, 0, 0, 0, 0, 0, 0, 0}; }
static inline vf vset1(float f) { return (vf){f, f, f, f, f, f, f, f}; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; } /* -ffp-contract=off: never fused */
static inline float vsum(vf v) {
    float s = v[0];
    for (int i = 1; i < V; i++) s += v[i];
    return s;
}
static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vf vload_n(const float *p, int64_t n) {
    if (n >= V) return vload(p);
    vf v = vzero();
    memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
}
static inline void vstore_n(float *p, vf v, int64_t n) { memcpy(p, &v, sizeof(float) * (size_t)(n < V ? n : V)); }
static inline vf vload_bf(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}
static inline vf vload_bf_n(const uint16_t *p, int64_t n) {
    if (n >= V) return vload_bf(p);
    uint16_t part[V] = {0};
    memcpy(part, p, sizeof(uint16_t) * (size_t)n);
    return vload_bf(part);
}
#define BF_PREPARES_X 0 /* the GEMV reads its fp32 input as it is */
typedef float bfx_t;
typedef vf bfxv;
#define BF_XSTRIDE(K) (K)
#define BF_STEP V
#define BF_LW vload_bf
#define BF_LW_N vload_bf_n
#define BF_LX vload
#define BF_LX_N vload_n
#define BF_MAC(acc, w, x) vfma(w, x, acc)

#else
#error "define one of TUNELAB_ISA_AVX512, TUNELAB_ISA_AVX2, TUNELAB_ISA_GENERIC (tunelab.native does)"
#endif

/* the build's ISA, as tunelab.native.isa() reports it */
const char *tunelab_isa(void) { return ISA; }

/* the first min(n, V) values at p[i..] (fp32 or bf16), widened to fp32; the other lanes zero */
static inline vf load_any_n(const void *p, int64_t i, int bf16, int64_t n) {
    return bf16 ? vload_bf_n((const uint16_t *)p + i, n) : vload_n((const float *)p + i, n);
}

/* The dot products of one tile: MRV rows of x (stride KX) against NRV weight rows at ``w`` (stride K), into y.
 * Every (m, n) gets the same sequence whatever the tile shape, M or the thread: acc = 0; for each chunk of STEP
 * inputs, acc = MAC(acc, w, x); the last chunk zero-padded; then one horizontal sum (vsum, a fixed order). */
#define TILE(NAME, MRV, NRV, TW, TX, XV, STEP, LW, LW_N, LX, LX_N, MAC)                                       \
static inline void NAME(const TW *w, const TX *x, int64_t K, int64_t KX, float *y, int64_t ldy, int add) {     \
    vf acc[MRV][NRV];                                                                                          \
    for (int i = 0; i < MRV; i++)                                                                              \
        for (int r = 0; r < NRV; r++) acc[i][r] = vzero();                                                     \
    int64_t k = 0;                                                                                             \
    for (; k + STEP <= K; k += STEP) {                                                                         \
        vf wv[NRV];                                                                                            \
        for (int r = 0; r < NRV; r++) wv[r] = LW(w + r * K + k);                                               \
        for (int i = 0; i < MRV; i++) {                                                                        \
            const XV xv = LX(x + i * KX + k);                                                                  \
            for (int r = 0; r < NRV; r++) acc[i][r] = MAC(acc[i][r], wv[r], xv);                               \
        }                                                                                                      \
    }                                                                                                          \
    if (k < K) {                                                                                               \
        vf wv[NRV];                                                                                            \
        for (int r = 0; r < NRV; r++) wv[r] = LW_N(w + r * K + k, K - k);                                      \
        for (int i = 0; i < MRV; i++) {                                                                        \
            const XV xv = LX_N(x + i * KX + k, K - k);                                                         \
            for (int r = 0; r < NRV; r++) acc[i][r] = MAC(acc[i][r], wv[r], xv);                               \
        }                                                                                                      \
    }                                                                                                          \
    for (int i = 0; i < MRV; i++)                                                                              \
        for (int r = 0; r < NRV; r++) {                                                                        \
            const float s = vsum(acc[i][r]);                                                                   \
            float *out = y + i * ldy + r;                                                                      \
            *out = add ? *out + s : s;                                                                         \
        }                                                                                                      \
}

#define F32_MAC(acc, w, x) vfma(w, x, acc)
TILE(f32_tile, MR, R, float, float, vf, V, vload, vload_n, vload, vload_n, F32_MAC)
TILE(f32_row, 1, R, float, float, vf, V, vload, vload_n, vload, vload_n, F32_MAC)
TILE(f32_col, MR, 1, float, float, vf, V, vload, vload_n, vload, vload_n, F32_MAC)
TILE(f32_one, 1, 1, float, float, vf, V, vload, vload_n, vload, vload_n, F32_MAC)
TILE(bf_tile, MR, R, uint16_t, bfx_t, bfxv, BF_STEP, BF_LW, BF_LW_N, BF_LX, BF_LX_N, BF_MAC)
TILE(bf_row, 1, R, uint16_t, bfx_t, bfxv, BF_STEP, BF_LW, BF_LW_N, BF_LX, BF_LX_N, BF_MAC)
TILE(bf_col, MR, 1, uint16_t, bfx_t, bfxv, BF_STEP, BF_LW, BF_LW_N, BF_LX, BF_LX_N, BF_MAC)
TILE(bf_one, 1, 1, uint16_t, bfx_t, bfxv, BF_STEP, BF_LW, BF_LW_N, BF_LX, BF_LX_N, BF_MAC)

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

/* y[m, n] (+)= sum_k x[m, k] W[n, k] for m < M, n < N (x (M, K) rows of stride K, fp32; for bf16 weights ``xb``,
 * x as bf_prepare laid it out, where the build prepares it (BF_PREPARES_X); y rows of stride ldy).
 * Orphaned ``omp for ... nowait``: the caller puts the barrier after the GEMVs it runs together. */
static void gemv(const void *W, int bf16, const float *x, const bfx_t *xb, float *y, int64_t ldy, int64_t M,
                 int64_t N, int64_t K, int add) {
    const int64_t KX = bf16 ? BF_XSTRIDE(K) : K;
#if BF_PREPARES_X
    const bfx_t *xw = xb;
#else
    const bfx_t *xw = x;
    (void)xb;
#endif
    const int64_t blocks = (N + R - 1) / R;
    #pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * R;
        if (n0 + R <= N) {
            int64_t m = 0;
            if (bf16) {
                const uint16_t *w = (const uint16_t *)W + n0 * K;
                for (; m + MR <= M; m += MR) bf_tile(w, xw + m * KX, K, KX, y + m * ldy + n0, ldy, add);
                for (; m < M; m++) bf_row(w, xw + m * KX, K, KX, y + m * ldy + n0, ldy, add);
            } else {
                const float *w = (const float *)W + n0 * K;
                for (; m + MR <= M; m += MR) f32_tile(w, x + m * K, K, K, y + m * ldy + n0, ldy, add);
                for (; m < M; m++) f32_row(w, x + m * K, K, K, y + m * ldy + n0, ldy, add);
            }
        } else { /* the last, partial block: one weight row at a time (the same per-element sequence) */
            for (int64_t n = n0; n < N; n++) {
                int64_t m = 0;
                if (bf16) {
                    const uint16_t *w = (const uint16_t *)W + n * K;
                    for (; m + MR <= M; m += MR) bf_col(w, xw + m * KX, K, KX, y + m * ldy + n, ldy, add);
                    for (; m < M; m++) bf_one(w, xw + m * KX, K, KX, y + m * ldy + n, ldy, add);
                } else {
                    const float *w = (const float *)W + n * K;
                    for (; m + MR <= M; m += MR) f32_col(w, x + m * K, K, K, y + m * ldy + n, ldy, add);
                    for (; m < M; m++) f32_one(w, x + m * K, K, K, y + m * ldy + n, ldy, add);
                }
            }
        }
    }
}

/* xb = x laid out for the build's bf16 GEMVs (BF_PREPARES_X), rows in parallel (barrier at the end): AVX-512,
 * rounded to bf16 (nearest even); AVX2, per chunk of 16 inputs the 8 even ones then the 8 odd ones (fp32), rows
 * of stride BF_XSTRIDE(K), zero past K. */
static void bf_prepare(const float *x, bfx_t *xb, int64_t M, int64_t K) {
    const int64_t KX = BF_XSTRIDE(K);
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
#if defined(TUNELAB_ISA_AVX2)
        for (int64_t k = 0; k < KX; k++) {
            const int64_t chunk = k / 16 * 16, j = k % 16, src = chunk + (j < 8 ? 2 * j : 2 * (j - 8) + 1);
            xb[m * KX + k] = src < K ? x[m * K + src] : 0.0f;
        }
#elif BF_PREPARES_X
        for (int64_t k = 0; k < K; k++) xb[m * KX + k] = f2bf(x[m * K + k]);
#else
        (void)x, (void)xb, (void)KX;
#endif
    }
}

/* out[m] = w * (x[m] / sqrt(mean(x[m]^2) + eps)), rows in parallel (barrier at the end) */
static void rms_norm(const float *x, const void *w, int bf16, float *out, int64_t M, int64_t C, double eps) {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * C;
        vf acc = vzero();
        for (int64_t c = 0; c < C; c += V) {
            const vf v = vload_n(xm + c, C - c);
            acc = vfma(v, v, acc);
        }
        const float inv = 1.0f / sqrtf(vsum(acc) / (float)C + (float)eps);
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
        vf acc = vzero();
        for (int64_t d = 0; d < D; d += V)
            acc = vfma(vload_n(q + d, D - d), load_any_n(keys, pos[i] * D + d, bf16, D - d), acc);
        score[i] = vsum(acc) * scale;
        if (score[i] > top) top = score[i];
    }
    float total = 0.0f;
    for (int64_t i = 0; i < used; i++) {
        score[i] = expf(score[i] - top);
        total += score[i];
    }
    for (int64_t d = 0; d < D; d += V) {
        vf acc = vzero();
        for (int64_t i = 0; i < used; i++)
            acc = vfma(vset1(score[i]), load_any_n(values, pos[i] * D + d, bf16, D - d), acc);
        vstore_n(out + d, vmul(acc, vset1(1.0f / total)), D - d);
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
static void phase(const Step *s, int64_t p, int t, int64_t *pos, float *score, bfx_t *xb) {
    const int64_t B = s->batch, C = s->hidden, H = s->heads, KV = s->kv_heads, D = s->head_dim, I = s->inter;
    const int64_t L = s->length, n = L + 1, cap = s->capacity, QKV = (H + 2 * KV) * D, l = p / 4;
    const int bf16 = (int)s->bf16;
    if (l == s->layers) {
        add_rows(s->x, s->y, B * C);
        rms_norm(s->x, s->norm, bf16, s->h, B, C, s->eps);
        if (bf16 && BF_PREPARES_X) bf_prepare(s->h, xb, B, C);
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
        if (bf16 && BF_PREPARES_X) bf_prepare(s->h, xb, B, C);
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
        if (bf16 && BF_PREPARES_X) bf_prepare(s->att, xb, B, H * D);
        gemv(s->wo[l], bf16, s->att, xb, s->y, C, B, C, H * D, 0);
        break;
    }
    case 2:
        add_rows(s->x, s->y, B * C);
        rms_norm(s->x, s->norm_post[l], bf16, s->h, B, C, s->eps);
        if (bf16 && BF_PREPARES_X) bf_prepare(s->h, xb, B, C);
        gemv(s->wgate[l], bf16, s->h, xb, s->gate, I, B, I, C, 0);
        gemv(s->wup[l], bf16, s->h, xb, s->up, I, B, I, C, 0);
        break;
    default:
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * I; i++) s->gate[i] = s->gate[i] / (1.0f + expf(-s->gate[i])) * s->up[i];
        if (bf16 && BF_PREPARES_X) bf_prepare(s->gate, xb, B, I);
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
    const int64_t wide = widest > att ? widest : att;
    bfx_t *xb = malloc(sizeof(bfx_t) * s->batch * BF_XSTRIDE(wide));
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
