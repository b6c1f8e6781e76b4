/* Matmuls straight from GGUF blocks on the CPU: y[T, N] = x[T, K] @ W[N, K].T, W in its file's
 * blocks (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0), x float32 or bf16, T small (decode, 1 to 64).
 *
 * x is quantized once per call to int16 blocks of 32 with a float scale: 127 steps of the block's
 * largest value (levels 1), or 256 times finer (levels 2: the precision of an int8 row and its
 * int8 residual, in one integer pass). A weight row is read a group of 256 values at a time (a
 * K-quant's super-block, eight blocks of the others) and unpacked once into signed int16 values
 * and per-block float scales and mins (grp_t); every token of the call is dotted with that group,
 * so each type is only an unpacking, and three dots serve them all: plain C (any architecture),
 * AVX2 token by token (a few tokens: x as two signed bytes, xh and xl, dotted with the weights'
 * unsigned bytes, each block's sums reduced across lanes; levels 1, xl alone), and tokens in the
 * lanes of a vector (from the type's lanes_min tokens: a pair of int16 weights is broadcast and
 * dotted with 8, or with AVX-512 16, tokens' pairs at once, no reduction, and four rows share each
 * load of x; qdot_lanes.h; levels 1, from LANES_MIN_BYTES tokens, 4 of the weights' unsigned bytes
 * against 8 tokens' 4 bytes of x). AVX-VNNI / AVX512-VNNI's dots (vpdpbusd, vpdpwssd) replace
 * AVX2's multiply-adds where compiled in.
 *
 * NOTE [ one rounding for every path ]
 * A block's integer sums are exact in any order, and its float term is
 * fma(hi, s2 * dx, lo * (s * dx)) (Q6_K: a scale per 16) or fma(lo + hi, s * dx, mn * ds); a
 * group's 8 terms are added in one tree ((t0+t4)+(t2+t6))+((t1+t5)+(t3+t7)) (hsum8's order), and
 * the groups in order. The library is built without floating contraction (native.py), so the
 * plain, token and lanes paths give the same bits, and a token's row does not depend on the
 * other tokens of its call (qlinear.py relies on it: NOTE [ native blocks on the CPU device ]).
 *
 * Work: the rows of every job of a call are cut into pieces that the caller's thread and a small
 * pool of pthreads (grown to the largest count asked) claim one at a time (NOTE [ pieces claimed,
 * not handed out ]), so a layer's gate and up, or several experts, take one dispatch. The pool's
 * workers spin briefly after a call, then sleep on a condition variable. */

#define _GNU_SOURCE /* (sched_getaffinity: NOTE [ spinning that gives way ]) */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_Q5_K = 13, T_Q4_K = 12, T_Q6_K = 14 };
#define G 256         /* values of a group */
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

/* a row's group of 256 values, unpacked: the values as signed int16; per block of 32 the scale of
 * its values (s; Q6_K: s of the first 16, s2 of the last 16) and what multiplies x's block sum
 * (mn: the block's min, 0 where the type has none). Blocks past a row's end are zero. */
typedef struct {
    int16_t w[G];
    float s[8], s2[8], mn[8];
} __attribute__((aligned(32))) grp_t;

/* x of one job, quantized (Kp: K rounded up to a group), each integer X as 256 * xh + xl (both
 * signed bytes) in the token layout: xh, xl [T][Kp], sx (X's sum over each block) and sx16 (over
 * its first 16) [T][Kp/32]. Lanes layout (lanes: the vector's int32 lanes, 8 or 16), per chunk of
 * two vectors of tokens (Tp of them, padded with zero tokens to a whole vector): q [Kp/2][Tp][2]
 * int16 (a token's pairs 4 bytes from the next token's), or where X fits a byte (bytes: levels 1,
 * 8 lanes) qb [Kp/4][Tp][4] int8 (a token's quads 4 bytes from the next token's). d (the block's
 * scale) and ds (d * sx), and for qb sx and sx16: [T][Kp/32], or [Kp/32][Tp] in lanes. */
typedef struct {
    int8_t *xh, *xl;
    int32_t *sx, *sx16;
    int16_t *q;
    int8_t *qb;
    float *d, *ds;
    int lanes; /* 0: the token layout */
    int bytes; /* lanes: qb, not q */
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

/* block b of one token's K values (x NULL: a padding token of zeros) as integers of `steps` steps
 * of its largest value; returns their scale, their sum in *sum, the first 16's in *sum16 */
static float quantize_block(const void *x, int bf16, int64_t off, int64_t K, int64_t b, int steps, int *X,
                            int *sum, int *sum16) {
    float v[32], amax = 0.f;
    for (int i = 0; i < 32; i++) {
        v[i] = x && b * 32 + i < K ? x_at(x, bf16, off + b * 32 + i) : 0.f;
        float a = fabsf(v[i]);
        amax = a > amax || a != a ? a : amax; /* a NaN stays: its scale, and so the dot, is NaN */
    }
    float id = amax > 0.f ? (float)steps / amax : 0.f;
    *sum = *sum16 = 0;
    for (int i = 0; i < 32; i++) {
        int qi = (int)nearbyintf(v[i] * id);
        X[i] = qi > steps ? steps : qi < -steps ? -steps : qi;
        *sum += X[i];
        if (i == 15) *sum16 = *sum;
    }
    return amax / (float)steps;
}

/* one token into the token layout (at its row's xh, xl, sx, sx16, d, ds) */
static void quantize_tokens_row(const void *x, int bf16, int64_t off, int64_t K, int64_t Kp, int steps, int8_t *xh,
                                int8_t *xl, int32_t *sx, int32_t *sx16, float *d, float *ds) {
    for (int64_t b = 0; b < Kp / 32; b++) {
        int X[32], sum, sum16;
        d[b] = quantize_block(x, bf16, off, K, b, steps, X, &sum, &sum16);
        ds[b] = d[b] * (float)sum;
        sx[b] = sum;
        sx16[b] = sum16;
        for (int i = 0; i < 32; i++) { /* (|X| <= 127 * 256: xh in -127..127, xl in -128..127) */
            int h = (X[i] + 128) >> 8;
            xh[b * 32 + i] = (int8_t)h;
            xl[b * 32 + i] = (int8_t)(X[i] - 256 * h);
        }
    }
}

/* one token into the lanes layout (its lane of a chunk of Tp tokens: q, d, ds at the lane) */
static void quantize_lanes_row(const void *x, int bf16, int64_t off, int64_t K, int64_t Kp, int steps, int16_t *q,
                               float *d, float *ds, int64_t Tp) {
    for (int64_t b = 0; b < Kp / 32; b++) {
        int X[32], sum, sum16;
        d[b * Tp] = quantize_block(x, bf16, off, K, b, steps, X, &sum, &sum16);
        ds[b * Tp] = d[b * Tp] * (float)sum;
        for (int i = 0; i < 32; i++) q[((b * 32 + i) >> 1) * Tp * 2 + (i & 1)] = (int16_t)X[i];
    }
}

/* one token into the lanes layout in bytes (|X| <= 127: its lane of a chunk of Tp tokens: qb, sx,
 * sx16, d, ds at the lane) */
static void quantize_lanes_bytes_row(const void *x, int bf16, int64_t off, int64_t K, int64_t Kp, int steps,
                                     int8_t *qb, int32_t *sx, int32_t *sx16, float *d, float *ds, int64_t Tp) {
    for (int64_t b = 0; b < Kp / 32; b++) {
        int X[32], sum, sum16;
        d[b * Tp] = quantize_block(x, bf16, off, K, b, steps, X, &sum, &sum16);
        ds[b * Tp] = d[b * Tp] * (float)sum;
        sx[b * Tp] = sum;
        sx16[b * Tp] = sum16;
        for (int i = 0; i < 32; i++) qb[((b * 32 + i) >> 2) * Tp * 4 + (i & 3)] = (int8_t)X[i];
    }
}

/* ---------- each type's group: scales (shared), values (plain C and AVX2) ---------- */

/* Q4_K / Q5_K: 8 six-bit scales and mins from their 12 bytes */
static inline void scales_k4(const uint8_t *s, uint8_t *sc, uint8_t *m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

#if defined(__AVX2__) && defined(__F16C__)
#define SCALES_VEC 1 /* scales built in registers and stored whole: a vector load of ones stored
                      * a float at a time waits for the stores (no store-to-load forwarding) */
/* 8 halves bs bytes apart, without a trip through memory */
static inline __m256 f16x8(const uint8_t *p, int bs) {
    uint16_t h[8];
    for (int k = 0; k < 8; k++) memcpy(&h[k], p + k * bs, 2);
    return _mm256_cvtph_ps(_mm_setr_epi16((short)h[0], (short)h[1], (short)h[2], (short)h[3], (short)h[4], (short)h[5],
                                          (short)h[6], (short)h[7]));
}
#else
#define SCALES_VEC 0
#endif

/* blocks of 32 (Q4_0, Q4_1, Q8_0): nb blocks of bs bytes, the scale first, Q4_1's min after it */
static void scales_b32(const uint8_t *w, int nb, int bs, int has_min, grp_t *g) {
#if SCALES_VEC
    if (nb == 8) {
        __m256 s = f16x8(w, bs);
        _mm256_store_ps(g->s, s);
        _mm256_store_ps(g->s2, s);
        _mm256_store_ps(g->mn, has_min ? f16x8(w + 2, bs) : _mm256_setzero_ps());
        return;
    }
#endif
    for (int k = 0; k < 8; k++) {
        int in = k < nb;
        g->s[k] = g->s2[k] = in ? rd_f16(w + k * bs) : 0.f;
        g->mn[k] = in && has_min ? rd_f16(w + k * bs + 2) : 0.f;
        if (!in) memset(g->w + 32 * k, 0, 64);
    }
}

static void scales_k45(const uint8_t *w, grp_t *g) {
    float dw = rd_f16(w), dmin = rd_f16(w + 2);
#if SCALES_VEC /* (scales_k4 on 32-bit words, in registers; the same products, eight at a time) */
    uint32_t a, b, c;
    memcpy(&a, w + 4, 4);
    memcpy(&b, w + 8, 4);
    memcpy(&c, w + 12, 4);
    uint64_t sc = (a & 0x3f3f3f3fu) | (uint64_t)((c & 0x0f0f0f0fu) | ((a >> 6) & 0x03030303u) << 4) << 32;
    uint64_t m = (b & 0x3f3f3f3fu) | (uint64_t)(((c >> 4) & 0x0f0f0f0fu) | ((b >> 6) & 0x03030303u) << 4) << 32;
    __m256 s = _mm256_mul_ps(_mm256_set1_ps(dw), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc))));
    __m256 mn = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m))));
    _mm256_store_ps(g->s, s);
    _mm256_store_ps(g->s2, s);
    _mm256_store_ps(g->mn, _mm256_xor_ps(mn, _mm256_set1_ps(-0.f)));
