/* moelink's native CPU kernels: the row-local ops of a decode step that plain torch runs as several dispatched ops
 * each (kernels/cpu_native.py says which, when, and why). Built at first use by kernels/cpu_native_build.py with the
 * machine's C compiler, loaded with ctypes; every function takes raw pointers and sizes, validated by the Python
 * wrappers (contiguous CPU tensors of the dtypes named here).
 *
 * No -ffast-math: the sums run in a fixed order (8 interleaved partial sums, then those in order), so a row's result
 * is the same in any batch and on any run, and NaN/Inf propagate as IEEE says. bfloat16 values are rounded to
 * nearest-even from float32 where torch rounds them (the references' op boundaries), so a bf16 result differs from
 * the reference only by the order of the float32 sums inside a row.
 *
 * Legend: T rows (tokens), D hidden, K top-k, E experts, I expert intermediate, G router experts.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest, ties to even */
    return (bf16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* 8 float32 lanes (GCC's and Clang's vector extension: one AVX2 register, native on every x86-64-v3 machine): for
 * loops whose accumulator must stay in registers, which the auto-vectoriser does not promise. Lane-wise ops only, so
 * every lane rounds exactly as the scalar code would. (A 16-lane type is kept in memory on AVX2.) */
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

static inline f32x8 load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline f32x8 load8_bf16(const bf16_t *p) {
    u16x8 h;
    memcpy(&h, p, sizeof h);
    u32x8 u = __builtin_convertvector(h, u32x8) << 16;
    f32x8 v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Σ a[i] b[i] in float32, 8 interleaved partial sums (vectorisable without reassociating anything). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.f;
    for (int j = 0; j < 8; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* The same with b in bfloat16 (a weight row), a in float32. */
static inline float dot_f32_bf16(const float *a, const bf16_t *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * bf16_to_f32(b[i + j]);
    float s = 0.f;
    for (int j = 0; j < 8; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * bf16_to_f32(b[i]);
    return s;
}

/* y[r] = dot(x, W[r], d) for the `rows` rows of W (row stride d): four rows at a time, x read once for them and their
 * four partial-sum vectors independent (one row's chain of vector adds left each core idle most of its time). Every
 * row's sums are the one-row dot's, in its order: y[r] is bit for bit dot_f32's (float32 W) or dot_f32_bf16's
 * (bfloat16 W). One body for both weight types: WT the element type, LOAD8 its 8-lane widening load, WIDEN its scalar
 * one, DOT1 the one-row dot for the rows past a multiple of four. */
#define DEFINE_GEMV(NAME, WT, LOAD8, WIDEN, DOT1)                                                                      \
    static void NAME(const float *restrict x, const WT *restrict W, int64_t rows, int64_t d, float *restrict y) {      \
        int64_t d8 = d - d % 8, r = 0;                                                                                 \
        for (; r + 4 <= rows; r += 4) {                                                                                \
            const WT *w0 = W + r * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;                                        \
            f32x8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                              \
            for (int64_t i = 0; i < d8; i += 8) {                                                                      \
                f32x8 xv = load8(x + i);                                                                               \
                a0 += xv * LOAD8(w0 + i);                                                                              \
                a1 += xv * LOAD8(w1 + i);                                                                              \
                a2 += xv * LOAD8(w2 + i);                                                                              \
                a3 += xv * LOAD8(w3 + i);                                                                              \
            }                                                                                                          \
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                                              \
            for (int l = 0; l < 8; l++) {                                                                              \
                s0 += a0[l];                                                                                           \
                s1 += a1[l];                                                                                           \
                s2 += a2[l];                                                                                           \
                s3 += a3[l];                                                                                           \
            }                                                                                                          \
            for (int64_t i = d8; i < d; i++) {                                                                         \
                s0 += x[i] * WIDEN(w0[i]);                                                                             \
                s1 += x[i] * WIDEN(w1[i]);                                                                             \
                s2 += x[i] * WIDEN(w2[i]);                                                                             \
                s3 += x[i] * WIDEN(w3[i]);                                                                             \
            }                                                                                                          \
            y[r] = s0;                                                                                                 \
            y[r + 1] = s1;                                                                                             \
            y[r + 2] = s2;                                                                                             \
            y[r + 3] = s3;                                                                                             \
        }                                                                                                              \
        for (; r < rows; r++) y[r] = DOT1(x, W + r * d, d);                                                            \
    }

static inline float f32_as_f32(float v) { return v; }

DEFINE_GEMV(gemv_f32, float, load8, f32_as_f32, dot_f32)
DEFINE_GEMV(gemv_bf16, bf16_t, load8_bf16, bf16_to_f32, dot_f32_bf16)

static inline float inv_rms(const float *x, int64_t d, float eps) {
    return 1.0f / sqrtf(dot_f32(x, x, d) / (float)d + eps);
}

/* ---- RMSNorm ------------------------------------------------------------------------------------------------- */

/* out = w * x / rms(x), float32 rows. */
void ml_rms_norm_f32(const float *x, const float *w, float *out, int64_t rows, int64_t d, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *o = out + r * d;
        float inv = inv_rms(xr, d, eps);
        for (int64_t i = 0; i < d; i++) o[i] = xr[i] * inv * w[i];
    }
}

/* The residual add fused: s = x + res (written to sum_out), out = w * s / rms(s), float32 rows, split over nt
 * threads. */
void ml_add_rms_norm_f32(const float *x, const float *res, const float *w, float *out, float *sum_out, int64_t rows,
                         int64_t d, float eps, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        float *s = sum_out + r * d;
        for (int64_t i = 0; i < d; i++) s[i] = x[r * d + i] + res[r * d + i];
        float inv = inv_rms(s, d, eps);
        float *o = out + r * d;
        for (int64_t i = 0; i < d; i++) o[i] = s[i] * inv * w[i];
    }
}

/* bfloat16 rows: n = bf16(x / rms(x)) in float32, then out = bf16(n * w) (the reference's two roundings). With
 * `res` (not NULL) the row is first s = bf16(x + res), written to sum_out. Rows split over nt threads. Returns 0, or -1
 * when out of memory. */
int ml_rms_norm_bf16(const bf16_t *x, const bf16_t *res, const bf16_t *w, bf16_t *out, bf16_t *sum_out,
                     int64_t rows, int64_t d, float eps, int nt) {
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
    float *scratch = malloc(sizeof(float) * (size_t)d);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        if (!scratch) {
            failed = 1;
            continue;
        }
        const bf16_t *xr = x + r * d;
        for (int64_t i = 0; i < d; i++) {
            float v = bf16_to_f32(xr[i]);
            if (res) {
                bf16_t s = f32_to_bf16(v + bf16_to_f32(res[r * d + i]));
                sum_out[r * d + i] = s;
                v = bf16_to_f32(s);
            }
            scratch[i] = v;
        }
        float inv = inv_rms(scratch, d, eps);
        bf16_t *o = out + r * d;
        for (int64_t i = 0; i < d; i++) o[i] = f32_to_bf16(round_bf16(scratch[i] * inv) * bf16_to_f32(w[i]));
    }
    free(scratch);
    }
    return failed ? -1 : 0;
}

