/* Matmuls straight from GGUF blocks on the CPU: y[T, N] = x[T, K] @ W[N, K].T, W in its file's
 * blocks (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0), x float32 or bf16, T small (decode, 1 to 16).
 *
 * x is quantized once per call to int8 blocks of 32 with a float scale (and the sums of each 16
 * of its int8 values); a row's block then dots with x's blocks in integers (AVX2 multiply-add of
 * unsigned by signed bytes, AVX-VNNI / AVX512-VNNI where the compiler has them), and the block
 * scales apply in float. Weight values are kept unsigned (Q4_0: q in 0..15 for q - 8; Q6_K: 0..63
 * for q - 32): the offset times x's block sum is taken off once per block. The error is that of
 * x's rounding to int8 (half a step of amax / 127 per value); the weights are read exactly.
 *
 * Work: the caller's thread and a small pool of pthreads (grown to the largest count asked)
 * split the rows of every job of a call evenly, so a layer's gate and up, or several experts,
 * take one dispatch; each row is read once and dotted with all T rows of x from L1.
 * The pool's workers spin briefly after a call, then sleep on a condition variable. */

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_Q5_K = 13, T_Q4_K = 12, T_Q6_K = 14 };
#define QK 32     /* x's int8 block */
#define MAX_THREADS 256

typedef struct {
    int qtype;
    const uint8_t *w; /* N rows of blocks, contiguous */
    int64_t N, K;
    const void *x;    /* [T, K] float32 or bf16, rows contiguous */
    int x_bf16;
    int64_t T;
    float *y;         /* [T, N] float32 */
} qdot_job;

/* x of one job, quantized: per token, K int8 values, K/32 scales, K/32 scaled sums, K/16 sums */
typedef struct {
    int8_t *q;
    float *d;    /* [T, K/32] */
    float *ds;   /* [T, K/32] d * sum of the block's int8 values */
    int16_t *s16;/* [T, K/16] sums of each 16 int8 values */
} xq_t;

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float rd_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return f16_to_f32(h);
#endif
}

static inline float x_at(const void *x, int bf16, int64_t i) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t b = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* one block of 32 values into int8 (q, its scale d, d * sum q, the sums of each 16); with
 * `residual`, v is left holding what the int8 values miss (v - q * d) */
static inline void quantize_block(float *v, int8_t *q, float *d, float *ds, int16_t *s16, int residual) {
    float amax = 0.f;
    for (int i = 0; i < QK; i++) {
        float a = fabsf(v[i]);
        amax = a > amax ? a : amax;
    }
    float db = amax / 127.f, id = db > 0.f ? 127.f / amax : 0.f;
    int s0 = 0, s1 = 0;
    for (int i = 0; i < QK; i++) {
        int qi = (int)nearbyintf(v[i] * id);
        qi = qi > 127 ? 127 : qi < -127 ? -127 : qi;
        q[i] = (int8_t)qi;
        if (i < 16) s0 += qi; else s1 += qi;
        if (residual) v[i] -= (float)qi * db;
    }
    *d = db;
    *ds = db * (float)(s0 + s1);
    s16[0] = (int16_t)s0;
    s16[1] = (int16_t)s1;
}

/* one token's K values of x into `levels` rows of int8 blocks (row offsets `at`, then `at + 1`):
 * the values, then (levels 2) what the first row misses, so that the two rows' sum holds x to
 * about 2**-14 of each block's largest value */
static void quantize_row(const void *x, int bf16, int64_t off, int64_t K, const xq_t *o, int64_t at, int levels) {
    float v[QK];
    for (int64_t b = 0; b < K / QK; b++) {
        for (int i = 0; i < QK; i++) v[i] = x_at(x, bf16, off + b * QK + i);
        for (int l = 0; l < levels; l++) {
            int64_t r = at + l;
            quantize_block(v, o->q + r * K + b * QK, o->d + r * (K / 32) + b, o->ds + r * (K / 32) + b,
                           o->s16 + r * (K / 16) + 2 * b, l + 1 < levels);
        }
    }
}