#else
    uint8_t sc[8], m[8];
    scales_k4(w + 4, sc, m);
    for (int k = 0; k < 8; k++) {
        g->s[k] = g->s2[k] = dw * (float)sc[k];
        g->mn[k] = -(dmin * (float)m[k]);
    }
#endif
}

static void scales_q6_k(const uint8_t *w, grp_t *g) {
    const int8_t *sc = (const int8_t *)(w + 192);
    float dw = rd_f16(w + 208);
#if SCALES_VEC /* (the even scales, the first 16 values' of each block, then the odd ones) */
    __m128i eo = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)sc),
                                  _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    __m256 d8 = _mm256_set1_ps(dw);
    _mm256_store_ps(g->s, _mm256_mul_ps(d8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eo))));
    _mm256_store_ps(g->s2, _mm256_mul_ps(d8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(eo, 8)))));
    _mm256_store_ps(g->mn, _mm256_setzero_ps());
#else
    for (int k = 0; k < 8; k++) {
        g->s[k] = dw * (float)sc[2 * k];
        g->s2[k] = dw * (float)sc[2 * k + 1];
        g->mn[k] = 0.f;
    }
#endif
}

static void unpack_q4_0_c(const uint8_t *w, int nb, grp_t *g) {
    scales_b32(w, nb, 18, 0, g);
    for (int k = 0; k < nb; k++)
        for (int l = 0; l < 16; l++) {
            g->w[32 * k + l] = (int16_t)((w[18 * k + 2 + l] & 15) - 8);
            g->w[32 * k + 16 + l] = (int16_t)((w[18 * k + 2 + l] >> 4) - 8);
        }
}

static void unpack_q4_1_c(const uint8_t *w, int nb, grp_t *g) {
    scales_b32(w, nb, 20, 1, g);
    for (int k = 0; k < nb; k++)
        for (int l = 0; l < 16; l++) {
            g->w[32 * k + l] = w[20 * k + 4 + l] & 15;
            g->w[32 * k + 16 + l] = w[20 * k + 4 + l] >> 4;
        }
}

static void unpack_q8_0_c(const uint8_t *w, int nb, grp_t *g) {
    scales_b32(w, nb, 34, 0, g);
    for (int k = 0; k < nb; k++)
        for (int l = 0; l < 32; l++) g->w[32 * k + l] = (int8_t)w[34 * k + 2 + l];
}

static void unpack_q4_k_c(const uint8_t *w, int nb, grp_t *g) {
    (void)nb;
    scales_k45(w, g);
    const uint8_t *qs = w + 16;
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
            g->w[64 * j + l] = qs[32 * j + l] & 15;
            g->w[64 * j + 32 + l] = qs[32 * j + l] >> 4;
        }
}

static void unpack_q5_k_c(const uint8_t *w, int nb, grp_t *g) {
    (void)nb;
    scales_k45(w, g);
    const uint8_t *qh = w + 16, *qs = w + 48;
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
            g->w[64 * j + l] = (int16_t)((qs[32 * j + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4));
            g->w[64 * j + 32 + l] = (int16_t)((qs[32 * j + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4));
        }
}

static void unpack_q6_k_c(const uint8_t *w, int nb, grp_t *g) {
    (void)nb;
    scales_q6_k(w, g);
    const uint8_t *ql = w, *qh = w + 128;
    for (int h = 0; h < 2; h++)
        for (int q = 0; q < 4; q++)
            for (int l = 0; l < 32; l++) {
                uint8_t lq = ql[64 * h + 32 * (q & 1) + l];
                int v = ((q < 2) ? (lq & 15) : (lq >> 4)) | (((qh[32 * h + l] >> (2 * q)) & 3) << 4);
                g->w[128 * h + 32 * q + l] = (int16_t)(v - 32);
            }
}

#if defined(__AVX2__)
static inline __m256i ld(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* NOTE [ a row read ahead ]
 * The kernel streams its rows of blocks from host memory once (a layer's experts are not in any cache),
 * and a core's own hardware prefetch did not keep its loads ahead of the group's unpacking and dots:
 * the time of a row from memory was about its time from L2 plus the memory's, not the larger of the
 * two (bin/bench cpu-kernel --experts, BENCHMARKS.md, V1). So each group asks for the lines
 * PF_AHEAD bytes further along its row (into the next rows at a row's end: the piece's rows are
 * contiguous), which keeps several groups' reads in flight while this one computes. Where the
 * kernel has a few cores it is most of their speed; with the H200 hosts' 16 threads it made no
 * difference beyond the runs' spread (S4): together they already kept the memory busy. A prefetch
 * past the matrix's end reads nothing and never faults. */
#define PF_AHEAD 2048
static inline void prefetch_ahead(const uint8_t *wg, int64_t gbytes) {
    for (int64_t o = 0; o < gbytes; o += 64) __builtin_prefetch(wg + PF_AHEAD + o);
}

/* 32 signed bytes -> 32 int16 at dst */
static inline void st16(int16_t *dst, __m256i v) {
    _mm256_store_si256((__m256i *)dst, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)));
    _mm256_store_si256((__m256i *)(dst + 16), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)));
}

/* 16 bytes of nibbles -> 32 bytes: the low nibbles, then the high ones */
static inline __m256i nibbles16(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
}

static void unpack_q4_0_avx2(const uint8_t *w, int nb, grp_t *g) {
    scales_b32(w, nb, 18, 0, g);
    for (int k = 0; k < nb; k++) st16(g->w + 32 * k, _mm256_sub_epi8(nibbles16(w + 18 * k + 2), _mm256_set1_epi8(8)));
}

static void unpack_q4_1_avx2(const uint8_t *w, int nb, grp_t *g) {
    scales_b32(w, nb, 20, 1, g);
    for (int k = 0; k < nb; k++) st16(g->w + 32 * k, nibbles16(w + 20 * k + 4));
}

static void unpack_q8_0_avx2(const uint8_t *w, int nb, grp_t *g) {
    scales_b32(w, nb, 34, 0, g);
    for (int k = 0; k < nb; k++) st16(g->w + 32 * k, ld(w + 34 * k + 2));
}

/* Q4_K / Q5_K (hb: the fifth bits) run j of a super-block: its 32 low and 32 high values as bytes */
static inline void k45_run(const uint8_t *w, int hb, int j, __m256i *lo, __m256i *hi) {
    const __m256i low = _mm256_set1_epi8(15), sixteen = _mm256_set1_epi8(16);
    __m256i qv = ld(w + (hb ? 48 : 16) + 32 * j);
    *lo = _mm256_and_si256(qv, low);
    *hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), low);
    if (hb) {
        __m256i qh = ld(w + 16);
        __m256i bl = _mm256_set1_epi8((char)(1 << (2 * j))), bh = _mm256_set1_epi8((char)(1 << (2 * j + 1)));
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bl), bl), sixteen));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bh), bh), sixteen));
    }
}

static inline void unpack_k45_avx2(const uint8_t *w, grp_t *g, int hb) {
    scales_k45(w, g);
    for (int j = 0; j < 4; j++) {
        __m256i lo, hi;
        k45_run(w, hb, j, &lo, &hi);
        st16(g->w + 64 * j, lo);
        st16(g->w + 64 * j + 32, hi);
    }
}

static void unpack_q4_k_avx2(const uint8_t *w, int nb, grp_t *g) { (void)nb; unpack_k45_avx2(w, g, 0); }
static void unpack_q5_k_avx2(const uint8_t *w, int nb, grp_t *g) { (void)nb; unpack_k45_avx2(w, g, 1); }

/* Q6_K half h of a super-block: its four runs of 32 six-bit values (0..63) as bytes in o[0..3] */
static inline void q6_half(const uint8_t *w, int h, __m256i *o) {
    const __m256i low = _mm256_set1_epi8(15), three = _mm256_set1_epi8(3);
    __m256i ql0 = ld(w + 64 * h), ql1 = ld(w + 64 * h + 32), qh = ld(w + 128 + 32 * h);
    o[0] = _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_slli_epi16(_mm256_and_si256(qh, three), 4));
    o[1] = _mm256_or_si256(_mm256_and_si256(ql1, low),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), three), 4));
    o[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), three), 4));
    o[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), three), 4));
}

static void unpack_q6_k_avx2(const uint8_t *w, int nb, grp_t *g) {
    (void)nb;
    scales_q6_k(w, g);
    const __m256i off = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; h++) {
        __m256i o[4];
        q6_half(w, h, o);
        for (int q = 0; q < 4; q++) st16(g->w + 128 * h + 32 * q, _mm256_sub_epi8(o[q], off));
    }
}
#endif

typedef void (*unpack_fn)(const uint8_t *w, int nb, grp_t *g); /* nb: blocks of 32 in the group */

typedef struct {
    int bk, bs;  /* values and bytes of a block */
    int split;   /* a scale per 16 values (Q6_K) */
    unpack_fn c, vec; /* vec NULL: no vector path compiled */
    int which;   /* the token path's index (rows_tok) */
    int lanes_min; /* tokens from which the vector path puts them in lanes: below it the token path,
                    * whose time grows with each token, is faster (a Zen 5 core, bin/bench cpu-kernel;
                    * types whose int16 unpacking costs more switch later) */
} qtype_t;
/* lanes_min where x is in bytes (levels 1), every type: where the token path of one byte and the
 * lanes of bytes broke even (BENCHMARKS.md, "Current"; bin/bench cpu-kernel --levels 1) */
#define LANES_MIN_BYTES 5

