// Products of k-quant weights (Q4_K, Q6_K) with a batch of Q8_K activations on the integer tensor
// cores (mma.sync s8, sm_80+), for the batch sizes between the one-warp-per-row kernels (mmv, up to 8
// tokens) and dequantize + cuBLAS (prefill chunks). Exact like the CPU's dots (src/backend/cpu/kernels.rs):
// an mma sums 32 (Q4_K) or 16 (Q6_K) int8 products of one sub-block exactly in int32, the sub-block
// scales are applied in int32 (isum, and msum for Q4_K's mins), and the float steps per 256-weight
// super-block are the CPU's, in super-block order:
//     sumf += (d_w * d_a) * isum [- (dmin_w * d_a) * msum]
// so every output equals the CPU backend's (and mmv's) bit for bit.
//
// CTA: 8 warps = RG row groups (of 16 weight rows) x KW = 8 / RG k-phases, 8 NT tokens (blockIdx.y: the
// token tile; NT = 2, 4 or 8, one kernel each, for RG = 2 and the narrow RG = 1). K is split across the
// CTA's warps by super-block: in round r, warp (rg, kw) computes the term of super-block r KW + kw for its
// 16 rows and all the tile's tokens (lane g = lane / 4, t = lane % 4 holds rows rg 16 + g and + 8, tokens
// 2t and 2t + 1 of each mma n-tile); the terms go to shared memory, and each thread adds the round's terms
// of its outputs in super-block order. So every output is the CPU's sum, term by term in order, while a
// 4096-row product has 1024-2048 warps at work (one warp per 16 rows through all of K had 256, and was
// latency-bound: 0.75 ms for a 4096 x 14336 Q6_K product at 16 tokens in call 56).
//
// Inside a Q4_K sub-block the mma's k index is permuted (the dot does not depend on the order of its
// terms, as long as weights and activations agree): lane t's k = 4t..4t+3 take weights 8t..8t+3 and
// k = 16+4t..16+4t+3 weights 8t+4..8t+7, so weights and activations are each one 8-byte load.

#define MMQ_THREADS 256
// The CTA's shape for RG row groups (1 or 2): KW k-phases, ROWS weight rows, PS the row stride of the
// terms in shared memory (conflict-free stores and loads). RG 1 ("narrow", kernels ..._n) gives products
// of few rows twice the CTAs and twice the warps on each row's K.
template <int RG>
struct MmqShape {
    static constexpr int KW = 8 / RG, ROWS = 16 * RG, PS = ROWS + 4;
};

__device__ __forceinline__ void mma_s8_k32(int c[4], const int a[4], int b0, int b1) {
#if __CUDA_ARCH__ >= 800
    asm(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0), "r"(0), "r"(0), "r"(0));
#else
    c[0] = c[1] = c[2] = c[3] = 0;  // the host never launches these below sm_80
#endif
}

__device__ __forceinline__ void mma_s8_k16(int c[4], int a0, int a1, int b0) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%8,%9,%10};"
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0), "r"(0), "r"(0), "r"(0), "r"(0));
#else
    c[0] = c[1] = c[2] = c[3] = 0;
#endif
}

// The frame of a lane: its warp's row group and k-phase, its rows (rA = r0 + g, rB = rA + 8; a row past
// the matrix reads row 0, whose results are not stored), the tile's first token, and the two weight rows
// of `rb` bytes it reads.
struct MmqTile {
    int g, t, kw, rA, rB, t0;
    const u8* wA;
    const u8* wB;
};

template <int NT, int RG>
__device__ __forceinline__ MmqTile mmq_tile(const u8* __restrict__ w, int n_rows, long long rb) {
    MmqTile m;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    m.g = lane >> 2;
    m.t = lane & 3;
    m.kw = warp / RG;
    m.rA = blockIdx.x * MmqShape<RG>::ROWS + (warp % RG) * 16 + m.g;
    m.rB = m.rA + 8;
    m.t0 = blockIdx.y * 8 * NT;
    m.wA = w + (long long)(m.rA < n_rows ? m.rA : 0) * rb;
    m.wB = w + (long long)(m.rB < n_rows ? m.rB : 0) * rb;
    return m;
}