/* Q4_K / Q5_K: 8 six-bit scales and mins from their 12 bytes */
static inline void scales_k4(const uint8_t *s, uint8_t *sc, uint8_t *m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* ---------- plain C: the reference path of every type (any architecture) ---------- */

static float dot_q4_0_c(const uint8_t *w, const int8_t *q, const float *d, const float *ds, const int16_t *s16,
                        int64_t K) {
    (void)s16;
    float acc = 0.f;
    for (int64_t b = 0; b < K / 32; b++, w += 18) {
        int s = 0;
        for (int l = 0; l < 16; l++) s += (w[2 + l] & 15) * q[b * 32 + l] + (w[2 + l] >> 4) * q[b * 32 + l + 16];
        float dw = rd_f16(w);
        acc += dw * (d[b] * (float)s - 8.f * ds[b]);
    }
    return acc;
}

static float dot_q4_1_c(const uint8_t *w, const int8_t *q, const float *d, const float *ds, const int16_t *s16,
                        int64_t K) {
    (void)s16;
    float acc = 0.f;
    for (int64_t b = 0; b < K / 32; b++, w += 20) {
        int s = 0;
        for (int l = 0; l < 16; l++) s += (w[4 + l] & 15) * q[b * 32 + l] + (w[4 + l] >> 4) * q[b * 32 + l + 16];
        acc += rd_f16(w) * d[b] * (float)s + rd_f16(w + 2) * ds[b];
    }
    return acc;
}

static float dot_q8_0_c(const uint8_t *w, const int8_t *q, const float *d, const float *ds, const int16_t *s16,
                        int64_t K) {
    (void)ds; (void)s16;
    float acc = 0.f;
    for (int64_t b = 0; b < K / 32; b++, w += 34) {
        const int8_t *wq = (const int8_t *)(w + 2);
        int s = 0;
        for (int l = 0; l < 32; l++) s += wq[l] * q[b * 32 + l];
        acc += rd_f16(w) * d[b] * (float)s;
    }
    return acc;
}

static float dot_q4_k_c(const uint8_t *w, const int8_t *q, const float *d, const float *ds, const int16_t *s16,
                        int64_t K) {
    (void)s16;
    float acc = 0.f;
    uint8_t sc[8], m[8];
    for (int64_t sb = 0; sb < K / 256; sb++, w += 144) {
        float dw = rd_f16(w), dmin = rd_f16(w + 2);
        scales_k4(w + 4, sc, m);
        const uint8_t *qs = w + 16;
        for (int j = 0; j < 4; j++) {
            int64_t b = sb * 8 + 2 * j;
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                lo += (qs[32 * j + l] & 15) * q[b * 32 + l];
                hi += (qs[32 * j + l] >> 4) * q[(b + 1) * 32 + l];
            }
            acc += dw * (sc[2 * j] * d[b] * (float)lo + sc[2 * j + 1] * d[b + 1] * (float)hi);
            acc -= dmin * (m[2 * j] * ds[b] + m[2 * j + 1] * ds[b + 1]);
        }
    }
    return acc;
}

static float dot_q5_k_c(const uint8_t *w, const int8_t *q, const float *d, const float *ds, const int16_t *s16,
                        int64_t K) {
    (void)s16;
    float acc = 0.f;
    uint8_t sc[8], m[8];
    for (int64_t sb = 0; sb < K / 256; sb++, w += 176) {
        float dw = rd_f16(w), dmin = rd_f16(w + 2);
        scales_k4(w + 4, sc, m);
        const uint8_t *qh = w + 16, *qs = w + 48;
        for (int j = 0; j < 4; j++) {
            int64_t b = sb * 8 + 2 * j;
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                int vl = (qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4);
                int vh = (qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
                lo += vl * q[b * 32 + l];
                hi += vh * q[(b + 1) * 32 + l];
            }
            acc += dw * (sc[2 * j] * d[b] * (float)lo + sc[2 * j + 1] * d[b + 1] * (float)hi);
            acc -= dmin * (m[2 * j] * ds[b] + m[2 * j + 1] * ds[b + 1]);
        }
    }
    return acc;
}