static const qtype_t *type_of(int qtype) {
#if defined(__AVX2__)
#define V(f) f
#else
#define V(f) NULL
#endif
    static const qtype_t q4_0 = {32, 18, 0, unpack_q4_0_c, V(unpack_q4_0_avx2), 0, 7};
    static const qtype_t q4_1 = {32, 20, 0, unpack_q4_1_c, V(unpack_q4_1_avx2), 1, 7};
    static const qtype_t q8_0 = {32, 34, 0, unpack_q8_0_c, V(unpack_q8_0_avx2), 2, 8};
    static const qtype_t q4_k = {256, 144, 0, unpack_q4_k_c, V(unpack_q4_k_avx2), 3, 7};
    static const qtype_t q5_k = {256, 176, 0, unpack_q5_k_c, V(unpack_q5_k_avx2), 4, 8};
    static const qtype_t q6_k = {256, 210, 1, unpack_q6_k_c, V(unpack_q6_k_avx2), 5, 5};
#undef V
    switch (qtype) {
    case T_Q4_0: return &q4_0;
    case T_Q4_1: return &q4_1;
    case T_Q8_0: return &q8_0;
    case T_Q4_K: return &q4_k;
    case T_Q5_K: return &q5_k;
    case T_Q6_K: return &q6_k;
    default: return NULL;
    }
}

/* ---------- the dots of a group with x (NOTE [ one rounding for every path ]) ---------- */

static inline float tree8(const float *t) { return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7])); }

/* plain C: one token's x at the group (token layout) */
static float group_c(const grp_t *g, const int8_t *xh, const int8_t *xl, const float *d, const float *ds, int split) {
    float t[8];
    for (int k = 0; k < 8; k++) {
        int32_t lo = 0, hi = 0;
        for (int l = 0; l < 16; l++) {
            int a = 32 * k + l, b = a + 16;
            lo += g->w[a] * (256 * xh[a] + xl[a]);
            hi += g->w[b] * (256 * xh[b] + xl[b]);
        }
        float sdx = g->s[k] * d[k];
        t[k] = split ? fmaf((float)hi, g->s2[k] * d[k], (float)lo * sdx) : fmaf((float)(lo + hi), sdx, g->mn[k] * ds[k]);
    }
    return tree8(t);
}

#if defined(__AVX2__)
/* acc + the sums of each 2 products of int16 a and b, in 8 int32 lanes */
static inline __m256i dot2(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

/* tree8 of the lanes */
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

static inline __m256 ldf(const float *p) { return _mm256_loadu_ps(p); }

/* acc + the sums of each 4 products of unsigned bytes a and signed bytes b, in 8 int32 lanes */
static inline __m256i dot4(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#define DOT4_WIDE 1 /* dot4 takes any unsigned byte (AVX2's pairs saturate at int16 above 127 * 128 each) */
#else
#define DOT4_WIDE 0
#endif

/* lo = the sum of each p[j]'s lanes 0-3 (its block's first 16 values), hi = lanes 4-7 */
static inline void reduce8_halves(const __m256i *p, __m256i *lo, __m256i *hi) {
    __m256i a01 = _mm256_hadd_epi32(p[0], p[1]), a23 = _mm256_hadd_epi32(p[2], p[3]);
    __m256i a45 = _mm256_hadd_epi32(p[4], p[5]), a67 = _mm256_hadd_epi32(p[6], p[7]);
    __m256i b03 = _mm256_hadd_epi32(a01, a23), b47 = _mm256_hadd_epi32(a45, a67);
    *lo = _mm256_permute2x128_si256(b03, b47, 0x20);
    *hi = _mm256_permute2x128_si256(b03, b47, 0x31);
}

/* A group for the token path: its 8 blocks as unsigned bytes wu (the values plus 1 << sh, sh 0
 * for none), the scales in g. Q8_0 where dot4 is not wide keeps its signed bytes (sh -1). */
typedef struct {
    __m256i wu[8];
    int sh;
} grpb_t;

static inline void bytes_b32(const uint8_t *w, int nb, int which, grpb_t *b, grp_t *g) {
    int bs = which == 0 ? 18 : which == 1 ? 20 : 34;
    scales_b32(w, nb, bs, which == 1, g);
    for (int k = 0; k < 8; k++) {
        if (k >= nb) b->wu[k] = _mm256_setzero_si256();
        else if (which == 2) b->wu[k] = DOT4_WIDE ? _mm256_xor_si256(ld(w + 34 * k + 2), _mm256_set1_epi8((char)0x80)) : ld(w + 34 * k + 2);
        else b->wu[k] = nibbles16(w + bs * k + (which ? 4 : 2));
    }
    b->sh = which == 0 ? 3 : which == 1 ? 0 : DOT4_WIDE ? 7 : -1;
}

static inline void bytes_k45(const uint8_t *w, int hb, grpb_t *b, grp_t *g) {
    scales_k45(w, g);
    for (int j = 0; j < 4; j++) k45_run(w, hb, j, &b->wu[2 * j], &b->wu[2 * j + 1]);
    b->sh = 0;
}

static inline void bytes_q6_k(const uint8_t *w, grpb_t *b, grp_t *g) {
    scales_q6_k(w, g);
    for (int h = 0; h < 2; h++) q6_half(w, h, b->wu + 4 * h);
    b->sh = 5;
}

/* group_c's value for one token (x at the group, token layout): each block's integer sum is
 * 256 * (wu . xh) + (wu . xl) less its offset times x's sum, exactly group_c's. one: x has at most
 * 127 steps (levels 1), so every xh is 0 and the sum is wu . xl alone (the same integer: the xh
 * dot, its load and its shift only added zeros). */
static inline __attribute__((always_inline)) float group_tok(const grpb_t *b, const grp_t *g, const int8_t *xh,
                                                             const int8_t *xl, const int32_t *sx, const int32_t *sx16,
                                                             const float *d, const float *ds, int split,
                                                             const int one) {
    const __m256i z = _mm256_setzero_si256();
    __m256i p[8];
    for (int k = 0; k < 8; k++) {
        if (one && b->sh >= 0) {
            p[k] = dot4(z, b->wu[k], ld(xl + 32 * k));
        } else if (one) { /* signed bytes, xl in -127..127 like xh: |w| by xl's signs (AVX2's pairs at most
                           * 2 * 128 * 127, short of int16's saturation) */
            p[k] = dot4(z, _mm256_sign_epi8(b->wu[k], b->wu[k]), _mm256_sign_epi8(ld(xl + 32 * k), b->wu[k]));
        } else if (b->sh >= 0) {
            p[k] = dot4(_mm256_slli_epi32(dot4(z, b->wu[k], ld(xh + 32 * k)), 8), b->wu[k], ld(xl + 32 * k));
        } else { /* signed bytes: |w| by x's signs for xh; xl (which may be -128) in int16 */
            __m256i a = _mm256_sign_epi8(b->wu[k], b->wu[k]), l = ld(xl + 32 * k);
            __m256i pl = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(b->wu[k])), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(l))),
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(b->wu[k], 1)),
                                  _mm256_cvtepi8_epi16(_mm256_extracti128_si256(l, 1))));
            p[k] = _mm256_add_epi32(_mm256_slli_epi32(dot4(z, a, _mm256_sign_epi8(ld(xh + 32 * k), b->wu[k])), 8), pl);
        }
    }
    __m256 sdx = _mm256_mul_ps(ldf(g->s), ldf(d)), t;
    __m128i sh = _mm_cvtsi32_si128(b->sh > 0 ? b->sh : 0);
    if (split) {
        __m256i lo, hi, s16 = ld(sx16);
        reduce8_halves(p, &lo, &hi);
        lo = _mm256_sub_epi32(lo, _mm256_sll_epi32(s16, sh));
        hi = _mm256_sub_epi32(hi, _mm256_sll_epi32(_mm256_sub_epi32(ld(sx), s16), sh));
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(ldf(g->s2), ldf(d)), _mm256_mul_ps(_mm256_cvtepi32_ps(lo), sdx));
    } else {
        __m256i isum = reduce8(p);
        if (b->sh > 0) isum = _mm256_sub_epi32(isum, _mm256_sll_epi32(ld(sx), sh));
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sdx, _mm256_mul_ps(ldf(g->mn), ldf(ds)));
    }
    return hsum8(t);
}

/* the token path of one type (which: 0..5 = Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) over rows
 * [r0, r1) and tokens [t0, t0 + tn) (tn <= 64); one: x in one byte (group_tok) */
static inline __attribute__((always_inline)) void rows_tok(const uint8_t *w, int64_t rb, int64_t gbytes, int64_t K,
                                                           int64_t Kp, const xq_t *x, int64_t t0, int64_t tn,
                                                           int64_t r0, int64_t r1, float *y, int64_t N, int which,
                                                           const int one) {
    float acc[64];
    grpb_t b;
    grp_t g;
    int64_t nb = K / 32, kb = Kp / 32;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < tn; t++) acc[t] = 0.f;
        for (int64_t gi = 0; gi < Kp / G; gi++) {
            const uint8_t *wg = w + r * rb + gi * gbytes;
            prefetch_ahead(wg, gbytes);
            int n = nb - gi * 8 < 8 ? (int)(nb - gi * 8) : 8;
            if (which < 3) bytes_b32(wg, n, which, &b, &g);
            else if (which < 5) bytes_k45(wg, which == 4, &b, &g);
            else bytes_q6_k(wg, &b, &g);
            for (int64_t t = 0; t < tn; t++) {
                int64_t u = t0 + t, o = u * kb + gi * 8;
                acc[t] += group_tok(&b, &g, x->xh + u * Kp + gi * G, x->xl + u * Kp + gi * G, x->sx + o, x->sx16 + o,
                                    x->d + o, x->ds + o, which == 5, one);
            }
        }
        for (int64_t t = 0; t < tn; t++) y[(t0 + t) * N + r] = acc[t];
    }
}

typedef void (*tok_fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const xq_t *, int64_t, int64_t, int64_t,
                       int64_t, float *, int64_t);
#define TOK(name, which, one)                                                                                         \
    static void tok_##name(const uint8_t *w, int64_t rb, int64_t gb, int64_t K, int64_t Kp, const xq_t *x, int64_t t0, \
                           int64_t tn, int64_t r0, int64_t r1, float *y, int64_t N) {                                 \
        rows_tok(w, rb, gb, K, Kp, x, t0, tn, r0, r1, y, N, which, one);                                              \
    }