/* ---- router: greedy (softmax, top-k, renormalise, scale) ---------------------------------------------------------- */

/* logits [T, G] (float32 or, with is_bf16, bfloat16) -> weights [T, K] float32, ids [T, K] int64: softmax in float32,
 * the K largest in descending order (ties: the lower index first), optionally w / Σw, times scale. valid (bool [T] or
 * NULL): a row that is 0 gets ids -1. counts (int64 [G] or NULL): += 1 per chosen id >= 0. Returns 0; -1 when out of
 * memory; -3 when a row has a tie among its chosen experts or at the cut, or a NaN (torch.topk's order of equal values
 * is its own: the caller runs the reference). On -1 / -3 nothing is counted (counts are added after every row). */
int ml_route_greedy(const void *logits, int is_bf16, float *weights, int64_t *ids, int64_t rows, int64_t g,
                    int64_t k, int renormalize, float scale, const uint8_t *valid, int64_t *counts) {
    float *scratch = malloc(sizeof(float) * (size_t)g);
    if (!scratch) return -1;
    for (int64_t r = 0; r < rows; r++) {
        float mx = -INFINITY;
        for (int64_t e = 0; e < g; e++) {
            float v = is_bf16 ? bf16_to_f32(((const bf16_t *)logits)[r * g + e]) : ((const float *)logits)[r * g + e];
            scratch[e] = v;
            if (v > mx || v != v) mx = v != v ? v : (mx != mx ? mx : v); /* a NaN row softmaxes to NaN, as torch's */
        }
        float sum = 0.f;
        for (int64_t e = 0; e < g; e++) {
            scratch[e] = expf(scratch[e] - mx);
            sum += scratch[e];
        }
        for (int64_t e = 0; e < g; e++) scratch[e] /= sum;
        float *wr = weights + r * k;
        int64_t *ir = ids + r * k;
        for (int64_t j = 0; j < k; j++) { /* selection: K is small (top-2 .. top-10) */
            int64_t best = -1;
            float bv = 0.f;
            for (int64_t e = 0; e < g; e++) {
                int taken = 0;
                for (int64_t q = 0; q < j; q++) taken |= (ir[q] == e);
                if (taken) continue;
                float v = scratch[e];
                if (best < 0 || v > bv || (v != v && bv == bv)) {
                    best = e;
                    bv = v;
                }
            }
            ir[j] = best;
            wr[j] = bv;
        }
        /* A tie among the chosen or at the cut (a chosen value equal to another chosen one, or to the best one left
         * out): torch.topk orders ties its own way, so the caller runs the reference for this call. */
        for (int64_t j = 0; j < k; j++) {
            for (int64_t q = j + 1; q < k; q++)
                if (wr[j] == wr[q]) {
                    free(scratch);
                    return -3;
                }
            for (int64_t e = 0; e < g; e++) {
                int taken = 0;
                for (int64_t q = 0; q < k; q++) taken |= (ir[q] == e);
                if (!taken && (scratch[e] == wr[j] || scratch[e] != scratch[e])) {
                    free(scratch);
                    return -3;
                }
            }
        }
        if (renormalize) {
            float s = 0.f;
            for (int64_t j = 0; j < k; j++) s += wr[j];
            for (int64_t j = 0; j < k; j++) wr[j] /= s;
        }
        if (scale != 1.0f)
            for (int64_t j = 0; j < k; j++) wr[j] *= scale;
        if (valid && !valid[r])
            for (int64_t j = 0; j < k; j++) ir[j] = -1;
    }
    free(scratch);
    if (counts)
        for (int64_t j = 0; j < rows * k; j++)
            if (ids[j] >= 0) counts[ids[j]] += 1;
    return 0;
}