static float dot_q6_k_c(const uint8_t *w, const int8_t *q, const float *d, const float *ds, const int16_t *s16,
                        int64_t K) {
    (void)ds;
    float acc = 0.f;
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *sc = (const int8_t *)(w + 192);
        float dw = rd_f16(w + 208);
        for (int h = 0; h < 2; h++) {
            for (int g = 0; g < 4; g++) {
                int64_t b = sb * 8 + h * 4 + g;
                int s0 = 0, s1 = 0;
                for (int l = 0; l < 32; l++) {
                    uint8_t lq = ql[64 * h + 32 * (g & 1) + l];
                    int v = ((g < 2) ? (lq & 15) : (lq >> 4)) | (((qh[32 * h + l] >> (2 * g)) & 3) << 4);
                    if (l < 16) s0 += v * q[b * 32 + l]; else s1 += v * q[b * 32 + l];
                }
                int j = h * 8 + g * 2;
                int isum = sc[j] * (s0 - 32 * s16[2 * b]) + sc[j + 1] * (s1 - 32 * s16[2 * b + 1]);
                acc += dw * d[b] * (float)isum;
            }
        }
    }
    return acc;
}

/* ---------- AVX2 (with VNNI where compiled for it): a row against all T tokens ---------- */

#if defined(__AVX2__)
/* 8 int32 sums of 4 products of unsigned a by signed b */
static inline __m256i mul_sum_u8_i8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lane j = the sum of p[j]'s 8 lanes */
static inline __m256i reduce8(const __m256i *p) {
    __m256i a01 = _mm256_hadd_epi32(p[0], p[1]), a23 = _mm256_hadd_epi32(p[2], p[3]);
    __m256i a45 = _mm256_hadd_epi32(p[4], p[5]), a67 = _mm256_hadd_epi32(p[6], p[7]);
    __m256i b03 = _mm256_hadd_epi32(a01, a23), b47 = _mm256_hadd_epi32(a45, a67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(b03, b47, 0x20), _mm256_permute2x128_si256(b03, b47, 0x31));
}

static inline __m256i ld(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 16 bytes of nibbles -> 32 bytes: the low nibbles, then the high ones */
static inline __m256i nibbles16(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
}

static inline __m256 f16x8(const uint8_t *w, int stride) { /* 8 halves `stride` bytes apart */
    uint16_t h[8];
    for (int k = 0; k < 8; k++) memcpy(&h[k], w + k * stride, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

static inline __m256 u8x8(const uint8_t *v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)v))); }

#define XQ(t) (x->q + (t) * K)
#define XD(t) (x->d + (t) * (K / 32))
#define XDS(t) (x->ds + (t) * (K / 32))
#define XS16(t) (x->s16 + (t) * (K / 16))

/* Q4_0, Q4_1, Q8_0: eight blocks (256 values) at a time, the rest block by block in plain C */
static void row_q4_0_avx2(const uint8_t *w, const xq_t *x, int64_t T, int64_t K, float *y, int64_t N) {
    __m256 acc[16];
    for (int64_t t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    int64_t nb = K / 32, n8 = nb / 8 * 8;
    for (int64_t b = 0; b < n8; b += 8) {
        const uint8_t *wb = w + b * 18;
        __m256i v[8], p[8];
        for (int k = 0; k < 8; k++) v[k] = nibbles16(wb + k * 18 + 2);
        __m256 dw = f16x8(wb, 18), dw8 = _mm256_mul_ps(dw, _mm256_set1_ps(8.f));
        for (int64_t t = 0; t < T; t++) {
            for (int k = 0; k < 8; k++) p[k] = mul_sum_u8_i8(v[k], ld(XQ(t) + (b + k) * 32));
            __m256 s = _mm256_cvtepi32_ps(reduce8(p));
            acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, _mm256_loadu_ps(XD(t) + b)), acc[t]);
            acc[t] = _mm256_fnmadd_ps(dw8, _mm256_loadu_ps(XDS(t) + b), acc[t]);
        }
    }
    for (int64_t t = 0; t < T; t++)
        y[t * N] = hsum8(acc[t]) + (nb > n8 ? dot_q4_0_c(w + n8 * 18, XQ(t) + n8 * 32, XD(t) + n8, XDS(t) + n8,
                                                       XS16(t) + n8 * 2, (nb - n8) * 32) : 0.f);
}