// mmq's activation layout (mmq_pack): token groups of 8; for each 32-byte block b of K, a group's 8
// rows side by side, so the 8 tokens x 32 bytes an mma n-tile reads are 256 contiguous bytes (2 cache
// lines; in the Q8_K rows, 8: call 59's mmq was bound by these L1 wavefronts). Then, after the n_pad x K
// bytes, the Q8_K scales and block sums the same way: for token group tg and super-block sb, the group's
// 8 scales (float, at dap) and its 8 x 8 block sums (int, at sap = dap + n_pad nsb), so the float steps
// of an n-tile read 32 + 256 contiguous bytes instead of 8 tokens' scattered rows (mmq_scales). Tokens
// past the batch are zero, up to a whole tile.
extern "C" __global__ void mmq_pack(const i8* __restrict__ qa, const float* __restrict__ da, const int* __restrict__ sa,
                                    int K, int n_tok, int n_pad, i8* __restrict__ out) {
    pdl_enter();
    const long long u = blockIdx.x * (long long)blockDim.x + threadIdx.x;  // 16-byte piece of out
    if (u >= (long long)n_pad * K / 16) return;
    const int nb = K / 32, nsb = K / 256;
    const long long ob = 16 * u, gb = ob / 256;  // gb = group * nb + block
    const int r = (int)(ob % 256), tok = 8 * (int)(gb / nb) + r / 32, b = (int)(gb % nb);
    uint4 v;
    v.x = v.y = v.z = v.w = 0u;
    if (tok < n_tok) v = *(const uint4*)(qa + (long long)tok * K + 32 * b + r % 32);
    *(uint4*)(out + ob) = v;
    if (u < (long long)n_pad * nsb) {  // u = (tg nsb + sb) 8 + g: token 8 tg + g's scale and sums of sb
        const int g = (int)(u % 8), sb = (int)(u / 8 % nsb), t = 8 * (int)(u / 8 / nsb) + g;
        float* dap = (float*)(out + (long long)n_pad * K);
        int* sap = (int*)(dap + (long long)n_pad * nsb);
        const long long base = (long long)t * nb + sb * 8;
#pragma unroll
        for (int j = 0; j < 8; j++) sap[8 * u + j] = t < n_tok ? sa[base + j] : 0;
        dap[u] = t < n_tok ? da[base] : 0.0f;
    }
}

// The index of token 8 tg + g's Q8_K scale of super-block sb in mmq_pack's layout (its block sums at 8x it).
__device__ __forceinline__ long long mmq_scales(int tg, int nsb, int sb, int g) { return ((long long)tg * nsb + sb) * 8 + g; }

// 8 (4) activation bytes at byte `off` of 32-byte block b for token 8 tg + g, from mmq_pack's layout.
__device__ __forceinline__ unsigned long long act8(const i8* __restrict__ qp, int nb, int tg, int b, int g, int off) {
    return *(const unsigned long long*)(qp + ((long long)(tg * nb + b) * 8 + g) * 32 + off);
}
__device__ __forceinline__ int act4(const i8* __restrict__ qp, int nb, int tg, int b, int g, int off) {
    return *(const int*)(qp + ((long long)(tg * nb + b) * 8 + g) * 32 + off);
}

// An mma's sums of one sub-block (rows rA, rA, rB, rB) times the rows' sub-block scales, into isum.
__device__ __forceinline__ void mmq_scaled_add(int isum[4], const int c[4], int scA, int scB) {
    isum[0] += scA * c[0];
    isum[1] += scA * c[1];
    isum[2] += scB * c[2];
    isum[3] += scB * c[3];
}