/* ---- a few tokens' routed experts ------------------------------------------------------------------------------- */

/* act kinds: 0 silu(g) * u; 1 swiglu_oai (gpt-oss); 2 silu_clamp (DeepSeek-V4). */
static inline float silu(float g) { return g / (1.0f + expf(-g)); }

static inline float activate(float g, float u, int kind, float alpha, float limit, int bf16_round) {
    if (kind != 0) {
        g = g > limit ? limit : g; /* a NaN gate stays NaN, as torch.clamp keeps it */
        u = u < -limit ? -limit : (u > limit ? limit : u);
    }
    if (kind == 1) { /* (u + 1) * (g * sigmoid(g * alpha)), each op rounded in bf16 as torch's */
        if (!bf16_round) return (u + 1.0f) * (g * (1.0f / (1.0f + expf(-(g * alpha)))));
        float sg = round_bf16(1.0f / (1.0f + expf(-round_bf16(g * alpha))));
        return round_bf16(round_bf16(u + 1.0f) * round_bf16(g * sg));
    }
    if (bf16_round) return round_bf16(round_bf16(silu(g)) * u);
    return silu(g) * u;
}

/* out[t] = Σ_k w[t,k] · (w2_e · act(w13_e · x[t] (+ b13_e)) (+ b2_e)), e = ids[t,k] (through `map` when given: a global
 * id -> local, -1 elsewhere); a pair with no local expert adds nothing. Each pair reads its expert's rows once, no
 * copy. float32 (is_bf16 0) or bfloat16 (1: x, weights, biases and out; each product rounded where torch rounds).
 * ids: int64 [T, K]; topk_w: float32 [T, K]. Returns 0; -1 when out of memory; -2 when an id is past the experts (or
 * the map), or the map names a local expert past them (checked first: nothing written). */
int ml_moe_small(const void *x, const void *w13, const void *w2, const void *b13, const void *b2,
                  const float *topk_w, const int64_t *ids, const int32_t *map, int64_t num_map, void *out,
                  int64_t t_rows, int64_t k, int64_t d, int64_t inter, int64_t num_local, int is_bf16, int act_kind,
                 float alpha, float limit, int nt) {
    for (int64_t j = 0; j < t_rows * k; j++) { /* ids past the experts (or the map) raise, as the references' indexing */
        int64_t e = ids[j];
        if (e >= (map ? num_map : num_local) || (map && e >= 0 && map[e] >= num_local)) return -2;
    }
    int failed = 0;
    /* Tokens split over nt threads (OpenMP: torch's pool), each with its scratch; a token's row is computed by the
     * same code on any thread. */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
    float *scratch = malloc(sizeof(float) * (size_t)(3 * inter + 3 * d));
    float *h = scratch;             /* [2I] */
    float *a = h + 2 * inter;       /* [I]  */
    float *xf = a + inter;          /* [D]  */
    float *acc = xf + d;            /* [D]  */
    float *ys = acc + d;            /* [D]  */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_rows; t++) {
        if (!scratch) {
            failed = 1;
            continue;
        }
        for (int64_t i = 0; i < d; i++) {
            xf[i] = is_bf16 ? bf16_to_f32(((const bf16_t *)x)[t * d + i]) : ((const float *)x)[t * d + i];
            acc[i] = 0.f;
        }
        for (int64_t j = 0; j < k; j++) {
            int64_t e = ids[t * k + j];
            if (e >= 0 && map) e = e < num_map ? map[e] : -1;
            if (e < 0 || e >= num_local) continue;
            float rw = topk_w[t * k + j];
            if (is_bf16) rw = round_bf16(rw);
            if (is_bf16)
                gemv_bf16(xf, (const bf16_t *)w13 + e * 2 * inter * d, 2 * inter, d, h);
            else
                gemv_f32(xf, (const float *)w13 + e * 2 * inter * d, 2 * inter, d, h);
            for (int64_t f = 0; f < 2 * inter; f++) {
                if (is_bf16) {
                    float v = h[f];
                    if (b13) v = round_bf16(v) + bf16_to_f32(((const bf16_t *)b13)[e * 2 * inter + f]);
                    h[f] = round_bf16(v);
                } else if (b13) {
                    h[f] += ((const float *)b13)[e * 2 * inter + f];
                }
            }
            for (int64_t i = 0; i < inter; i++) a[i] = activate(h[i], h[inter + i], act_kind, alpha, limit, is_bf16);
            if (is_bf16)
                gemv_bf16(a, (const bf16_t *)w2 + e * d * inter, d, inter, ys);
            else
                gemv_f32(a, (const float *)w2 + e * d * inter, d, inter, ys);
            for (int64_t o = 0; o < d; o++) {
                float y = ys[o];
                if (is_bf16) {
                    if (b2) y = round_bf16(y) + bf16_to_f32(((const bf16_t *)b2)[e * d + o]);
                    acc[o] += round_bf16(round_bf16(y) * rw);
                } else {
                    if (b2) y += ((const float *)b2)[e * d + o];
                    acc[o] += y * rw;
                }
            }
        }
        for (int64_t i = 0; i < d; i++) {
            if (is_bf16)
                ((bf16_t *)out)[t * d + i] = f32_to_bf16(acc[i]);
            else
                ((float *)out)[t * d + i] = acc[i];
        }
    }
    free(scratch);
    }
    return failed ? -1 : 0;
}