static void row_q4_1_avx2(const uint8_t *w, const xq_t *x, int64_t T, int64_t K, float *y, int64_t N) {
    __m256 acc[16];
    for (int64_t t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    int64_t nb = K / 32, n8 = nb / 8 * 8;
    for (int64_t b = 0; b < n8; b += 8) {
        const uint8_t *wb = w + b * 20;
        __m256i v[8], p[8];
        for (int k = 0; k < 8; k++) v[k] = nibbles16(wb + k * 20 + 4);
        __m256 dw = f16x8(wb, 20), mw = f16x8(wb + 2, 20);
        for (int64_t t = 0; t < T; t++) {
            for (int k = 0; k < 8; k++) p[k] = mul_sum_u8_i8(v[k], ld(XQ(t) + (b + k) * 32));
            __m256 s = _mm256_cvtepi32_ps(reduce8(p));
            acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, _mm256_loadu_ps(XD(t) + b)), acc[t]);
            acc[t] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(XDS(t) + b), acc[t]);
        }
    }
    for (int64_t t = 0; t < T; t++)
        y[t * N] = hsum8(acc[t]) + (nb > n8 ? dot_q4_1_c(w + n8 * 20, XQ(t) + n8 * 32, XD(t) + n8, XDS(t) + n8,
                                                       XS16(t) + n8 * 2, (nb - n8) * 32) : 0.f);
}

static void row_q8_0_avx2(const uint8_t *w, const xq_t *x, int64_t T, int64_t K, float *y, int64_t N) {
    __m256 acc[16];
    for (int64_t t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    int64_t nb = K / 32, n8 = nb / 8 * 8;
    for (int64_t b = 0; b < n8; b += 8) {
        const uint8_t *wb = w + b * 34;
        __m256i v[8], a[8], p[8];
        for (int k = 0; k < 8; k++) {
            v[k] = ld(wb + k * 34 + 2);
            a[k] = _mm256_sign_epi8(v[k], v[k]);
        }
        __m256 dw = f16x8(wb, 34);
        for (int64_t t = 0; t < T; t++) {
            for (int k = 0; k < 8; k++) p[k] = mul_sum_u8_i8(a[k], _mm256_sign_epi8(ld(XQ(t) + (b + k) * 32), v[k]));
            __m256 s = _mm256_cvtepi32_ps(reduce8(p));
            acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, _mm256_loadu_ps(XD(t) + b)), acc[t]);
        }
    }
    for (int64_t t = 0; t < T; t++)
        y[t * N] = hsum8(acc[t]) + (nb > n8 ? dot_q8_0_c(w + n8 * 34, XQ(t) + n8 * 32, XD(t) + n8, XDS(t) + n8,
                                                       XS16(t) + n8 * 2, (nb - n8) * 32) : 0.f);
}