TOK(q4_0, 0, 0) TOK(q4_1, 1, 0) TOK(q8_0, 2, 0) TOK(q4_k, 3, 0) TOK(q5_k, 4, 0) TOK(q6_k, 5, 0)
TOK(q4_0_1, 0, 1) TOK(q4_1_1, 1, 1) TOK(q8_0_1, 2, 1) TOK(q4_k_1, 3, 1) TOK(q5_k_1, 4, 1) TOK(q6_k_1, 5, 1)
/* [x in two bytes (levels 2), in one (at most 127 steps)][which] */
static const tok_fn tok_fns[2][6] = {{tok_q4_0, tok_q4_1, tok_q8_0, tok_q4_k, tok_q5_k, tok_q6_k},
                                     {tok_q4_0_1, tok_q4_1_1, tok_q8_0_1, tok_q4_k_1, tok_q5_k_1, tok_q6_k_1}};

typedef void (*lanes_fn)(const uint8_t *, int64_t, const qtype_t *, int64_t, int64_t, const int16_t *, const float *,
                         const float *, int64_t, float *, int64_t);
#define LANE_ROWS 4 /* weight rows a lanes tile (at most 2 x 4 accumulators: 16 of them for Q6_K) */

/* ---------- the lanes path with x in bytes (levels 1) ----------
 * Where every |X| <= 127, x in lanes takes a byte a value: each 4 of a row's unsigned bytes (the
 * token path's grpb_t) are broadcast and dotted (dot4) with 8 tokens' 4 bytes at once, half the
 * dots and broadcasts of the int16 lanes, and the offset comes off each block's sum once (sx, sx16
 * in lanes), as in group_tok. A block's integer sums, and so its float terms (group_c's, in
 * qdot_lanes.h's order), are the int16 lanes' exactly. Always 8 lanes: with AVX-512, 16 lanes of
 * int16 pairs dot as many values an instruction as 8 of byte quads. */
enum { LB_UNSIGNED, LB_SPLIT, LB_SIGNED }; /* the bytes' kind: unsigned, unsigned with a sum per 16 (Q6_K),
                                           * Q8_0's signed ones where dot4 is not wide */

/* R rows' groups (bytes bs, scales gs) against NV vectors of 8 tokens (x at the group: qb
 * [64][NV * 8][4], sx, sx16, d, ds [8][NV * 8]); acc[r * NV + v] += the group's value of each lane */
static inline __attribute__((always_inline)) void group_lanes_b(const grpb_t *bs, const grp_t *gs, const int R,
                                                                const int NV, const int8_t *qb, const int32_t *sx,
                                                                const int32_t *sx16, const float *d, const float *ds,
                                                                const int kind, __m256 *acc) {
    const int Tp = NV * 8;
    const int off = bs[0].sh > 0; /* (the bytes are the values plus 1 << sh) */
    const __m128i sh = _mm_cvtsi32_si128(off ? bs[0].sh : 0);
    __m256 t[8][8];
    for (int k = 0; k < 8; k++) {
        __m256i lo[8], hi[8];
        for (int j = 0; j < R * NV; j++) lo[j] = hi[j] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) { /* quad i of block k (Q6_K: its own sums for the last 4 quads) */
            for (int r = 0; r < R; r++) {
                int32_t pw;
                memcpy(&pw, (const uint8_t *)&bs[r].wu[k] + 4 * i, 4);
                __m256i wv = _mm256_set1_epi32(pw);
                /* (signed bytes: |w| by x's signs, as group_tok; AVX2's pairs at most 2 * 128 * 127) */
                __m256i wa = kind == LB_SIGNED ? _mm256_sign_epi8(wv, wv) : wv;
                for (int v = 0; v < NV; v++) {
                    __m256i xv = ld(qb + ((8 * k + i) * Tp + 8 * v) * 4);
                    int j = r * NV + v;
                    if (kind == LB_SIGNED) lo[j] = dot4(lo[j], wa, _mm256_sign_epi8(xv, wv));
                    else if (kind == LB_SPLIT && i >= 4) hi[j] = dot4(hi[j], wv, xv);
                    else lo[j] = dot4(lo[j], wv, xv);
                }
            }
        }
        for (int v = 0; v < NV; v++) {
            __m256 dx = ldf(d + k * Tp + 8 * v);
            __m256i s = ld(sx + k * Tp + 8 * v), s16 = ld(sx16 + k * Tp + 8 * v);
            for (int r = 0; r < R; r++) {
                int j = r * NV + v;
                __m256 sdx = _mm256_mul_ps(_mm256_set1_ps(gs[r].s[k]), dx);
                if (kind == LB_SPLIT) {
                    __m256i l = _mm256_sub_epi32(lo[j], _mm256_sll_epi32(s16, sh));
                    __m256i h = _mm256_sub_epi32(hi[j], _mm256_sll_epi32(_mm256_sub_epi32(s, s16), sh));
                    t[k][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(_mm256_set1_ps(gs[r].s2[k]), dx),
                                              _mm256_mul_ps(_mm256_cvtepi32_ps(l), sdx));
                } else {
                    __m256i l = kind == LB_SIGNED || !off ? lo[j] : _mm256_sub_epi32(lo[j], _mm256_sll_epi32(s, sh));
                    t[k][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(l), sdx,
                                              _mm256_mul_ps(_mm256_set1_ps(gs[r].mn[k]), ldf(ds + k * Tp + 8 * v)));
                }
            }
        }
    }
    for (int j = 0; j < R * NV; j++) {
        __m256 a = _mm256_add_ps(_mm256_add_ps(t[0][j], t[4][j]), _mm256_add_ps(t[2][j], t[6][j]));
        __m256 b = _mm256_add_ps(_mm256_add_ps(t[1][j], t[5][j]), _mm256_add_ps(t[3][j], t[7][j]));
        acc[j] = _mm256_add_ps(acc[j], _mm256_add_ps(a, b));
    }
}

/* rows [0, R) from w against one chunk of Tc tokens in lanes of bytes (NV vectors); y at the
 * chunk's first token and the first row */
static inline __attribute__((always_inline)) void rows_lanes_b(const uint8_t *w, int64_t rb, const qtype_t *ty,
                                                               int64_t K, int64_t Kp, const int R, const int NV,
                                                               const xq_t *x, int64_t c0, int64_t Tc, float *y,
                                                               int64_t N) {
    const int Tp = NV * 8, which = ty->which;
    const int kind = which == 5 ? LB_SPLIT : which == 2 && !DOT4_WIDE ? LB_SIGNED : LB_UNSIGNED;
    int64_t kb = Kp / 32, gbytes = G / ty->bk * ty->bs, nb = K / 32;
    const int8_t *qb = x->qb + c0 * Kp;
    const int32_t *sx = x->sx + c0 * kb, *sx16 = x->sx16 + c0 * kb;
    const float *d = x->d + c0 * kb, *ds = x->ds + c0 * kb;
    grpb_t bs[LANE_ROWS];
    grp_t gs[LANE_ROWS];
    __m256 acc[2 * LANE_ROWS];
    for (int j = 0; j < R * NV; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < Kp / G; gi++) {
        int n = nb - gi * 8 < 8 ? (int)(nb - gi * 8) : 8;
        for (int r = 0; r < R; r++) {
            const uint8_t *wg = w + r * rb + gi * gbytes;
            prefetch_ahead(wg, gbytes);
            if (which < 3) bytes_b32(wg, n, which, &bs[r], &gs[r]);
            else if (which < 5) bytes_k45(wg, which == 4, &bs[r], &gs[r]);
            else bytes_q6_k(wg, &bs[r], &gs[r]);
        }
        const int8_t *qg = qb + gi * G * Tp;
        int64_t o = gi * 8 * Tp;
        if (kind == LB_SPLIT) group_lanes_b(bs, gs, R, NV, qg, sx + o, sx16 + o, d + o, ds + o, LB_SPLIT, acc);
        else if (kind == LB_SIGNED) group_lanes_b(bs, gs, R, NV, qg, sx + o, sx16 + o, d + o, ds + o, LB_SIGNED, acc);
        else group_lanes_b(bs, gs, R, NV, qg, sx + o, sx16 + o, d + o, ds + o, LB_UNSIGNED, acc);
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            float o[8];
            _mm256_storeu_ps(o, acc[r * NV + v]);
            for (int l = 0; l < 8 && 8 * v + l < Tc; l++) y[(8 * v + l) * N + r] = o[l];
        }
}

typedef void (*lanes_b_fn)(const uint8_t *, int64_t, const qtype_t *, int64_t, int64_t, const xq_t *, int64_t, int64_t,
                           float *, int64_t);
#define LANES_B(R, NV)                                                                                              \
    static void lanes_b##R##NV(const uint8_t *w, int64_t rb, const qtype_t *ty, int64_t K, int64_t Kp, const xq_t *x, \
                               int64_t c0, int64_t Tc, float *y, int64_t N) {                                       \
        rows_lanes_b(w, rb, ty, K, Kp, R, NV, x, c0, Tc, y, N);                                                      \
    }
LANES_B(1, 1) LANES_B(1, 2) LANES_B(4, 1) LANES_B(4, 2)
#undef LANES_B
/* [one row, LANE_ROWS rows][one vector of tokens, two] */
static const lanes_b_fn lanes_b_fns[2][2] = {{lanes_b11, lanes_b12}, {lanes_b41, lanes_b42}};

#define LW 8
#define VI __m256i
#define VF __m256
#define VZEROI _mm256_setzero_si256
#define VZEROF _mm256_setzero_ps
#define VSET1I _mm256_set1_epi32
#define VSET1F _mm256_set1_ps
#define VLDI(p) _mm256_loadu_si256((const __m256i *)(p))
#define VLDF _mm256_loadu_ps
#define VSTF _mm256_storeu_ps
#define VDOT2 dot2
#define VCVT _mm256_cvtepi32_ps
#define VMUL _mm256_mul_ps
#define VADD _mm256_add_ps
#define VFMA _mm256_fmadd_ps
#include "qdot_lanes.h"
#undef LW
#undef VI
#undef VF
#undef VZEROI
#undef VZEROF
#undef VSET1I
#undef VSET1F
#undef VLDI
#undef VLDF
#undef VSTF
#undef VDOT2
#undef VCVT
#undef VMUL
#undef VADD
#undef VFMA

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define LANES16 1 /* 16 tokens a vector for more than 8 of them */
static inline __m512i dot2_16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
#define LW 16
#define VI __m512i
#define VF __m512
#define VZEROI _mm512_setzero_si512
#define VZEROF _mm512_setzero_ps
#define VSET1I _mm512_set1_epi32
#define VSET1F _mm512_set1_ps
#define VLDI(p) _mm512_loadu_si512((const void *)(p))
#define VLDF _mm512_loadu_ps
#define VSTF _mm512_storeu_ps
#define VDOT2 dot2_16
#define VCVT _mm512_cvtepi32_ps
#define VMUL _mm512_mul_ps
#define VADD _mm512_add_ps
#define VFMA _mm512_fmadd_ps
#include "qdot_lanes.h"
#endif
#endif