// A lane's term of super-block sb for row (e < 2 ? rA : rB) and token t0 + 8 nt + 2t + (e & 1), into its
// k-phase's terms pk [token in the tile][row in the CTA].
template <int RG>
__device__ __forceinline__ void mmq_put(float (*pk)[MmqShape<RG>::PS], const MmqTile& m, int nt, int e, float v) {
    pk[8 * nt + 2 * m.t + (e & 1)][m.rA - blockIdx.x * MmqShape<RG>::ROWS + (e < 2 ? 0 : 8)] = v;
}

// The (token in the tile, row in the CTA) of a thread's output idx (= threadIdx.x + MMQ_THREADS o), so
// that a warp's 32 loads of one k-phase's terms fall in 32 banks: ROWS 32 (PS 36): one token's rows;
// ROWS 16 (PS 20): rows 0-15 of tokens t and t + 4, 80 floats (16 banks) apart (tokens t and t + 1 shared
// 4 banks, and every such load took two wavefronts: ncu, bench/GPU_NOTES.md call 76).
template <int ROWS>
__device__ __forceinline__ void mmq_out(int idx, int& tok, int& row) {
    if constexpr (ROWS == 16) {
        const int j = idx >> 5;
        tok = (j & 3) | ((j >> 2) << 3) | (((idx >> 4) & 1) << 2);
        row = idx & 15;
    } else {
        tok = idx / ROWS;
        row = idx % ROWS;
    }
}

// The rounds of a CTA (header): `terms(sb, pk)` stores this lane's terms of super-block sb (mmq_put); each
// thread then owns outputs idx = threadIdx.x + MMQ_THREADS o (token and row by mmq_out) and adds their
// terms in super-block order.
template <int NT, int RG, class Terms>
__device__ __forceinline__ void mmq_rounds(const MmqTile& m, int nsb, int n_tok, int n_rows, float* __restrict__ out,
                                           Terms terms) {
    constexpr int KW = MmqShape<RG>::KW, ROWS = MmqShape<RG>::ROWS;
    constexpr int T = 8 * NT, OUTS = T * ROWS / MMQ_THREADS;
    __shared__ float part[KW][T][MmqShape<RG>::PS];
    float acc[OUTS];
#pragma unroll
    for (int o = 0; o < OUTS; o++) acc[o] = 0.0f;
    for (int sb0 = 0; sb0 < nsb; sb0 += KW) {
        const int sb = sb0 + m.kw;
        if (sb < nsb)
            terms(sb, part[m.kw]);
        __syncthreads();
        const int nk = min(KW, nsb - sb0);
#pragma unroll
        for (int o = 0; o < OUTS; o++) {
            int tok, row;
            mmq_out<ROWS>(threadIdx.x + MMQ_THREADS * o, tok, row);
            for (int k = 0; k < nk; k++) acc[o] = acc[o] + part[k][tok][row];
        }
        __syncthreads();
    }
#pragma unroll
    for (int o = 0; o < OUTS; o++) {
        int tok, row;
        mmq_out<ROWS>(threadIdx.x + MMQ_THREADS * o, tok, row);
        row += blockIdx.x * ROWS;
        tok += m.t0;
        if (row < n_rows && tok < n_tok) out[(long long)tok * n_rows + row] = acc[o];
    }
}

// Scale and min of Q4_K sub-block j (quant.cu's kscales) from a super-block's first 16 bytes h (d and
// dmin, then the 12 packed scale bytes): register operations only, where kscales' byte loads from
// global memory took most of the L1 wavefronts (ncu, call 58).
__device__ __forceinline__ void q4k_scale(const uint4& h, int j, int& sc, int& mn) {
    if (j < 4) {
        sc = (h.y >> (8 * j)) & 63;
        mn = (h.z >> (8 * j)) & 63;
    } else {
        const int q = 8 * (j - 4);
        sc = ((h.w >> q) & 0xF) | (((h.y >> q) >> 6 & 3) << 4);
        mn = ((h.w >> q) >> 4 & 0xF) | (((h.z >> q) >> 6 & 3) << 4);
    }
}