/* Q4_K (hb 0) and Q5_K (hb 1): a super-block's 8 sub-blocks unpacked once, then each token */
static inline void row_k45(const uint8_t *w, const xq_t *x, int64_t T, int64_t K, float *y, int64_t N, int hb) {
    __m256 acc[16];
    for (int64_t t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(15), sixteen = _mm256_set1_epi8(16);
    const int64_t bs = hb ? 176 : 144;
    uint8_t sc[8], m[8];
    for (int64_t sb = 0; sb < K / 256; sb++, w += bs) {
        scales_k4(w + 4, sc, m);
        __m256 scv = _mm256_mul_ps(_mm256_set1_ps(rd_f16(w)), u8x8(sc));
        __m256 mv = _mm256_mul_ps(_mm256_set1_ps(rd_f16(w + 2)), u8x8(m));
        __m256i v[8], p[8];
        const uint8_t *qs = w + (hb ? 48 : 16);
        __m256i qh = hb ? ld(w + 16) : _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            __m256i qv = ld(qs + 32 * j);
            v[2 * j] = _mm256_and_si256(qv, low);
            v[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(qv, 4), low);
            if (hb) {
                __m256i bl = _mm256_set1_epi8((char)(1 << (2 * j))), bh = _mm256_set1_epi8((char)(1 << (2 * j + 1)));
                v[2 * j] = _mm256_or_si256(v[2 * j], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bl), bl), sixteen));
                v[2 * j + 1] = _mm256_or_si256(v[2 * j + 1],
                                               _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bh), bh), sixteen));
            }
        }
        for (int64_t t = 0; t < T; t++) {
            const int8_t *xq = XQ(t) + sb * 256;
            for (int k = 0; k < 8; k++) p[k] = mul_sum_u8_i8(v[k], ld(xq + 32 * k));
            __m256 s = _mm256_cvtepi32_ps(reduce8(p));
            acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(scv, _mm256_loadu_ps(XD(t) + sb * 8)), acc[t]);
            acc[t] = _mm256_fnmadd_ps(mv, _mm256_loadu_ps(XDS(t) + sb * 8), acc[t]);
        }
    }
    for (int64_t t = 0; t < T; t++) y[t * N] = hsum8(acc[t]);
}

static void row_q4_k_avx2(const uint8_t *w, const xq_t *x, int64_t T, int64_t K, float *y, int64_t N) {
    row_k45(w, x, T, K, y, N, 0);
}

static void row_q5_k_avx2(const uint8_t *w, const xq_t *x, int64_t T, int64_t K, float *y, int64_t N) {
    row_k45(w, x, T, K, y, N, 1);
}

static void row_q6_k_avx2(const uint8_t *w, const xq_t *x, int64_t T, int64_t K, float *y, int64_t N) {
    __m256 acc[16];
    for (int64_t t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(15), three = _mm256_set1_epi8(3);
    for (int64_t sb = 0; sb < K / 256; sb++, w += 210) {
        const int8_t *sc = (const int8_t *)(w + 192);
        __m256 dw = _mm256_set1_ps(rd_f16(w + 208));
        __m256i v[8], s16[8], p[8];
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = ld(w + 64 * h), ql1 = ld(w + 64 * h + 32), qh = ld(w + 128 + 32 * h);
            __m256i *o = v + 4 * h;
            o[0] = _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_slli_epi16(_mm256_and_si256(qh, three), 4));
            o[1] = _mm256_or_si256(_mm256_and_si256(ql1, low),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), three), 4));
            o[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), three), 4));
            o[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), three), 4));
        }
        for (int k = 0; k < 8; k++) /* int16 lanes 0-7 take the first 16 values' scale, 8-15 the last 16's */
            s16[k] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * k + 1]), _mm_set1_epi16(sc[2 * k]));
        __m256i scw = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        for (int64_t t = 0; t < T; t++) {
            const int8_t *xq = XQ(t) + sb * 256;
            for (int k = 0; k < 8; k++) p[k] = _mm256_madd_epi16(_mm256_maddubs_epi16(v[k], ld(xq + 32 * k)), s16[k]);
            /* lane b: sc[2b] * sum16[2b] + sc[2b + 1] * sum16[2b + 1], the offset's 32 times it */
            __m256i corr = _mm256_madd_epi16(ld(XS16(t) + sb * 16), scw);
            __m256i r = _mm256_sub_epi32(reduce8(p), _mm256_slli_epi32(corr, 5));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), _mm256_mul_ps(dw, _mm256_loadu_ps(XD(t) + sb * 8)), acc[t]);
        }
    }
    for (int64_t t = 0; t < T; t++) y[t * N] = hsum8(acc[t]);
}
#endif