#ifndef LANES16
#define LANES16 0 /* (1 where qdot_lanes.h is included for 16 lanes) */
#endif

/* ---------- the pool ---------- */

typedef void (*task_fn)(void *arg, int i, int n);

/* NOTE [ pieces claimed, not handed out ]
 * A dispatch cuts its work into n pieces, and the caller and the pool's workers each claim the
 * next piece until none is left; the caller then waits only for the pieces claimed to finish. A
 * worker that is asleep, or descheduled by the other processes sharing the cores, claims nothing
 * and delays nothing: with the rows split evenly by thread and a wait for every worker, one
 * worker off its core held the whole call for a scheduler slice (milliseconds, against an
 * expert's tens of microseconds). A claim is a compare-and-swap of `ticket`, which holds the
 * dispatch's generation, its piece count and the next piece; a worker reads the call's function
 * and argument only after claiming a piece of that generation, and the caller does not return
 * (nor start another dispatch) before every piece is done, so a worker late for a dispatch finds
 * its generation gone and touches nothing of it. (A fetch-and-add would not retry under
 * contention, but a worker late for one dispatch could then take a piece of the next, of fewer
 * threads than its index.) The ticket, the done count, the claimers' count and the dispatch's
 * read-mostly fields each have two cache lines of their own (an Intel core's adjacent-line
 * prefetch moves lines in pairs): every piece's done count moved the line that the claimers and
 * the spinning workers read the ticket from. */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER; /* one call at a time */
static pthread_mutex_t wake_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cv = PTHREAD_COND_INITIALIZER;
static int n_workers;                   /* pool threads (the caller takes pieces too) */
static int ax_started;                  /* the leader thread exists (NOTE [ experts beside the device's work ]) */
static struct {                        /* a dispatch's shared state, each field on lines of its own (the NOTE above) */
    _Alignas(128) _Atomic uint64_t ticket; /* generation << 32 | pieces << 16 | next piece */
    _Alignas(128) atomic_int done;      /* pieces finished in this generation */
    _Alignas(128) atomic_int claimers;  /* workers that claimed a piece of the last dispatch (qdot_claimers) */
    _Alignas(128) atomic_int threads;   /* the dispatch's threads, the caller's included: workers 0.. below it claim */
    task_fn fn;
    void *arg;
} pool;

#define MAX_PIECES 65535
#define SPIN_NS 30000 /* a worker spins 30 us after a dispatch (back-to-back calls find it awake), then sleeps */
/* how long a worker spins after a dispatch (qdot_spin): SPIN_NS, or longer while calls come once
 * a layer (the CPU's experts: NOTE [ a layer's experts in one call ]), since where cores are few
 * waking the sleeping workers cost a lone expert's call more than its dots */
static _Atomic int64_t spin_ns = SPIN_NS;

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

static inline uint32_t gen_of(uint64_t t) { return (uint32_t)(t >> 32); }

/* NOTE [ spinning that gives way ]
 * The pool's workers, the leader and the caller spin between and inside calls (a layer's call
 * finds them awake), but a spinning thread holds its core as long as the scheduler lets it: where
 * the threads that spin outnumber the CPUs the process may use (every worker, the leader and the
 * caller: a host of few cores), the threads with work, the caller's Python before a started call
 * and a worker holding a claimed piece, waited for scheduler slices (on a host of two vCPUs, a call
 * through the leader took several times its own time). So there, every 64 spins, as it reads the
 * clock, a spinning thread also yields its core. Not where the CPUs are enough: on a host of many
 * cores, a thread a core yielding ran no faster, and at times slower (BENCHMARKS.md). */
static int n_cpus;            /* the CPUs this process may run on (counted at the first dispatch) */
static atomic_int crowded;    /* whether the spinning threads outnumber them (set as threads start) */

static void count_cpus(void) {
    if (n_cpus) return;
#ifdef __linux__
    cpu_set_t s;
    if (sched_getaffinity(0, sizeof s, &s) == 0) n_cpus = CPU_COUNT(&s);
#endif
    if (n_cpus < 1) n_cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n_cpus < 1) n_cpus = 1;
}

/* every 64 spins, where crowded: the core given up */
static inline void give_way(int spins) {
    if (!(spins & 63) && atomic_load_explicit(&crowded, memory_order_relaxed)) sched_yield();
}

/* a spin with a deadline: 1 once `until` has passed (the clock read every 64 spins), else give_way's */
static inline int spun(int spins, int64_t until) {
    if (spins & 63) return 0;
    if (now_ns() > until) return 1;
    give_way(spins);
    return 0;
}

/* claim and run pieces of generation `gen` until none is left; a worker (not the caller) counts
 * itself in `claimers` before its first piece is done, so the caller sees the count once all are */
static void take_pieces(uint32_t gen, int worker) {
    uint64_t t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    for (;;) {
        int n = (int)((t >> 16) & 0xffff), i = (int)(t & 0xffff);
        if (gen_of(t) != gen || i >= n) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire))
            continue; /* (t reloaded) */
        if (worker) {
            atomic_fetch_add_explicit(&pool.claimers, 1, memory_order_relaxed);
            worker = 0;
        }
        pool.fn(pool.arg, i, n);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        t = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    }
}

struct worker_start {
    uint32_t seen; /* the generation at its creation: a dispatch after it is its first */
    int index;     /* 0..n_workers-1: a dispatch of `threads` threads is claimed by workers below threads - 1 */
};

static void *worker_main(void *p) {
    struct worker_start ws = *(struct worker_start *)p;
    uint32_t seen = ws.seen;
    free(p);
    for (;;) {
        uint32_t g;
        int spins = 0;
        int64_t until = now_ns() + atomic_load_explicit(&spin_ns, memory_order_relaxed);
        while ((g = gen_of(atomic_load_explicit(&pool.ticket, memory_order_acquire))) == seen) {
            cpu_relax();
            if (spun(++spins, until)) break;
        }
        if (g == seen) {
            pthread_mutex_lock(&wake_mu);
            while ((g = gen_of(atomic_load(&pool.ticket))) == seen) pthread_cond_wait(&wake_cv, &wake_mu);
            pthread_mutex_unlock(&wake_mu);
        }
        seen = g;
        if (ws.index < atomic_load_explicit(&pool.threads, memory_order_relaxed) - 1) take_pieces(g, 1);
    }
    return NULL;
}

static void ax_after_fork(void);
static void pool_after_fork(void);
static void fork_handler_once(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* a forked child has none of the parent's threads: it starts its own pool and leader */
static void pool_after_fork(void) {
    n_workers = 0;
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&wake_mu, NULL);
    pthread_cond_init(&wake_cv, NULL);
    ax_after_fork();
}

/* A thread of the library's own, started with every signal blocked: the process's signals are its
 * callers' to take (a Ctrl-C handed to a worker left a chat's prompt deaf to it, and a main thread
 * interrupted where it had blocked SIGINT itself: NOTE [ SIGINT and threads ] in coordinator/sigmask.py). */
static int start_thread(void *(*fn)(void *), void *arg) {
    pthread_t t;
    pthread_attr_t a;
    sigset_t all, old;
    sigfillset(&all);
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&t, &a, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&a);
    return rc;
}

/* registers pool_after_fork once, before the first thread of either kind starts */
static void register_fork(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, fork_handler_once);
}

/* run fn(arg, i, n) for every piece i in 0..n-1 on up to `threads` threads, the caller's included
 * (NOTE [ pieces claimed, not handed out ]) */