template <int NT, int RG>
__device__ __forceinline__ void mmq_q4_k_body(const i8* __restrict__ qp, const float* __restrict__ da,
                                              const int* __restrict__ sa, int K, int n_tok, const u8* __restrict__ w,
                                              int n_rows, float* __restrict__ out) {
    const int nb = K / 32, nsb = K / 256;
    const MmqTile m = mmq_tile<NT, RG>(w, n_rows, (long long)nsb * 144);
    const u8 *wA = m.wA, *wB = m.wB;
    // the super-block's header (d, dmin, scales) and the quant bytes this lane multiplies (8 of each
    // 32-byte group), both rows, loaded one round ahead so the next loads are in flight while this one
    // is multiplied
    unsigned long long nA[4], nB[4];
    uint4 nhA, nhB;
    auto load = [&](int sb) {
        nhA = *(const uint4*)(wA + sb * 144);
        nhB = *(const uint4*)(wB + sb * 144);
#pragma unroll
        for (int jp = 0; jp < 4; jp++) {
            nA[jp] = *(const unsigned long long*)(wA + sb * 144 + 16 + 32 * jp + 8 * m.t);
            nB[jp] = *(const unsigned long long*)(wB + sb * 144 + 16 + 32 * jp + 8 * m.t);
        }
    };
    if (m.kw < nsb) load(m.kw);
    pdl_enter();
    mmq_rounds<NT, RG>(m, nsb, n_tok, n_rows, out, [&](int sb, float (*pk)[MmqShape<RG>::PS]) {
        const u8* xA = wA + sb * 144;
        const u8* xB = wB + sb * 144;
        const uint4 hA = nhA, hB = nhB;
        const float dA = h2f((u16)(hA.x & 0xffff)), dminA = h2f((u16)(hA.x >> 16));
        const float dB = h2f((u16)(hB.x & 0xffff)), dminB = h2f((u16)(hB.x >> 16));
        // the tile's n-tiles in parts of at most 4 (the integer sums of 4 n-tiles and their float steps'
        // loads fit in registers; 8 spilled): the first part takes the prefetched quant bytes, a later
        // one loads them again (from L1)
        constexpr int NP = NT < 4 ? NT : 4;
#pragma unroll 1
        for (int p0 = 0; p0 < NT; p0 += NP) {
            unsigned long long qA[4], qB[4];
#pragma unroll
            for (int jp = 0; jp < 4; jp++) {
                qA[jp] = p0 == 0 ? nA[jp] : *(const unsigned long long*)(xA + 16 + 32 * jp + 8 * m.t);
                qB[jp] = p0 == 0 ? nB[jp] : *(const unsigned long long*)(xB + 16 + 32 * jp + 8 * m.t);
            }
            if (p0 == 0 && sb + MmqShape<RG>::KW < nsb) load(sb + MmqShape<RG>::KW);
            int isum[NP][4] = {};
            // sub-blocks in pairs (one 8-byte group of each row's quant bytes), the pair loop not unrolled
            // so that the activation loads of one pair at a time are held in registers; the groups rotate
            // into qA[0] / qB[0]
#pragma unroll 1
            for (int jp = 0; jp < 4; jp++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int j = 2 * jp + h;
                    const unsigned long long lo = 0x0F0F0F0F0F0F0F0Full;
                    const unsigned long long vA = (qA[0] >> (4 * h)) & lo, vB = (qB[0] >> (4 * h)) & lo;
                    const int a[4] = {(int)(u32)vA, (int)(u32)vB, (int)(u32)(vA >> 32), (int)(u32)(vB >> 32)};
                    int scA, mnA, scB, mnB;
                    q4k_scale(hA, j, scA, mnA);
                    q4k_scale(hB, j, scB, mnB);
#pragma unroll
                    for (int nt = 0; nt < NP; nt++) {
                        const unsigned long long b = act8(qp, nb, m.t0 / 8 + p0 + nt, sb * 8 + j, m.g, 8 * m.t);
                        int c[4];
                        mma_s8_k32(c, a, (int)(u32)b, (int)(u32)(b >> 32));
                        mmq_scaled_add(isum[nt], c, scA, scB);
                    }
                }
#pragma unroll
                for (int i = 0; i < 3; i++) {
                    qA[i] = qA[i + 1];
                    qB[i] = qB[i + 1];
                }
            }
            // the CPU's float steps for this super-block, per output
            int mnsA[8], mnsB[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int sc;
                q4k_scale(hA, j, sc, mnsA[j]);
                q4k_scale(hB, j, sc, mnsB[j]);
            }
#pragma unroll
            for (int nt = 0; nt < NP; nt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    // (a token past the batch has zero scales and sums; its output is not stored)
                    const long long u = mmq_scales(m.t0 / 8 + p0 + nt, nsb, sb, 2 * m.t + h);
                    const float dab = da[u];
                    const int4 s0 = *(const int4*)(sa + 8 * u), s1 = *(const int4*)(sa + 8 * u + 4);
                    const int s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
                    int msA = 0, msB = 0;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        msA += mnsA[j] * s[j];
                        msB += mnsB[j] * s[j];
                    }
                    mmq_put<RG>(pk, m, p0 + nt, h, (dA * dab) * (float)isum[nt][h] - (dminA * dab) * (float)msA);
                    mmq_put<RG>(pk, m, p0 + nt, 2 + h, (dB * dab) * (float)isum[nt][2 + h] - (dminB * dab) * (float)msB);
                }
        }
    });
}