static inline void load_row(float *dst, const void *src, int64_t at, int64_t n, int is_bf16) {
    for (int64_t d = 0; d < n; d++)
        dst[d] = is_bf16 ? bf16_to_f32(((const bf16_t *)src)[at + d]) : ((const float *)src)[at + d];
}

static inline void store_row(void *dst, int64_t at, const float *src, int64_t n, int is_bf16) {
    for (int64_t d = 0; d < n; d++) {
        if (is_bf16)
            ((bf16_t *)dst)[at + d] = f32_to_bf16(src[d]);
        else
            ((float *)dst)[at + d] = src[d];
    }
}

/* e^x for x <= 0 (a softmax's scores less their max) in float32 without a libm call or a branch, so a loop of them
 * vectorises: x = n ln2 + r (Cody-Waite), |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (truncation < 1e-8
 * relative), times 2^n built in the exponent bits. Within a few ulps of expf; x below -87.3 counts as -87.3 (e^x <
 * 1.2e-38, the smallest normal float: nothing a softmax sum can see); NaN stays NaN. */
static inline float exp_nonpositive(float x) {
    x = x < -87.3f ? -87.3f : x;
    float n = rintf(x * 1.44269504088896341f);
    float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    float p = 1.f / 5040.f;
    p = p * r + 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    float shifted = n + 12582912.f; /* 1.5 * 2^23: n (|n| <= 127) sits in the mantissa's low bits */
    uint32_t nbits, magic = 0x4b400000u, sbits;
    memcpy(&nbits, &shifted, 4);
    sbits = (nbits - magic + 127u) << 23;
    float scale;
    memcpy(&scale, &sbits, 4);
    return p * scale;
}

/* sc[j] = e^(sc[j] - m) for n values (each <= m, or NaN); returns their sum, in order. */
static float exp_shift_sum(float *restrict sc, int64_t n, float m) {
    for (int64_t j = 0; j < n; j++) sc[j] = exp_nonpositive(sc[j] - m);
    float sum = 0.f;
    for (int64_t j = 0; j < n; j++) sum += sc[j];
    return sum;
}

/* A cache row of `width` values as float32: in place for a float32 cache, widened into `buf` for a bfloat16 one. */
static inline const float *cache_row(const void *cache, int64_t row, int64_t width, int is_bf16, float *buf) {
    if (!is_bf16) return (const float *)cache + row * width;
    load_row(buf, cache, row * width, width, 1);
    return buf;
}

/* The next position's (block column, offset in the block). */
static inline void next_slot(int64_t *blk, int64_t *off, int64_t block_size) {
    if (++*off == block_size) {
        *off = 0;
        ++*blk;
    }
}

/* The largest of m0 and x[0:n]; NaN when any of them is NaN (IEEE: a NaN score makes the row NaN). Written as a
 * select and a flag so the compiler vectorises it (a branch per key was ~12 % of a decode step's attention). */
static inline float max_or_nan(const float *restrict x, int64_t n, float m0) {
    float m = m0;
    int nan = m0 != m0;
    for (int64_t j = 0; j < n; j++) {
        float v = x[j];
        m = v > m ? v : m;
        nan |= v != v;
    }
    return nan ? NAN : m;
}

/* acc[0:hdv] = Σ_j w[j] v_j over keys lo .. lo + n - 1 of kv head kvh (walked block by block through `table`), in key
 * order, each product rounded then added (the same sums as one axpy per key). A 16-wide slice of the row stays in
 * registers for the whole walk: an accumulator in memory chains every key on a store and its reload (that chain was a
 * quarter of a decode step's attention). */
