/* The lanes path of qdot.c, written once for vectors of LW int32 lanes (qdot.c includes it for 8
 * and, where AVX-512 is compiled in, 16): LW tokens in the lanes of a vector, R weight rows at a
 * time. Each pair of a row's int16 values is broadcast and dotted with LW tokens' pairs, so a
 * block's integer sums need no reduction across lanes, and one load of x serves R rows. The
 * float terms and their order are group_c's (NOTE [ one rounding for every path ] in qdot.c).
 * Expects LW, VI, VF and the V* operations defined; defines lanes_fns##LW. */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define L(name) CAT(name, LW)

/* R rows' groups against NV vectors of LW tokens (x at the group: q [128][NV * LW] int16 pairs,
 * d and ds [8][NV * LW]); acc[r * NV + v] += the group's value of each lane */
static inline __attribute__((always_inline)) void L(group_lanes)(const grp_t *gs, const int R, const int NV,
                                                                 const int16_t *q, const float *d, const float *ds,
                                                                 const int split, VF *acc) {
    const int Tp = NV * LW;
    VF t[8][16];
    for (int k = 0; k < 8; k++) {
        VI lo[16], hi[16];
        for (int j = 0; j < R * NV; j++) lo[j] = hi[j] = VZEROI();
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) { /* pair i of block k (Q6_K: its own sums for the last 8 pairs) */
            for (int r = 0; r < R; r++) {
                int32_t pw;
                memcpy(&pw, gs[r].w + 32 * k + 2 * i, 4);
                VI wv = VSET1I(pw);
                for (int v = 0; v < NV; v++) {
                    VI xv = VLDI(q + ((16 * k + i) * Tp + LW * v) * 2);
                    if (split && i >= 8) hi[r * NV + v] = VDOT2(hi[r * NV + v], xv, wv);
                    else lo[r * NV + v] = VDOT2(lo[r * NV + v], xv, wv);
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int v = 0; v < NV; v++) {
                VF dx = VLDF(d + k * Tp + LW * v), sdx = VMUL(VSET1F(gs[r].s[k]), dx);
                int j = r * NV + v;
                t[k][j] = split ? VFMA(VCVT(hi[j]), VMUL(VSET1F(gs[r].s2[k]), dx), VMUL(VCVT(lo[j]), sdx))
                                : VFMA(VCVT(lo[j]), sdx, VMUL(VSET1F(gs[r].mn[k]), VLDF(ds + k * Tp + LW * v)));
            }
    }
    for (int j = 0; j < R * NV; j++)
        acc[j] = VADD(acc[j], VADD(VADD(VADD(t[0][j], t[4][j]), VADD(t[2][j], t[6][j])),
                                   VADD(VADD(t[1][j], t[5][j]), VADD(t[3][j], t[7][j]))));
}

/* rows [0, R) from w against one chunk of Tc tokens in lanes (NV vectors); y at the chunk's first
 * token and the first row */
static inline __attribute__((always_inline)) void L(rows_lanes)(const uint8_t *w, int64_t rb, const qtype_t *ty,
                                                                int64_t K, int64_t Kp, const int R, const int NV,
                                                                const int16_t *q, const float *d, const float *ds,
                                                                int64_t Tc, float *y, int64_t N) {
    const int Tp = NV * LW;
    grp_t gs[4];
    VF acc[8];
    for (int j = 0; j < R * NV; j++) acc[j] = VZEROF();
    int64_t gbytes = G / ty->bk * ty->bs, nb = K / 32;
    for (int64_t gi = 0; gi < Kp / G; gi++) {
        int n = nb - gi * 8 < 8 ? (int)(nb - gi * 8) : 8;
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + r * rb + gi * gbytes, gbytes); /* (NOTE [ a row read ahead ]) */
            ty->vec(w + r * rb + gi * gbytes, n, &gs[r]);
        }
        if (ty->split) L(group_lanes)(gs, R, NV, q + gi * G * Tp, d + gi * 8 * Tp, ds + gi * 8 * Tp, 1, acc);
        else L(group_lanes)(gs, R, NV, q + gi * G * Tp, d + gi * 8 * Tp, ds + gi * 8 * Tp, 0, acc);
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++) {
            float o[LW];
            VSTF(o, acc[r * NV + v]);
            for (int l = 0; l < LW && LW * v + l < Tc; l++) y[(LW * v + l) * N + r] = o[l];
        }
}

#define LANES_FN(R, NV)                                                                                         \
    static void CAT(L(lanes_), CAT(R, NV))(const uint8_t *w, int64_t rb, const qtype_t *ty, int64_t K, int64_t Kp, \
                                           const int16_t *q, const float *d, const float *ds, int64_t Tc, float *y, \
                                           int64_t N) {                                                         \
        L(rows_lanes)(w, rb, ty, K, Kp, R, NV, q, d, ds, Tc, y, N);                                              \
    }
LANES_FN(1, 1) LANES_FN(1, 2) LANES_FN(4, 1) LANES_FN(4, 2)
/* [one row, LANE_ROWS rows][one vector of tokens, two] */
static const lanes_fn L(lanes_fns)[2][2] = {{CAT(L(lanes_), 11), CAT(L(lanes_), 12)}, {CAT(L(lanes_), 41), CAT(L(lanes_), 42)}};
#undef LANES_FN
#undef L