static void dispatch(task_fn fn, void *arg, int n, int threads) {
    register_fork();
    if (n > MAX_PIECES) n = MAX_PIECES;
    if (threads > n) threads = n;
    while (n_workers < threads - 1 && n_workers < MAX_THREADS - 1) {
        struct worker_start *ws = malloc(sizeof *ws);
        if (!ws) break;
        ws->seen = gen_of(atomic_load(&pool.ticket));
        ws->index = n_workers;
        int rc = start_thread(worker_main, ws);
        if (rc) {
            free(ws);
            break;
        }
        n_workers++;
    }
    count_cpus();
    atomic_store_explicit(&crowded, n_workers + ax_started + 1 > n_cpus, memory_order_relaxed);
    atomic_store_explicit(&pool.claimers, 0, memory_order_relaxed); /* (published by the ticket's release) */
    if (threads <= 1 || !n_workers) {
        for (int i = 0; i < n; i++) fn(arg, i, n);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    atomic_store_explicit(&pool.threads, threads, memory_order_relaxed); /* (published by the ticket's release) */
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    uint32_t gen = gen_of(atomic_load(&pool.ticket)) + 1;
    pthread_mutex_lock(&wake_mu);
    atomic_store_explicit(&pool.ticket, (uint64_t)gen << 32 | (uint64_t)n << 16, memory_order_release);
    pthread_cond_broadcast(&wake_cv);
    pthread_mutex_unlock(&wake_mu);
    take_pieces(gen, 0);
    for (int spins = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < n; spins++) {
        cpu_relax();
        give_way(spins); /* (a piece claimed by a thread off its core: NOTE [ spinning that gives way ]) */
    }
}

/* ---------- a call ---------- */

/* a call's thread count within 1..MAX_THREADS */
static inline int threads_in_range(int threads) {
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

typedef struct {
    const qdot_job *jobs;
    int n_jobs;
    xq_t *xq;           /* per job (jobs of one x share their first's) */
    int64_t *row_start; /* [n_jobs + 1] prefix of rows */
    const qtype_t **ty;
    int plain;          /* the C path only */
    int steps;          /* x's integers per block: -steps..steps */
} call_t;

static inline int64_t kpad(int64_t K) { return (K + G - 1) / G * G; }
static inline int64_t tpad(int64_t T, int lanes) { return lanes ? (T + lanes - 1) / lanes * lanes : T; }

/* whether job j reads the x of job j - 1 (then it shares its quantization) */
static inline int same_x(const qdot_job *jobs, int j) {
    return j && jobs[j].x == jobs[j - 1].x && jobs[j].K == jobs[j - 1].K && jobs[j].T == jobs[j - 1].T &&
           jobs[j].x_bf16 == jobs[j - 1].x_bf16;
}

static void quantize_task(void *p, int i, int n) {
    call_t *c = (call_t *)p;
    /* (job, token) pairs split across threads, a lanes layout's padding tokens included */
    int64_t total = 0;
    for (int j = 0; j < c->n_jobs; j++) total += same_x(c->jobs, j) ? 0 : tpad(c->jobs[j].T, c->xq[j].lanes);
    int64_t lo = total * i / n, hi = total * (i + 1) / n, k = 0;
    for (int j = 0; j < c->n_jobs; j++) {
        const qdot_job *jb = &c->jobs[j];
        const xq_t *x = &c->xq[j];
        if (same_x(c->jobs, j)) continue;
        int64_t Kp = kpad(jb->K), Tq = tpad(jb->T, x->lanes);
        for (int64_t t = 0; t < Tq; t++, k++) {
            if (k < lo || k >= hi) continue;
            const void *src = t < jb->T ? jb->x : NULL;
            int64_t kb = Kp / 32;
            if (x->lanes && x->bytes) {
                int64_t ch = 2 * x->lanes, c0 = t / ch * ch, Tp = Tq - c0 < ch ? Tq - c0 : ch, o = c0 * kb + (t - c0);
                quantize_lanes_bytes_row(src, jb->x_bf16, t * jb->K, jb->K, Kp, c->steps,
                                         x->qb + c0 * Kp + (t - c0) * 4, x->sx + o, x->sx16 + o, x->d + o, x->ds + o, Tp);
            } else if (x->lanes) {
                int64_t ch = 2 * x->lanes, c0 = t / ch * ch, Tp = Tq - c0 < ch ? Tq - c0 : ch;
                quantize_lanes_row(src, jb->x_bf16, t * jb->K, jb->K, Kp, c->steps, x->q + c0 * Kp + (t - c0) * 2,
                                   x->d + c0 * kb + (t - c0), x->ds + c0 * kb + (t - c0), Tp);
            } else {
                quantize_tokens_row(src, jb->x_bf16, t * jb->K, jb->K, Kp, c->steps, x->xh + t * Kp, x->xl + t * Kp,
                                    x->sx + t * kb, x->sx16 + t * kb, x->d + t * kb, x->ds + t * kb);
            }
        }
    }
}

/* rows [r0, r1) of job j */
static void job_rows(const call_t *c, int j, int64_t r0, int64_t r1) {
    const qdot_job *jb = &c->jobs[j];
    const xq_t *x = &c->xq[j];
    const qtype_t *ty = c->ty[j];
    int64_t K = jb->K, Kp = kpad(K), T = jb->T, N = jb->N, rb = K / ty->bk * ty->bs, nb = K / 32;
    int64_t gbytes = G / ty->bk * ty->bs;
#if defined(__AVX2__)
    if (x->lanes && x->bytes) { /* (lanes of 8, in chunks of two vectors) */
        for (int64_t c0 = 0; c0 < T; c0 += 16) {
            int64_t Tc = T - c0 < 16 ? T - c0 : 16;
            int NV = (int)((Tc + 7) / 8);
            for (int64_t r = r0; r < r1;) {
                int R = r + LANE_ROWS <= r1 ? LANE_ROWS : 1;
                lanes_b_fns[R > 1][NV - 1](jb->w + r * rb, rb, ty, K, Kp, x, c0, Tc, jb->y + c0 * N + r, N);
                r += R;
            }
        }
        return;
    }
    if (x->lanes) {
        const lanes_fn(*fns)[2] = lanes_fns8;
#if LANES16
        if (x->lanes == 16) fns = lanes_fns16;
#endif
        for (int64_t c0 = 0; c0 < T; c0 += 2 * x->lanes) {
            int64_t Tc = T - c0 < 2 * x->lanes ? T - c0 : 2 * x->lanes;
            int NV = (int)((Tc + x->lanes - 1) / x->lanes);
            const int16_t *q = x->q + c0 * Kp;
            const float *d = x->d + c0 * (Kp / 32), *ds = x->ds + c0 * (Kp / 32);
            for (int64_t r = r0; r < r1;) {
                int R = r + LANE_ROWS <= r1 ? LANE_ROWS : 1;
                fns[R > 1][NV - 1](jb->w + r * rb, rb, ty, K, Kp, q, d, ds, Tc, jb->y + c0 * N + r, N);
                r += R;
            }
        }
        return;
    }
#endif
    for (int64_t t0 = 0; t0 < T; t0 += 64) {
        int64_t tn = T - t0 < 64 ? T - t0 : 64;
#if defined(__AVX2__)
        if (ty->vec && !c->plain) {
            tok_fns[c->steps <= 127][ty->which](jb->w, rb, gbytes, K, Kp, x, t0, tn, r0, r1, jb->y, N);
            continue;
        }
#endif
        grp_t g;
        float acc[64];
        for (int64_t r = r0; r < r1; r++) {
            for (int64_t t = 0; t < tn; t++) acc[t] = 0.f;
            for (int64_t gi = 0; gi < Kp / G; gi++) {
                ty->c(jb->w + r * rb + gi * gbytes, nb - gi * 8 < 8 ? (int)(nb - gi * 8) : 8, &g);
                for (int64_t t = 0; t < tn; t++) {
                    int64_t u = t0 + t;
                    acc[t] += group_c(&g, x->xh + u * Kp + gi * G, x->xl + u * Kp + gi * G, x->d + u * (Kp / 32) + gi * 8,
                                      x->ds + u * (Kp / 32) + gi * 8, ty->split);
                }
            }
            for (int64_t t = 0; t < tn; t++) jb->y[(t0 + t) * N + r] = acc[t];
        }
    }
}

#define PIECE_ROWS 16
#define PIECE_ALIGN 4 /* (LANE_ROWS) */
#define PIECES_A_THREAD 4 /* (a thread late to a call leaves its share to the others in pieces this small) */

static void rows_task(void *p, int i, int n) {
    call_t *c = (call_t *)p;
    int64_t total = c->row_start[c->n_jobs];
    /* (piece edges at multiples of PIECE_ALIGN: a lanes tile's rows stay in one piece) */
    int64_t lo = total * i / n / PIECE_ALIGN * PIECE_ALIGN;
    int64_t hi = i == n - 1 ? total : total * (i + 1) / n / PIECE_ALIGN * PIECE_ALIGN;
    for (int j = 0; j < c->n_jobs && lo < hi; j++) {
        int64_t a = c->row_start[j], b = c->row_start[j + 1];
        if (hi <= a || lo >= b) continue;
        job_rows(c, j, (lo > a ? lo : a) - a, (hi < b ? hi : b) - a);
    }
}

static __thread int64_t run_quantized_ns; /* when this thread's last qdot_run had x quantized (qdot_experts_phases) */
static __thread void *scratch;
static __thread size_t scratch_size;

/* Runs n_jobs matmuls on `threads` threads (the caller's included). plain: the C path only (tests;
 * the same bits as the vector paths); levels: 1, x in 127 steps a block (a relative error of about
 * 0.5% a dot product; a byte a value: the token path's dots of xl alone, then lanes of bytes), or
 * 2, in 256 times finer ones (about 2**-15 of it, twice the dots).
 * Returns 0, or -1 for a type it has no kernel for, -2 for a K that is not a whole number of blocks,
 * -3 when out of memory. */
int qdot_run(const qdot_job *jobs, int n_jobs, int threads, int plain, int levels) {
    if (n_jobs <= 0) return 0;
    size_t need = 0;
    int64_t row_start[n_jobs + 1];
    const qtype_t *ty[n_jobs];
    xq_t xq[n_jobs];
    row_start[0] = 0;
    for (int j = 0; j < n_jobs; j++) {
        ty[j] = type_of(jobs[j].qtype);
        if (!ty[j]) return -1;
        if (jobs[j].K <= 0 || jobs[j].K % ty[j]->bk) return -2;
        row_start[j + 1] = row_start[j] + jobs[j].N;
        /* (levels 1: x in bytes, in lanes of 8 from LANES_MIN_BYTES tokens) */
        int bytes = levels != 2;
        int lanes = !plain && ty[j]->vec && jobs[j].T >= (bytes ? LANES_MIN_BYTES : ty[j]->lanes_min);
        xq[j].bytes = bytes && lanes;
        xq[j].lanes = !lanes ? 0 : bytes || !LANES16 || jobs[j].T <= 8 ? 8 : 16;
        if (!same_x(jobs, j)) {
            size_t TK = (size_t)(tpad(jobs[j].T, xq[j].lanes) * kpad(jobs[j].K));
            need += TK * 2 + TK / 32 * 16 + 64;
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
        int64_t TK = tpad(jobs[j].T, xq[j].lanes) * kpad(jobs[j].K);
        xq[j].d = (float *)s; s += TK / 32 * 4;
        xq[j].ds = (float *)s; s += TK / 32 * 4;
        xq[j].sx = (int32_t *)s; s += TK / 32 * 4;
        xq[j].sx16 = (int32_t *)s; s += TK / 32 * 4;
        xq[j].q = (int16_t *)s; /* (lanes: int16 pairs, or bytes; tokens: xh, then xl) */
        xq[j].qb = (int8_t *)s;
        xq[j].xh = (int8_t *)s;
        xq[j].xl = (int8_t *)s + TK;
        s += TK * 2;
        s = (char *)(((uintptr_t)s + 63) & ~(uintptr_t)63);
    }
    call_t c = {jobs, n_jobs, xq, row_start, ty, plain, levels == 2 ? 127 * 256 : 127};
    threads = threads_in_range(threads);
    pthread_mutex_lock(&pool_mu);
    int64_t toks = 0;
    for (int j = 0; j < n_jobs; j++) toks += jobs[j].T;
    dispatch(quantize_task, &c, toks * jobs[0].K >= 32768 ? threads : 1, threads);
    run_quantized_ns = now_ns();
    int64_t rows = row_start[n_jobs];
    /* pieces of at least PIECE_ROWS rows, about PIECES_A_THREAD a thread (NOTE [ pieces claimed, not handed out ]) */
    int64_t pieces = threads > 1 ? rows / PIECE_ROWS : 1;
    if (pieces > (int64_t)threads * PIECES_A_THREAD) pieces = (int64_t)threads * PIECES_A_THREAD;
    dispatch(rows_task, &c, pieces > 1 ? (int)pieces : 1, threads);
    pthread_mutex_unlock(&pool_mu);
    return 0;
}

/* Workers spin `ns` nanoseconds after each dispatch before they sleep (SPIN_NS where ns <= 0). */
void qdot_spin(int64_t ns) { atomic_store(&spin_ns, ns > 0 ? ns : SPIN_NS); }

/* The vector path compiled in: 0 plain C, 1 AVX2, 2 AVX2 with VNNI. */
/* workers that claimed a piece of the last dispatch: at most its threads - 1 (for the tests) */
int qdot_claimers(void) { return atomic_load(&pool.claimers); }

int qdot_isa(void) {
#if defined(__AVX2__) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* ---------- a layer's experts in one call ---------- */

/* NOTE [ a layer's experts in one call ]
 * The CPU's share of a decode step's experts (cpu/experts.py) is a few experts of a few tokens
 * each: a few hundred microseconds of dots, on the layer's critical path. Driven from Python as
 * two matmul calls (every gate and up, then every down) with the activation, the tokens' gather
 * and the weighted sum between them, the host's own Python was a large part of a call. So one call
 * does all of it: each expert's tokens gathered, every gate and up in one dispatch (at one token,
 * every expert's x is the same row and is quantized once), SiLU(gate) * up, every down in a
 * second dispatch, and out[t] = the sum over the experts of weight * y, in the experts' order.
 * The matmuls are qdot_run's, so their bits are the two calls' own. */
typedef struct {
    const uint8_t *w[3]; /* gate, up and down: the expert's rows of blocks */
    int64_t n_tok;       /* its tokens in this call */
    const int64_t *tok;  /* their rows of x and out */
    const float *wt;     /* their weights */
} qdot_expert;

static __thread float *ex_buf;
static __thread size_t ex_buf_size;

/* SiLU(gate) * up, and the weighted sum of the experts' outputs, on the pool's threads as the dots
 * are: on the calling thread alone, with the workers spinning beside it, they took as long as the
 * downs' dots at batch 8 (bin/bench cpu-kernel --experts --phases). Each element's arithmetic and,
 * in the sum, each output's order over the pairs are those of the one thread: the same bits. */
typedef struct {
    const qdot_expert *ex;
    int n;
    int64_t n_embd, len; /* len: SiLU's elements, or the sum's columns */
    float *h, *out;
    const float *g, *u, *y;
} epi_t;

static void silu_task(void *p, int i, int n) {
    const epi_t *s = (const epi_t *)p;
    int64_t lo = s->len * i / n, hi = s->len * (i + 1) / n;
    for (int64_t k = lo; k < hi; k++) s->h[k] = s->g[k] / (1.f + expf(-s->g[k])) * s->u[k];
}

static void sum_task(void *p, int i, int n) {
    const epi_t *s = (const epi_t *)p;
    int64_t c0 = s->len * i / n, c1 = s->len * (i + 1) / n, off = 0;
    for (int e = 0; e < s->n; e++)
        for (int64_t q = 0; q < s->ex[e].n_tok; q++, off++) {
            float wt = s->ex[e].wt[q], *o = s->out + s->ex[e].tok[q] * s->n_embd;
            const float *yy = s->y + off * s->n_embd;
            for (int64_t c = c0; c < c1; c++) o[c] += wt * yy[c];
        }
}

#define EPI_PIECE 1024 /* SiLU's elements a piece at least (the sum's products: 8 times as many, each far cheaper) */

/* fn over `len` in pieces of `work` / EPI_PIECE on up to `threads` threads (one call at a time, as qdot_run's) */
static void epilogue(task_fn fn, epi_t *s, int64_t work, int threads) {
    threads = threads_in_range(threads);
    int64_t pieces = work / EPI_PIECE;
    if (pieces > 2 * (int64_t)threads) pieces = 2 * (int64_t)threads;
    if (pieces > s->len) pieces = s->len;
    if (pieces < 1) pieces = 1;
    pthread_mutex_lock(&pool_mu);
    dispatch(fn, s, (int)pieces, threads);
    pthread_mutex_unlock(&pool_mu);
}

/* NOTE [ an experts call's phases ]
 * Where a layer's experts call's time goes (bin/bench cpu-kernel --experts --phases): the last
 * call's monotonic nanoseconds at its start, its tokens gathered, gate's and up's x quantized,
 * their rows done, SiLU, down's x quantized, its rows done, and the weighted sum done; and the
 * workers that claimed a piece of each rows dispatch. Eight clock reads a call, written by
 * whichever thread ran it (the leader, for a started call) and read once it is waited for. */
#define EX_PHASES 8
static int64_t ex_phase[EX_PHASES];
static int ex_claimers[2];

/* out[T, n_embd] (float32, overwritten) = sum over the n experts ex and their tokens of weight *
 * down(SiLU(gate(x[tok])) * up(x[tok])); qtypes: gate's, up's and down's block types; gate and
 * up are n_ff x n_embd, down n_embd x n_ff. Returns qdot_run's codes, or -4 for a token outside
 * 0..T-1. */
int qdot_experts(const qdot_expert *ex, int n, const int *qtypes, int64_t n_ff, int64_t n_embd, const float *x,
                 int64_t T, float *out, int threads, int levels) {
    int64_t P = 0, t_start = now_ns();
    for (int e = 0; e < n; e++) {
        for (int64_t p = 0; p < ex[e].n_tok; p++)
            if (ex[e].tok[p] < 0 || ex[e].tok[p] >= T) return -4;
        P += ex[e].n_tok;
    }
    memset(out, 0, (size_t)T * n_embd * sizeof(float));
    if (!P) return 0;
    size_t need = (size_t)P * (size_t)(2 * n_embd + 3 * n_ff);
    if (need > ex_buf_size) {
        free(ex_buf);
        ex_buf = malloc(need * sizeof(float));
        ex_buf_size = ex_buf ? need : 0;
        if (!ex_buf) return -3;
    }
    float *xg = ex_buf, *g = xg + P * n_embd, *u = g + P * n_ff, *h = u + P * n_ff, *y = h + P * n_ff;
    qdot_job jobs[2 * n]; /* (a layer's experts: a few kilobytes at most, as qdot_run's own arrays) */
    int64_t off = 0;
    for (int e = 0; e < n; e++) {
        int64_t m = ex[e].n_tok;
        /* one token named once by each expert: every expert reads x's row, quantized once (qdot_run's
         * same_x); an expert that names a row twice, or of more than one, reads its rows gathered */
        const float *xe = x;
        if (T > 1 || m > 1) {
            for (int64_t p = 0; p < m; p++)
                memcpy(xg + (off + p) * n_embd, x + ex[e].tok[p] * n_embd, n_embd * sizeof(float));
            xe = xg + off * n_embd;
        }
        jobs[2 * e] = (qdot_job){qtypes[0], ex[e].w[0], n_ff, n_embd, xe, 0, m, g + off * n_ff};
        jobs[2 * e + 1] = (qdot_job){qtypes[1], ex[e].w[1], n_ff, n_embd, xe, 0, m, u + off * n_ff};
        off += m;
    }
    int64_t t[EX_PHASES] = {t_start, now_ns()};
    int rc = qdot_run(jobs, 2 * n, threads, 0, levels);
    t[2] = run_quantized_ns;
    t[3] = now_ns();
    ex_claimers[0] = qdot_claimers();
    epi_t epi = {ex, n, n_embd, P * n_ff, h, out, g, u, y};
    if (!rc) {
        epilogue(silu_task, &epi, P * n_ff, threads);
        t[4] = now_ns();
        off = 0;
        for (int e = 0; e < n; e++) {
            jobs[e] = (qdot_job){qtypes[2], ex[e].w[2], n_embd, n_ff, h + off * n_ff, 0, ex[e].n_tok, y + off * n_embd};
            off += ex[e].n_tok;
        }
        rc = qdot_run(jobs, n, threads, 0, levels);
        t[5] = run_quantized_ns;
        t[6] = now_ns();
        ex_claimers[1] = qdot_claimers();
    }
    if (rc) return rc;
    epi.len = n_embd;
    epilogue(sum_task, &epi, P * n_embd / 8, threads);
    t[7] = now_ns();
    memcpy(ex_phase, t, sizeof t);
    return 0;
}

/* The last qdot_experts call's phases into t[8] and its two rows dispatches' claimers into c[2]
 * (NOTE [ an experts call's phases ]). */
void qdot_experts_phases(int64_t *t, int *c) {
    memcpy(t, ex_phase, sizeof ex_phase);
    c[0] = ex_claimers[0];
    c[1] = ex_claimers[1];
}

/* ---------- a layer's experts, started now and waited for later ---------- */

/* NOTE [ experts beside the device's work ]
 * A layer's CPU experts run while the device computes its own and the copy engine moves the rest
 * (cpu/experts.py, NOTE [ CPU experts ]), but called from the compute process's thread they held
 * that thread: the launches after them (the device's experts, the next layer's copies ahead) waited
 * for the CPU, and a launch that waited for the device (the traces of batch 8) held the CPU's start
 * back in turn. So qdot_experts_start hands the call to a thread of its own and returns at once; the
 * caller launches the device's work, then qdot_experts_wait returns the call's code and its start
 * and end times. One call at a time: a start before the last one's wait is refused (-5). The
 * caller keeps the call's arrays alive until its wait. */
static pthread_mutex_t ax_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ax_cv = PTHREAD_COND_INITIALIZER;
static atomic_int ax_state;            /* 0 idle, 1 queued, 2 running, 3 done (not yet waited for) */
static int ax_rc;
static int64_t ax_t0, ax_t1;
static struct {
    const qdot_expert *ex;
    int n;
    int qtypes[3];
    int64_t n_ff, n_embd, T;
    const float *x;
    float *out;
    int threads, levels;
    /* a routed call's (qdot_experts_routed_start): the experts' table is the leader's to make */
    int routed;
    const uint8_t *base;
    int64_t off[3], per[3];
    const int64_t *experts, *ids;
    const float *wts;
    int64_t k;
    _Atomic int32_t *flag; /* where the call's end is posted, or NULL (qdot_experts_post) */
} ax_job;

/* NOTE [ the CPU's sum posted to the device ]
 * A layer's CPU experts end its chain: the device adds their sum before the next layer's attention.
 * Waited for by the caller's thread, the sum then crossed back in a copy and the next launches went
 * out only after it (the host's wake-up, a copy, the launches: on the chain, the device idle). So a
 * call may post its end to a flag in pinned host memory, which a kernel on the device polls
 * (host_wait.py): the leader stores 1 there once `out` holds the sum (3 where the call failed, so the
 * device never waits for ever), with release order, after the workers' stores to `out`. The caller
 * has launched the device's work, the poll and the next layer's meanwhile. */
static _Atomic int32_t *ax_post; /* the next started call's flag, set by qdot_experts_post */

/* The next call started posts its end to `flag` (NOTE [ the CPU's sum posted to the device ]). */
void qdot_experts_post(int32_t *flag) { ax_post = (_Atomic int32_t *)flag; }

/* NOTE [ the router's pairs grouped by the kernel ]
 * A routed call names its experts, the layer's staging bytes (an expert's gate, up and down at
 * base + off[m] + expert * per[m]) and the step's router output as it is (each token's k chosen
 * experts and their weights), and the leader makes the experts' table (each one's addresses, tokens
 * and weights, qdot_experts' qdot_expert) before the dots: done by numpy in the caller (cpu/experts.py),
 * that table was most of the Python a call cost before the kernel could start (bin/bench cpu-kernel
 * --experts --phases, 'before'), on the layer's chain, and the leader's part is a few microseconds
 * of C beside it. A pair names an expert of the call or another (the device's, or a cached one). */
static qdot_expert *rt_ex;
static int64_t *rt_tok;
static float *rt_wt;
static int64_t rt_n, rt_p; /* what rt_ex and rt_tok / rt_wt hold room for (the leader's alone) */

/* the routed job's table into rt_ex (its experts in the call's order, each one's pairs in the
 * router's order); -3 where memory fails */
static int routed_table(void) {
    int n = ax_job.n;
    int64_t P = ax_job.T * ax_job.k;
    if (n > rt_n) {
        free(rt_ex);
        rt_ex = malloc((size_t)n * sizeof *rt_ex);
        rt_n = rt_ex ? n : 0;
        if (!rt_ex) return -3;
    }
    if (P > rt_p) {
        free(rt_tok);
        free(rt_wt);
        rt_tok = malloc((size_t)P * sizeof *rt_tok);
        rt_wt = malloc((size_t)P * sizeof *rt_wt);
        rt_p = rt_tok && rt_wt ? P : 0;
        if (!rt_p) return -3;
    }
    int64_t used = 0;
    for (int j = 0; j < n; j++) {
        int64_t e = ax_job.experts[j], first = used;
        for (int m = 0; m < 3; m++) rt_ex[j].w[m] = ax_job.base + ax_job.off[m] + e * ax_job.per[m];
        for (int64_t p = 0; p < P; p++)
            if (ax_job.ids[p] == e) {
                rt_tok[used] = p / ax_job.k;
                rt_wt[used++] = ax_job.wts[p];
            }
        rt_ex[j].n_tok = used - first;
        rt_ex[j].tok = rt_tok + first;
        rt_ex[j].wt = rt_wt + first;
    }
    return 0;
}

/* spin (without the lock) until ax_state is `want` or `ns` have passed; the caller then takes the
 * lock and waits on the condition for what is left */
static void ax_spin_for(int want, int64_t ns) {
    int64_t until = now_ns() + ns;
    for (int spins = 1; atomic_load(&ax_state) != want; spins++) {
        cpu_relax();
        if (spun(spins, until)) return;
    }
}

static void *ax_leader(void *p) {
    (void)p;
    pthread_mutex_lock(&ax_mu);
    for (;;) {
        if (ax_state != 1) { /* (awake as the pool's workers are: qdot_spin) */
            pthread_mutex_unlock(&ax_mu);
            ax_spin_for(1, atomic_load_explicit(&spin_ns, memory_order_relaxed));
            pthread_mutex_lock(&ax_mu);
        }
        while (ax_state != 1) pthread_cond_wait(&ax_cv, &ax_mu);
        ax_state = 2;
        pthread_mutex_unlock(&ax_mu);
        int64_t t0 = now_ns();
        int rc = ax_job.routed ? routed_table() : 0;
        if (!rc)
            rc = qdot_experts(ax_job.routed ? rt_ex : ax_job.ex, ax_job.n, ax_job.qtypes, ax_job.n_ff, ax_job.n_embd,
                              ax_job.x, ax_job.T, ax_job.out, ax_job.threads, ax_job.levels);
        int64_t t1 = now_ns();
        if (ax_job.flag) atomic_store_explicit(ax_job.flag, rc ? 3 : 1, memory_order_release);
        pthread_mutex_lock(&ax_mu);
        ax_rc = rc;
        ax_t0 = t0;
        ax_t1 = t1;
        ax_state = 3;
        pthread_cond_broadcast(&ax_cv);
    }
    return NULL;
}

/* (pool_after_fork's part: a forked child has no leader thread) */
static void ax_after_fork(void) {
    ax_started = 0;
    ax_state = 0;
    ax_post = NULL;
    pthread_mutex_init(&ax_mu, NULL);
    pthread_cond_init(&ax_cv, NULL);
}

/* qdot_experts_start's and qdot_experts_routed_start's first part: with ax_mu held on a 0 return,
 * the leader started and no call pending; -5 when a call is started and not yet waited for, -6
 * when the thread cannot start (the lock released) */
static int ax_claim(void) {
    pthread_mutex_lock(&ax_mu);
    if (ax_state != 0) {
        ax_post = NULL; /* (a refused call posts nothing, and leaves no flag to the next) */
        pthread_mutex_unlock(&ax_mu);
        return -5;
    }
    if (!ax_started) {
        register_fork();
        int rc = start_thread(ax_leader, NULL);
        if (rc) {
            ax_post = NULL;
            pthread_mutex_unlock(&ax_mu);
            return -6;
        }
        ax_started = 1;
    }
    return 0;
}

/* their last part: the job's common fields, queued for the leader (ax_mu held, then released) */
static int ax_queue(int n, const int *qtypes, int64_t n_ff, int64_t n_embd, const float *x, int64_t T, float *out,
                    int threads, int levels) {
    ax_job.n = n;
    for (int k = 0; k < 3; k++) ax_job.qtypes[k] = qtypes[k];
    ax_job.n_ff = n_ff;
    ax_job.n_embd = n_embd;
    ax_job.x = x;
    ax_job.T = T;
    ax_job.out = out;
    ax_job.threads = threads;
    ax_job.levels = levels;
    ax_job.flag = ax_post;
    ax_post = NULL;
    ax_state = 1;
    pthread_cond_broadcast(&ax_cv);
    pthread_mutex_unlock(&ax_mu);
    return 0;
}

/* Start qdot_experts(ex, n, qtypes, n_ff, n_embd, x, T, out, threads, levels) on the leader thread;
 * 0, or -5 when a call is started and not yet waited for, -6 when the thread cannot start. */
int qdot_experts_start(const qdot_expert *ex, int n, const int *qtypes, int64_t n_ff, int64_t n_embd, const float *x,
                       int64_t T, float *out, int threads, int levels) {
    int rc = ax_claim();
    if (rc) return rc;
    ax_job.routed = 0;
    ax_job.ex = ex;
    return ax_queue(n, qtypes, n_ff, n_embd, x, T, out, threads, levels);
}

/* Start a routed call (NOTE [ the router's pairs grouped by the kernel ]) on the leader thread: the
 * n experts `experts` of a layer whose staging bytes start at `base` (expert e's gate, up and down
 * at base + off[m] + e * per[m]), the tokens' pairs as the router gave them (ids and wts [T, k],
 * row-major), x [T, n_embd]; as qdot_experts_start otherwise. */
int qdot_experts_routed_start(const uint8_t *base, const int64_t *off, const int64_t *per, const int64_t *experts,
                              int n, const int64_t *ids, const float *wts, int64_t k, const int *qtypes, int64_t n_ff,
                              int64_t n_embd, const float *x, int64_t T, float *out, int threads, int levels) {
    int rc = ax_claim();
    if (rc) return rc;
    ax_job.routed = 1;
    ax_job.base = base;
    for (int m = 0; m < 3; m++) {
        ax_job.off[m] = off[m];
        ax_job.per[m] = per[m];
    }
    ax_job.experts = experts;
    ax_job.ids = ids;
    ax_job.wts = wts;
    ax_job.k = k;
    return ax_queue(n, qtypes, n_ff, n_embd, x, T, out, threads, levels);
}

/* Wait for the started call: its code (qdot_experts'), and its start and end (CLOCK_MONOTONIC
 * nanoseconds) in t[0], t[1]; -7 when no call was started. */
int qdot_experts_wait(int64_t *t) {
    pthread_mutex_lock(&ax_mu);
    if (ax_state == 0) {
        pthread_mutex_unlock(&ax_mu);
        return -7;
    }
    if (ax_state != 3) {
        /* a spin first, as long as the pool's workers spin between calls (qdot_spin): a step with a
         * CPU share keeps them awake (milliseconds), and its caller, which waits here once a layer,
         * then wakes at the call's end rather than when the scheduler finds it a core among them;
         * otherwise a short one, for a call about to end */
        int64_t ns = atomic_load_explicit(&spin_ns, memory_order_relaxed);
        pthread_mutex_unlock(&ax_mu);
        ax_spin_for(3, ns > 50000 ? ns : 50000);
        pthread_mutex_lock(&ax_mu);
    }
    while (ax_state != 3) pthread_cond_wait(&ax_cv, &ax_mu);
    int rc = ax_rc;
    t[0] = ax_t0;
    t[1] = ax_t1;
    ax_state = 0;
    pthread_mutex_unlock(&ax_mu);
    return rc;
}