// Q6_K: each 32-weight sub-block is two 16-weight halves with their own int8 scales (two k16 mmas).
// Weight i of a super-block: n = i / 128, k = (i % 128) / 32, l = i % 32; low 4 bits from
// ql[64 n + 32 (k % 2) + l] (low nibble for k < 2), high 2 bits from qh[32 n + l] >> 2k; minus 32.
template <int NT, int RG>
__device__ __forceinline__ void mmq_q6_k_body(const i8* __restrict__ qp, const float* __restrict__ da,
                                              const int* __restrict__ sa, int K, int n_tok, const u8* __restrict__ w,
                                              int n_rows, float* __restrict__ out) {
    const int nb = K / 32, nsb = K / 256;
    const MmqTile m = mmq_tile<NT, RG>(w, n_rows, (long long)nsb * 210);
    const u8 *wA = m.wA, *wB = m.wB;
    pdl_enter();
    mmq_rounds<NT, RG>(m, nsb, n_tok, n_rows, out, [&](int sb, float (*pk)[MmqShape<RG>::PS]) {
        const u8* xs[2] = {wA + sb * 210, wB + sb * 210};
        // the 16 int8 scales of each row (2-byte aligned: 8 u16 loads), scale 2j + h in byte 2j + h
        u32 sw[2][4];
#pragma unroll
        for (int r = 0; r < 2; r++)
#pragma unroll
            for (int i = 0; i < 4; i++) sw[r][i] = (u32)ld_i32_b2(xs[r] + 192 + 4 * i);
        constexpr int NP = NT < 4 ? NT : 4;  // n-tiles per part (as in mmq_q4_k_body)
#pragma unroll 1
        for (int p0 = 0; p0 < NT; p0 += NP) {
            int isum[NP][4] = {};
            // the sub-blocks j = 4n + k of half n: for each h, lane t's words of ql (k = 0, 2 low and high
            // nibbles of one, k = 1, 3 of the other) and qh are loaded once; the n loop is not unrolled
            // (the activation loads of one half at a time in registers)
#pragma unroll 1
            for (int n = 0; n < 2; n++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int l = 16 * h + 4 * m.t;
                    int ql[2][2], qh[2];
#pragma unroll
                    for (int r = 0; r < 2; r++) {
                        ql[r][0] = ld_i32_b2(xs[r] + 64 * n + l);
                        ql[r][1] = ld_i32_b2(xs[r] + 64 * n + 32 + l);
                        qh[r] = ld_i32_b2(xs[r] + 128 + 32 * n + l);
                    }
#pragma unroll
                    for (int k = 0; k < 4; k++) {
                        const int j = 4 * n + k;
                        int a[2];
#pragma unroll
                        for (int r = 0; r < 2; r++) {
                            const int lo = (k < 2 ? ql[r][k & 1] : (ql[r][k & 1] >> 4)) & 0x0F0F0F0F;
                            const int hi = ((qh[r] >> (2 * k)) & 0x03030303) << 4;
                            a[r] = __vsub4(lo | hi, 0x20202020);
                        }
                        // byte 2j + h = 8n + 2k + h: word 2n + k / 2 (n: the runtime half), byte 2 (k % 2) + h
                        const int sh = 8 * (2 * (k & 1) + h);
                        const u32 wA_ = n == 0 ? sw[0][k >> 1] : sw[0][2 + (k >> 1)];
                        const u32 wB_ = n == 0 ? sw[1][k >> 1] : sw[1][2 + (k >> 1)];
                        const int scA = (int)(signed char)(wA_ >> sh), scB = (int)(signed char)(wB_ >> sh);
#pragma unroll
                        for (int nt = 0; nt < NP; nt++) {
                            const int b = act4(qp, nb, m.t0 / 8 + p0 + nt, sb * 8 + j, m.g, l);
                            int c[4];
                            mma_s8_k16(c, a[0], a[1], b);
                            mmq_scaled_add(isum[nt], c, scA, scB);
                        }
                    }
                }
            }
            const float dA = h2f(ld_u16(xs[0] + 208)), dB = h2f(ld_u16(xs[1] + 208));
#pragma unroll
            for (int nt = 0; nt < NP; nt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const float dab = da[mmq_scales(m.t0 / 8 + p0 + nt, nsb, sb, 2 * m.t + h)];
                    mmq_put<RG>(pk, m, p0 + nt, h, (dA * dab) * (float)isum[nt][h]);
                    mmq_put<RG>(pk, m, p0 + nt, 2 + h, (dB * dab) * (float)isum[nt][2 + h]);
                }
        }
    });
}