static void weighted_rows(float *restrict acc, const float *restrict w, const void *vc, const int32_t *table, int64_t lo,
                          int64_t n, int64_t block_size, int64_t kv_heads, int64_t kvh, int64_t hdv, int is_bf16) {
    int64_t e0 = 0;
    for (; e0 + 16 <= hdv; e0 += 16) {
        f32x8 a0 = {0}, a1 = {0};
        int64_t blk = lo / block_size, off = lo % block_size;
        for (int64_t j = 0; j < n; j++, next_slot(&blk, &off, block_size)) {
            int64_t at = (((int64_t)table[blk] * block_size + off) * kv_heads + kvh) * hdv + e0;
            if (is_bf16) {
                a0 += w[j] * load8_bf16((const bf16_t *)vc + at);
                a1 += w[j] * load8_bf16((const bf16_t *)vc + at + 8);
            } else {
                a0 += w[j] * load8((const float *)vc + at);
                a1 += w[j] * load8((const float *)vc + at + 8);
            }
        }
        memcpy(acc + e0, &a0, sizeof a0);
        memcpy(acc + e0 + 8, &a1, sizeof a1);
    }
    if (e0 < hdv) { /* the last slice, narrower than 16: a plain walk */
        for (int64_t e = e0; e < hdv; e++) acc[e] = 0.f;
        int64_t blk = lo / block_size, off = lo % block_size;
        for (int64_t j = 0; j < n; j++, next_slot(&blk, &off, block_size)) {
            int64_t at = (((int64_t)table[blk] * block_size + off) * kv_heads + kvh) * hdv;
            for (int64_t e = e0; e < hdv; e++)
                acc[e] += w[j] * (is_bf16 ? bf16_to_f32(((const bf16_t *)vc)[at + e]) : ((const float *)vc)[at + e]);
        }
    }
}

/* weighted_rows for two query rows of one kv head at once (w0, w1 their weights): one walk over the keys, each value
 * slice read once for both rows, their four accumulators in registers. Each row's sums are weighted_rows' for it, in
 * the same order (bit for bit): only the walk is shared (a GQA head group read every value row once per query row). */
static void weighted_rows2(float *restrict acc0, float *restrict acc1, const float *restrict w0,
                           const float *restrict w1, const void *vc, const int32_t *table, int64_t lo, int64_t n,
                           int64_t block_size, int64_t kv_heads, int64_t kvh, int64_t hdv, int is_bf16) {
    if (hdv % 16) { /* a slice narrower than 16: each row's own walk */
        weighted_rows(acc0, w0, vc, table, lo, n, block_size, kv_heads, kvh, hdv, is_bf16);
        weighted_rows(acc1, w1, vc, table, lo, n, block_size, kv_heads, kvh, hdv, is_bf16);
        return;
    }
    for (int64_t e0 = 0; e0 < hdv; e0 += 16) {
        f32x8 a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
        int64_t blk = lo / block_size, off = lo % block_size;
        for (int64_t j = 0; j < n; j++, next_slot(&blk, &off, block_size)) {
            int64_t at = (((int64_t)table[blk] * block_size + off) * kv_heads + kvh) * hdv + e0;
            f32x8 v0, v1;
            if (is_bf16) {
                v0 = load8_bf16((const bf16_t *)vc + at);
                v1 = load8_bf16((const bf16_t *)vc + at + 8);
            } else {
                v0 = load8((const float *)vc + at);
                v1 = load8((const float *)vc + at + 8);
            }
            a0 += w0[j] * v0;
            a1 += w0[j] * v1;
            b0 += w1[j] * v0;
            b1 += w1[j] * v1;
        }
        memcpy(acc0 + e0, &a0, sizeof a0);
        memcpy(acc0 + e0 + 8, &a1, sizeof a1);
        memcpy(acc1 + e0, &b0, sizeof b0);
        memcpy(acc1 + e0 + 8, &b1, sizeof b1);
    }
}

/* Ask for the cache lines of bytes [p, p + n) (a hint: nothing is read or faults). */
static inline void prefetch_bytes(const char *p, size_t n) {
    for (size_t b = 0; b < n; b += 64) __builtin_prefetch(p + b);
}

/* sc[r * sc_stride + j] = (q_r . k_j) * scale for the rep query rows q (rep x hd, float32) and keys lo .. lo + n - 1
 * of kv head kvh, walked block by block through `table` (no division per key). kf: room for one key row (a bfloat16
 * cache's row widened). (Eight keys' partial sums transposed and added lane by lane, to share the horizontal sums,
 * measured slower here: the transposition costs what it saves.) */
static void key_scores(float *restrict sc, int64_t sc_stride, const float *restrict q, int64_t rep, const void *kc,
                       const void *vc, const int32_t *table, int64_t lo, int64_t n, int64_t block_size,
                       int64_t kv_heads, int64_t kvh, int64_t hd, int64_t hdv, int is_bf16, float scale,
                       float *restrict kf) {
    int64_t blk = lo / block_size, off = lo % block_size;
    size_t esize = is_bf16 ? 2 : 4, k_bytes = (size_t)hd * esize, v_bytes = (size_t)hdv * esize;
    for (int64_t j = 0; j < n; j++, next_slot(&blk, &off, block_size)) {
        int64_t row = ((int64_t)table[blk] * block_size + off) * kv_heads + kvh;
        /* A decode step reads a cache far larger than the CPU's: its rows come from DRAM, and a block's jump to the
         * next (anywhere in the cache) is one the CPU's own prefetcher cannot follow. So each key's value row is asked
         * for now, for weighted_rows' walk that follows, and, entering a block, the next block's key rows. */
        prefetch_bytes((const char *)vc + (size_t)row * v_bytes, v_bytes);
        if ((off == 0 || j == 0) && j + (block_size - off) < n) {
            int64_t next = (int64_t)table[blk + 1] * block_size * kv_heads + kvh;
            for (int64_t o = 0; o < block_size; o++)
                prefetch_bytes((const char *)kc + (size_t)(next + o * kv_heads) * k_bytes, k_bytes);
        }
        const float *k = cache_row(kc, row, hd, is_bf16, kf);
        for (int64_t r = 0; r < rep; r++) sc[r * sc_stride + j] = dot_f32(q + r * hd, k, hd) * scale;
    }
}