typedef float (*dot_fn)(const uint8_t *, const int8_t *, const float *, const float *, const int16_t *, int64_t);
typedef void (*row_fn)(const uint8_t *, const xq_t *, int64_t, int64_t, float *, int64_t);

/* bytes of a row of K values, its plain dot, and its vector row kernel (NULL: none compiled) */
static int type_info(int qtype, int64_t K, int64_t *row_bytes, dot_fn *fn, row_fn *vec) {
    int64_t bs, bk;
    dot_fn c;
    row_fn v = NULL;
    switch (qtype) {
    case T_Q4_0: bs = 18; bk = 32; c = dot_q4_0_c; break;
    case T_Q4_1: bs = 20; bk = 32; c = dot_q4_1_c; break;
    case T_Q8_0: bs = 34; bk = 32; c = dot_q8_0_c; break;
    case T_Q4_K: bs = 144; bk = 256; c = dot_q4_k_c; break;
    case T_Q5_K: bs = 176; bk = 256; c = dot_q5_k_c; break;
    case T_Q6_K: bs = 210; bk = 256; c = dot_q6_k_c; break;
    default: return -1;
    }
    if (K <= 0 || K % bk) return -2;
#if defined(__AVX2__)
    switch (qtype) {
    case T_Q4_0: v = row_q4_0_avx2; break;
    case T_Q4_1: v = row_q4_1_avx2; break;
    case T_Q8_0: v = row_q8_0_avx2; break;
    case T_Q4_K: v = row_q4_k_avx2; break;
    case T_Q5_K: v = row_q5_k_avx2; break;
    case T_Q6_K: v = row_q6_k_avx2; break;
    }
#endif
    *row_bytes = K / bk * bs;
    *fn = c;
    *vec = v;
    return 0;
}

/* ---------- the pool ---------- */

typedef void (*task_fn)(void *arg, int i, int n);

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t wake_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cv = PTHREAD_COND_INITIALIZER;
static int n_workers;           /* pool threads (the caller is thread 0) */
static atomic_int generation;   /* bumped for each dispatch */
static atomic_int pending;      /* workers still running the current dispatch */
static task_fn cur_fn;
static void *cur_arg;
static int cur_n;

#define SPIN_NS 30000 /* a worker spins 30 us after a dispatch (back-to-back calls find it awake), then sleeps */

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef struct { int me, seen; } worker_arg;

static void *worker_main(void *p) {
    worker_arg wa = *(worker_arg *)p;
    free(p);
    int me = wa.me, seen = wa.seen; /* (the generation at its creation: a dispatch after it is its first) */
    for (;;) {
        int g, spins = 0;
        int64_t until = now_ns() + SPIN_NS;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            cpu_relax();
            if (!(++spins & 63) && now_ns() > until) break;
        }
        if (g == seen) {
            pthread_mutex_lock(&wake_mu);
            while ((g = atomic_load(&generation)) == seen) pthread_cond_wait(&wake_cv, &wake_mu);
            pthread_mutex_unlock(&wake_mu);
        }
        seen = g;
        if (me < cur_n) cur_fn(cur_arg, me, cur_n);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
    }
    return NULL;
}

/* a forked child has none of the parent's workers: it starts its own pool */
static void pool_after_fork(void) {
    n_workers = 0;
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&wake_mu, NULL);
    pthread_cond_init(&wake_cv, NULL);
}