// One kernel per type and token tile (8 NT tokens): mmq_q4_k_16, _32, _64 and mmq_q6_k_16, _32, _64;
// qp: the activations in mmq_pack's layout (padded to whole tiles), da / sa: their Q8_K scales and block
// sums, also in mmq_pack's layout (mmq_scales).
#define MMQ_KERNEL(TY, NT, RG, SUFFIX)                                                                              \
    extern "C" __global__ void __launch_bounds__(MMQ_THREADS, 2) mmq_##TY##_##NT##SUFFIX(                           \
        const i8* __restrict__ qp, const float* __restrict__ da, const int* __restrict__ sa, int K, int n_tok,      \
        const u8* __restrict__ w, int n_rows, float* __restrict__ out) {                                            \
        mmq_##TY##_body<NT / 8, RG>(qp, da, sa, K, n_tok, w, n_rows, out);                                          \
    }
MMQ_KERNEL(q4_k, 16, 2, )
MMQ_KERNEL(q4_k, 32, 2, )
MMQ_KERNEL(q4_k, 64, 2, )
MMQ_KERNEL(q6_k, 16, 2, )
MMQ_KERNEL(q6_k, 32, 2, )
MMQ_KERNEL(q6_k, 64, 2, )
MMQ_KERNEL(q4_k, 16, 1, _n)
MMQ_KERNEL(q4_k, 32, 1, _n)
MMQ_KERNEL(q4_k, 64, 1, _n)
MMQ_KERNEL(q6_k, 16, 1, _n)
MMQ_KERNEL(q6_k, 32, 1, _n)
MMQ_KERNEL(q6_k, 64, 1, _n)