/* ---- paged attention ------------------------------------------------------------------------------------------ */

/* Causal attention of each query token to its sequence's cached keys: token t = qsl[s] + i of sequence s sits at
 * position p = seq_lens[s] - (qsl[s+1] - qsl[s]) + i and sees keys [lo, p], lo = max(0, p - window + 1) with a window
 * (window 0: none). Caches [blocks, block_size, kv_heads, hd] (values hdv wide), rows located through
 * block_tables [num_seqs, m_stride] (int32). q [T, n_heads, hd] with strides (q_st, q_sn) in elements; out [T, n_heads,
 * hdv] contiguous. sinks (float32 [n_heads] or NULL): each head's sink logit joins the softmax's max and denominator.
 * Scores, softmax and the value sums in float32; bfloat16 (is_bf16) inputs widened, the output rounded once.
 * num_blocks: the caches' blocks; m_width: the tables' columns; t_rows: q's tokens. Returns 0; -1 when out of memory; -2 when a sequence's
 * length or a block it reads is out of range (checked first: nothing is written). */
/* One sequence's query rows (the body of ml_paged_attention's loop; buf: that thread's scratch). */
static void attend_sequence(const void *q, int64_t q_st, int64_t q_sn, const void *kc, const void *vc,
                            const int32_t *table, int64_t q0, int64_t qlen, int64_t ctx, void *out, const float *sinks,
                            int64_t n_heads, int64_t kv_heads, int64_t hd, int64_t hdv, int64_t block_size,
                            int64_t window, float scale, int is_bf16, int64_t max_ctx, float *buf) {
    int64_t rep = n_heads / kv_heads;
    float *qf = buf, *acc = qf + rep * hd, *scores = acc + rep * hdv, *kf = scores + rep * max_ctx;
    for (int64_t i = 0; i < qlen; i++) {
        int64_t t = q0 + i, p = ctx - qlen + i;
        int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0, n_keys = p >= lo ? p - lo + 1 : 0;
        for (int64_t kvh = 0; kvh < kv_heads; kvh++) {
            for (int64_t r = 0; r < rep; r++) load_row(qf + r * hd, q, t * q_st + (kvh * rep + r) * q_sn, hd, is_bf16);
            key_scores(scores, max_ctx, qf, rep, kc, vc, table, lo, n_keys, block_size, kv_heads, kvh, hd, hdv, is_bf16,
                       scale, kf);
            float denom[rep];
            for (int64_t r = 0; r < rep; r++) {
                float *sc = scores + r * max_ctx, m = max_or_nan(sc, n_keys, sinks ? sinks[kvh * rep + r] : -INFINITY);
                float d = sinks ? exp_nonpositive(sinks[kvh * rep + r] - m) : 0.f;
                denom[r] = d + exp_shift_sum(sc, n_keys, m);
            }
            int64_t r = 0;
            for (; r + 2 <= rep; r += 2) /* the head group's rows two at a time: one value walk for both */
                weighted_rows2(acc + r * hdv, acc + (r + 1) * hdv, scores + r * max_ctx, scores + (r + 1) * max_ctx, vc,
                               table, lo, n_keys, block_size, kv_heads, kvh, hdv, is_bf16);
            if (r < rep)
                weighted_rows(acc + r * hdv, scores + r * max_ctx, vc, table, lo, n_keys, block_size, kv_heads, kvh,
                              hdv, is_bf16);
            for (int64_t r = 0; r < rep; r++) {
                float inv = n_keys ? 1.0f / denom[r] : 0.f;
                for (int64_t e = 0; e < hdv; e++) acc[r * hdv + e] *= inv;
                store_row(out, (t * n_heads + kvh * rep + r) * hdv, acc + r * hdv, hdv, is_bf16);
            }
        }
    }
}