/* run fn(arg, i, n) for i in 0..n-1, i = 0 on the calling thread; returns n actually used */
static int dispatch(task_fn fn, void *arg, int n) {
    static int registered;
    if (!registered) {
        registered = 1;
        pthread_atfork(NULL, NULL, pool_after_fork);
    }
    while (n_workers < n - 1 && n_workers < MAX_THREADS - 1) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        worker_arg *wa = malloc(sizeof *wa);
        if (!wa) break;
        wa->me = n_workers + 1;
        wa->seen = atomic_load(&generation);
        int rc = pthread_create(&t, &a, worker_main, wa);
        pthread_attr_destroy(&a);
        if (rc) {
            free(wa);
            break;
        }
        n_workers++;
    }
    if (n > n_workers + 1) n = n_workers + 1;
    if (n <= 1) {
        fn(arg, 0, 1);
        return 1;
    }
    cur_fn = fn;
    cur_arg = arg;
    cur_n = n;
    atomic_store(&pending, n_workers);
    pthread_mutex_lock(&wake_mu);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&wake_cv);
    pthread_mutex_unlock(&wake_mu);
    fn(arg, 0, n);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) cpu_relax();
    return n;
}

/* ---------- a call ---------- */

typedef struct {
    const qdot_job *jobs;
    int n_jobs;
    xq_t *xq;           /* per job (jobs of one x share their first's) */
    int64_t *row_start; /* [n_jobs + 1] prefix of rows */
    int64_t *row_bytes;
    dot_fn *fn;
    row_fn *vec; /* NULL entries: the plain dot, token by token */
    int levels;  /* int8 rows of x per token (2: the values and their residual) */
} call_t;

/* whether job j reads the x of job j - 1 (then it shares its quantization) */
static inline int same_x(const qdot_job *jobs, int j) {
    return j && jobs[j].x == jobs[j - 1].x && jobs[j].K == jobs[j - 1].K && jobs[j].T == jobs[j - 1].T &&
           jobs[j].x_bf16 == jobs[j - 1].x_bf16;
}

static void quantize_task(void *p, int i, int n) {
    call_t *c = (call_t *)p;
    /* (job, token) pairs split across threads */
    int64_t total = 0;
    for (int j = 0; j < c->n_jobs; j++) total += same_x(c->jobs, j) ? 0 : c->jobs[j].T;
    int64_t lo = total * i / n, hi = total * (i + 1) / n, k = 0;
    for (int j = 0; j < c->n_jobs; j++) {
        const qdot_job *jb = &c->jobs[j];
        if (same_x(c->jobs, j)) continue;
        for (int64_t t = 0; t < jb->T; t++, k++) {
            if (k < lo || k >= hi) continue;
            quantize_row(jb->x, jb->x_bf16, t * jb->K, jb->K, &c->xq[j], t * c->levels, c->levels);
        }
    }
}

static void rows_task(void *p, int i, int n) {
    call_t *c = (call_t *)p;
    int64_t total = c->row_start[c->n_jobs];
    int64_t lo = total * i / n, hi = total * (i + 1) / n;
    for (int j = 0; j < c->n_jobs && lo < hi; j++) {
        int64_t a = c->row_start[j], b = c->row_start[j + 1];
        if (hi <= a || lo >= b) continue;
        const qdot_job *jb = &c->jobs[j];
        const xq_t *x = &c->xq[j];
        int64_t K = jb->K, r0 = (lo > a ? lo : a) - a, r1 = (hi < b ? hi : b) - a;
        const int64_t T2 = jb->T * c->levels;
        float tmp[32];
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row = jb->w + r * c->row_bytes[j];
            for (int64_t t0 = 0; t0 < T2; t0 += 32) { /* (a row kernel keeps 16 tokens' sums) */
                int64_t n = T2 - t0 < 32 ? T2 - t0 : 32;
                for (int64_t h = 0; h < n; h += 16) {
                    int64_t t = t0 + h, m = n - h < 16 ? n - h : 16;
                    if (c->vec[j]) {
                        xq_t v = {x->q + t * K, x->d + t * (K / 32), x->ds + t * (K / 32), x->s16 + t * (K / 16)};
                        c->vec[j](row, &v, m, K, tmp + h, 1);
                    } else {
                        for (int64_t u = 0; u < m; u++)
                            tmp[h + u] = c->fn[j](row, x->q + (t + u) * K, x->d + (t + u) * (K / 32),
                                                  x->ds + (t + u) * (K / 32), x->s16 + (t + u) * (K / 16), K);
                    }
                }
                for (int64_t u = 0; u < n; u += c->levels) /* (32 is a whole number of tokens' rows) */
                    jb->y[(t0 + u) / c->levels * jb->N + r] = c->levels == 2 ? tmp[u] + tmp[u + 1] : tmp[u];
            }
        }
    }
}