int ml_paged_attention(const void *q, int64_t q_st, int64_t q_sn, const void *kc, const void *vc,
                       const int32_t *block_tables, int64_t m_stride, int64_t m_width, int64_t num_blocks,
                       const int32_t *seq_lens, const int32_t *qsl, void *out, const float *sinks, int64_t num_seqs,
                       int64_t t_rows, int64_t n_heads, int64_t kv_heads, int64_t hd, int64_t hdv, int64_t block_size,
                       int64_t window, float scale, int is_bf16, int nt) {
    int64_t rep = n_heads / kv_heads;
    int64_t max_ctx = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        int64_t ctx = seq_lens[s], used = (ctx + block_size - 1) / block_size;
        if (ctx < 0 || used > m_width || qsl[s] < 0 || qsl[s + 1] < qsl[s] || qsl[s + 1] > t_rows) return -2;
        for (int64_t b = 0; b < used; b++)
            if (block_tables[s * m_stride + b] < 0 || block_tables[s * m_stride + b] >= num_blocks) return -2;
        max_ctx = ctx > max_ctx ? ctx : max_ctx;
    }
    /* Per (token, kv head): its rep query heads together, so each key and value row is read once for all of them.
     * Sequences split over nt threads (OpenMP: torch's own pool where the library links torch's libgomp), each with
     * its scratch; a row is computed by the same code on any thread. */
    size_t scratch = sizeof(float) * (size_t)(rep * (max_ctx + hd + hdv) + hd);
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *buf = malloc(scratch);
#pragma omp for schedule(dynamic, 8)
        for (int64_t s = 0; s < num_seqs; s++) {
            if (!buf) {
                failed = 1; /* every thread that fails writes the same value */
                continue;
            }
            attend_sequence(q, q_st, q_sn, kc, vc, block_tables + s * m_stride, qsl[s], qsl[s + 1] - qsl[s], seq_lens[s],
                            out, sinks, n_heads, kv_heads, hd, hdv, block_size, window, scale, is_bf16, max_ctx, buf);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* ---- the GQA attention input: q/k norm, rotary, KV write ---------------------------------------------------------- */

/* One head row in float32 (`x`, hd values): the per-head RMSNorm when w is not NULL (x / rms(x), rounded to bf16
 * under is_bf16, times w, rounded), then the NeoX rotation of the first r dims by (c, s) = cos_sin[pos] (rounded to
 * bf16 under is_bf16, each product and sum rounded as torch's x * cos + rotate_half(x) * sin). */
static void norm_rope_row(float *x, int64_t hd, const void *w, float eps, const float *cs, int64_t r, int is_bf16) {
    if (w) {
        float inv = inv_rms(x, hd, eps);
        for (int64_t d = 0; d < hd; d++) {
            float n = x[d] * inv;
            if (is_bf16)
                x[d] = round_bf16(round_bf16(n) * bf16_to_f32(((const bf16_t *)w)[d]));
            else
                x[d] = n * ((const float *)w)[d];
        }
    }
    int64_t half = r / 2;
    for (int64_t i = 0; i < half; i++) {
        float c = cs[i], s = cs[half + i], x1 = x[i], x2 = x[half + i];
        if (is_bf16) {
            c = round_bf16(c);
            s = round_bf16(s);
            x[i] = round_bf16(round_bf16(x1 * c) + round_bf16(-x2 * s));
            x[half + i] = round_bf16(round_bf16(x2 * c) + round_bf16(x1 * s));
        } else {
            x[i] = x1 * c + (-x2) * s;
            x[half + i] = x2 * c + x1 * s;
        }
    }
}

/* q [T, N, hd], k [T, K, hd], v [T, K, hdv] with strides (token, head) in elements, the last dim dense; positions
 * int64 [T]; cos_sin float32 [P, r] (cos in the first r/2 columns); caches [blocks, block_size, K, hd / hdv]
 * addressed by slots int64 [T] (slot < 0: written nowhere); q_norm / k_norm (NULL: no norm) [hd]. Writes the normed,
 * roped k and v into the caches and the normed, roped q into q_out [T, N, hd] (dense). num_positions: the table's
 * rows; num_slots: the caches' slots. Tokens split over nt threads once every position and slot is checked. Returns 0; -1 when out of memory; -2 when a position or a slot is out of range
 * (checked first: nothing is written). */
int ml_rope_write_kv(const void *q, int64_t q_st, int64_t q_sn, const void *k, int64_t k_st, int64_t k_sk,
                     const void *v, int64_t v_st, int64_t v_sk, const int64_t *positions, const float *cos_sin,
                     int64_t r, int64_t num_positions, void *kc, void *vc, const int64_t *slots, int64_t num_slots,
                     const void *q_norm, const void *k_norm, float eps, void *q_out, int64_t t_rows, int64_t n_heads,
                     int64_t kv_heads, int64_t hd, int64_t hdv, int is_bf16, int nt) {
    for (int64_t t = 0; t < t_rows; t++)
        if (positions[t] < 0 || positions[t] >= num_positions || slots[t] >= num_slots) return -2;
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
    float *x = malloc(sizeof(float) * (size_t)(hd > hdv ? hd : hdv));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_rows; t++) {
        if (!x) {
            failed = 1;
            continue;
        }
        const float *cs = cos_sin + positions[t] * r;
        for (int64_t n = 0; n < n_heads; n++) {
            load_row(x, q, t * q_st + n * q_sn, hd, is_bf16);
            norm_rope_row(x, hd, q_norm, eps, cs, r, is_bf16);
            store_row(q_out, (t * n_heads + n) * hd, x, hd, is_bf16);
        }
        int64_t slot = slots[t];
        if (slot < 0) continue;
        for (int64_t h = 0; h < kv_heads; h++) {
            load_row(x, k, t * k_st + h * k_sk, hd, is_bf16);
            norm_rope_row(x, hd, k_norm, eps, cs, r, is_bf16);
            store_row(kc, (slot * kv_heads + h) * hd, x, hd, is_bf16);
            load_row(x, v, t * v_st + h * v_sk, hdv, is_bf16);
            store_row(vc, (slot * kv_heads + h) * hdv, x, hdv, is_bf16);
        }
    }
    free(x);
    }
    return failed ? -1 : 0;
}

/* ---- SiLU-mul and the greedy pick ------------------------------------------------------------------------------ */

/* out [T, I] = silu(gate) * up, rounded as torch's two ops (silu rounded to bf16, then the product) under is_bf16;
 * gate and up rows at strides g_st / u_st (elements), their last dim dense. */
void ml_silu_mul(const void *gate, int64_t g_st, const void *up, int64_t u_st, void *out, int64_t rows, int64_t inter,
                 int is_bf16) {
    for (int64_t t = 0; t < rows; t++)
        for (int64_t i = 0; i < inter; i++) {
            if (is_bf16) {
                float g = bf16_to_f32(((const bf16_t *)gate)[t * g_st + i]);
                float u = bf16_to_f32(((const bf16_t *)up)[t * u_st + i]);
                ((bf16_t *)out)[t * inter + i] = f32_to_bf16(round_bf16(silu(g)) * u);
            } else {
                float g = ((const float *)gate)[t * g_st + i];
                ((float *)out)[t * inter + i] = silu(g) * ((const float *)up)[t * u_st + i];
            }
        }
}

/* ids [rows] = the index of each row's largest value, the first of equals; a NaN counts as the largest (the first
 * NaN), as torch.argmax. float32 or bfloat16 rows of v values, dense. One pass over 16 independent lanes (lane j sees
 * values j, j + 16, ...; each keeps its largest and the first index holding it), which the compiler vectorises, then
 * the lanes merged: the largest, the lowest index among equals. */
#define ARGMAX_LANES 16
static int64_t argmax_f32(const float *row, int64_t v) {
    float m[ARGMAX_LANES];
    int64_t at[ARGMAX_LANES];
    int32_t nan[ARGMAX_LANES];
    for (int j = 0; j < ARGMAX_LANES; j++) {
        m[j] = -INFINITY;
        at[j] = -1;
        nan[j] = 0;
    }
    int64_t i = 0;
    for (; i + ARGMAX_LANES <= v; i += ARGMAX_LANES)
        for (int j = 0; j < ARGMAX_LANES; j++) {
            float f = row[i + j];
            int take = f > m[j] || (at[j] < 0 && f == m[j]);
            m[j] = take ? f : m[j];
            at[j] = take ? i + j : at[j];
            nan[j] |= f != f;
        }
    int any_nan = 0;
    for (int j = 0; j < ARGMAX_LANES; j++) any_nan |= nan[j];
    for (int64_t k = i; k < v; k++) any_nan |= row[k] != row[k];
    if (any_nan) {
        for (int64_t k = 0; k < v; k++)
            if (row[k] != row[k]) return k;
    }
    float best = -INFINITY;
    int64_t best_at = -1;
    for (int j = 0; j < ARGMAX_LANES; j++)
        if (at[j] >= 0 && (m[j] > best || (m[j] == best && at[j] < best_at) || best_at < 0)) {
            best = m[j];
            best_at = at[j];
        }
    for (int64_t k = i; k < v; k++)
        if (row[k] > best || best_at < 0) {
            best = row[k];
            best_at = k;
        }
    return best_at < 0 ? 0 : best_at;
}

void ml_argmax_rows(const void *x, int is_bf16, int64_t *ids, int64_t rows, int64_t v) {
    float *tmp = NULL;
    for (int64_t r = 0; r < rows; r++) {
        if (!is_bf16) {
            ids[r] = argmax_f32((const float *)x + r * v, v);
            continue;
        }
        if (!tmp && !(tmp = malloc(sizeof(float) * (size_t)v))) { /* no memory: the scalar walk */
            const bf16_t *row = (const bf16_t *)x + r * v;
            int64_t best = 0;
            for (int64_t k = 0; k < v; k++) {
                float f = bf16_to_f32(row[k]), b = bf16_to_f32(row[best]);
                if (f != f) { best = k; break; }
                if (f > b) best = k;
            }
            ids[r] = best;
            continue;
        }
        for (int64_t k = 0; k < v; k++) tmp[k] = bf16_to_f32(((const bf16_t *)x)[r * v + k]);
        ids[r] = argmax_f32(tmp, v);
    }
    free(tmp);
}

/* The ABI this file offers; cpu_native_build.py refuses a library that reports another. */
int64_t ml_abi_version(void) { return 5; }

/* The size of a team of nt threads as this build makes it: nt with OpenMP (torch's libgomp pool), 1 without. */
int ml_team_size(int nt) {
    int size = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp single
        size = omp_get_num_threads();
    }
#endif
    (void)nt;
    return size;
}