static __thread void *scratch;
static __thread size_t scratch_size;

/* Runs n_jobs matmuls on `threads` threads (the caller's included). plain: the C path only (tests);
 * levels: 1, x rounded to int8 blocks (a relative error of about 0.5% a dot product), or 2, its
 * residual rounded too and dotted as well (about 2**-14 of it, twice the integer work). 
 * Returns 0, or -1 for a type it has no kernel for, -2 for a K that is not a whole number of blocks,
 * -3 when out of memory. */
int qdot_run(const qdot_job *jobs, int n_jobs, int threads, int plain, int levels) {
    if (n_jobs <= 0) return 0;
    if (levels != 2) levels = 1;
    size_t need = 0;
    int64_t row_start[n_jobs + 1], row_bytes[n_jobs];
    dot_fn fn[n_jobs];
    row_fn vec[n_jobs];
    xq_t xq[n_jobs];
    row_start[0] = 0;
    for (int j = 0; j < n_jobs; j++) {
        int rc = type_info(jobs[j].qtype, jobs[j].K, &row_bytes[j], &fn[j], &vec[j]);
        if (rc) return rc;
        if (plain) vec[j] = NULL;
        row_start[j + 1] = row_start[j] + jobs[j].N;
        if (!same_x(jobs, j)) {
            size_t TK = (size_t)(jobs[j].T * levels * jobs[j].K);
            need += TK + TK / 32 * 8 + TK / 16 * 2 + 64;
        }
    }
    if (need > scratch_size) {
        free(scratch);
        scratch = malloc(need);
        scratch_size = scratch ? need : 0;
        if (!scratch) return -3;
    }
    char *s = (char *)scratch;
    for (int j = 0; j < n_jobs; j++) {
        if (same_x(jobs, j)) {
            xq[j] = xq[j - 1];
            continue;
        }
        int64_t TK = jobs[j].T * levels * jobs[j].K;
        xq[j].d = (float *)s; s += TK / 32 * 4;
        xq[j].ds = (float *)s; s += TK / 32 * 4;
        xq[j].s16 = (int16_t *)s; s += TK / 16 * 2;
        xq[j].q = (int8_t *)s; s += TK;
        s = (char *)(((uintptr_t)s + 63) & ~(uintptr_t)63);
    }
    call_t c = {jobs, n_jobs, xq, row_start, row_bytes, fn, vec, levels};
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_mutex_lock(&pool_mu);
    int64_t toks = 0;
    for (int j = 0; j < n_jobs; j++) toks += jobs[j].T;
    dispatch(quantize_task, &c, toks * levels * jobs[0].K >= 65536 ? threads : 1);
    int64_t rows = row_start[n_jobs];
    dispatch(rows_task, &c, rows < threads * 4 ? (int)(rows / 4 > 1 ? rows / 4 : 1) : threads);
    pthread_mutex_unlock(&pool_mu);
    return 0;
}

/* The vector path compiled in: 0 plain C, 1 AVX2, 2 AVX2 with VNNI. */
int qdot_isa(void) {
#if defined(__AVX2__) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
