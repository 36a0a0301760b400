// Products of k-quant weights (Q4_K, Q6_K) with a batch of Q8_K activations on the integer tensor
// cores (mma.sync s8, sm_80+), for the batch sizes between the one-warp-per-row kernels (mmv, up to 8
// tokens) and dequantize + cuBLAS (prefill chunks). Exact like the CPU's dots (src/backend/cpu/kernels.rs):
// an mma sums 32 (Q4_K) or 16 (Q6_K) int8 products of one sub-block exactly in int32, the sub-block
// scales are applied in int32 (isum, and msum for Q4_K's mins), and the float steps per 256-weight
// super-block are the CPU's, in super-block order:
//     sumf += (d_w * d_a) * isum [- (dmin_w * d_a) * msum]
// so every output equals the CPU backend's (and mmv's) bit for bit.
//
// CTA: MMQ_WARPS warps x 16 weight rows, MMQ_TOK tokens (blockIdx.y: the token tile). Warp w takes rows
// r0 .. r0 + 16 against all the CTA's tokens as MMQ_TOK / 8 mma n-tiles; lane (g = lane / 4, t = lane % 4)
// holds outputs (row r0 + g, tokens 2t, 2t + 1 of each n-tile) and (row r0 + g + 8, same tokens).
//
// Inside a Q4_K sub-block the mma's k index is permuted (the dot does not depend on the order of its
// terms, as long as weights and activations agree): lane t's k = 4t..4t+3 take weights 8t..8t+3 and
// k = 16+4t..16+4t+3 weights 8t+4..8t+7, so weights and activations are each one 8-byte load.

#define MMQ_WARPS 4
#define MMQ_ROWS (16 * MMQ_WARPS)
#define MMQ_TOK 64
#define MMQ_NT (MMQ_TOK / 8)

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

// The common frame of a lane: its rows (rA = r0 + g, rB = rA + 8; a row past the matrix reads row 0,
// whose results are not stored), its tokens, and the two weight rows of `rb` bytes it reads.
struct MmqTile {
    int g, t, rA, rB, t0;
    bool okA, okB;
    const u8* wA;
    const u8* wB;
};

__device__ __forceinline__ MmqTile mmq_tile(const u8* __restrict__ w, int n_rows, long long rb) {
    MmqTile m;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    m.g = lane >> 2;
    m.t = lane & 3;
    m.rA = blockIdx.x * MMQ_ROWS + warp * 16 + m.g;
    m.rB = m.rA + 8;
    m.okA = m.rA < n_rows;
    m.okB = m.rB < n_rows;
    m.t0 = blockIdx.y * MMQ_TOK;
    m.wA = w + (long long)(m.okA ? m.rA : 0) * rb;
    m.wB = w + (long long)(m.okB ? m.rB : 0) * rb;
    return m;
}

// acc[nt][e]: row (e < 2 ? rA : rB), token t0 + 8 nt + 2t + (e & 1).
__device__ __forceinline__ void mmq_store(const MmqTile& m, const float acc[MMQ_NT][4], int n_tok, int n_rows,
                                          float* __restrict__ out) {
#pragma unroll
    for (int nt = 0; nt < MMQ_NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int tok = m.t0 + 8 * nt + 2 * m.t + (e & 1);
            const bool ok = e < 2 ? m.okA : m.okB;
            if (ok && tok < n_tok) out[(long long)tok * n_rows + (e < 2 ? m.rA : m.rB)] = acc[nt][e];
        }
}

// Activation bytes of token `tok` at k-offset `off` (zero past the batch: its outputs are not stored).
__device__ __forceinline__ unsigned long long act8(const i8* __restrict__ qa, int tok, int n_tok, int K, int off) {
    return tok < n_tok ? *(const unsigned long long*)(qa + (long long)tok * K + off) : 0ull;
}
__device__ __forceinline__ int act4(const i8* __restrict__ qa, int tok, int n_tok, int K, int off) {
    return tok < n_tok ? *(const int*)(qa + (long long)tok * K + off) : 0;
}

extern "C" __global__ void __launch_bounds__(MMQ_WARPS * 32) mmq_q4_k(const i8* __restrict__ qa, const float* __restrict__ da,
                                                                      const int* __restrict__ sa, int K, int n_tok,
                                                                      const u8* __restrict__ w, int n_rows,
                                                                      float* __restrict__ out) {
    const int nb = K / 32, nsb = K / 256;
    const MmqTile m = mmq_tile(w, n_rows, (long long)nsb * 144);
    const u8 *wA = m.wA, *wB = m.wB;
    pdl_enter();
    float acc[MMQ_NT][4] = {};
    // the super-block's quant bytes this lane multiplies (8 of each 32-byte group, both rows), loaded
    // one super-block ahead so the next loads are in flight while this one is multiplied
    unsigned long long nA[4], nB[4];
    auto load = [&](int sb) {
#pragma unroll
        for (int jp = 0; jp < 4; jp++) {
            nA[jp] = *(const unsigned long long*)(wA + sb * 144 + 16 + 32 * jp + 8 * m.t);
            nB[jp] = *(const unsigned long long*)(wB + sb * 144 + 16 + 32 * jp + 8 * m.t);
        }
    };
    load(0);
    for (int sb = 0; sb < nsb; sb++) {
        const u8* xA = wA + sb * 144;
        const u8* xB = wB + sb * 144;
        unsigned long long qA[4], qB[4];
#pragma unroll
        for (int jp = 0; jp < 4; jp++) {
            qA[jp] = nA[jp];
            qB[jp] = nB[jp];
        }
        if (sb + 1 < nsb) load(sb + 1);
        int isum[MMQ_NT][4] = {};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const unsigned long long lo = 0x0F0F0F0F0F0F0F0Full;
            const unsigned long long vA = (j & 1) ? (qA[j >> 1] >> 4) & lo : qA[j >> 1] & lo;
            const unsigned long long vB = (j & 1) ? (qB[j >> 1] >> 4) & lo : qB[j >> 1] & lo;
            const int a[4] = {(int)(u32)vA, (int)(u32)vB, (int)(u32)(vA >> 32), (int)(u32)(vB >> 32)};
            int scA, mnA, scB, mnB;
            kscales<T_Q4_K>(wA, sb * 8 + j, scA, mnA);
            kscales<T_Q4_K>(wB, sb * 8 + j, scB, mnB);
#pragma unroll
            for (int nt = 0; nt < MMQ_NT; nt++) {
                const unsigned long long b = act8(qa, m.t0 + 8 * nt + m.g, n_tok, K, sb * 256 + 32 * j + 8 * m.t);
                int c[4];
                mma_s8_k32(c, a, (int)(u32)b, (int)(u32)(b >> 32));
                isum[nt][0] += scA * c[0];
                isum[nt][1] += scA * c[1];
                isum[nt][2] += scB * c[2];
                isum[nt][3] += scB * c[3];
            }
        }
        // the CPU's float steps for this super-block, per output
        const float dA = h2f(ld_u16(xA)), dminA = h2f(ld_u16(xA + 2));
        const float dB = h2f(ld_u16(xB)), dminB = h2f(ld_u16(xB + 2));
        int mnsA[8], mnsB[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int sc;
            kscales<T_Q4_K>(wA, sb * 8 + j, sc, mnsA[j]);
            kscales<T_Q4_K>(wB, sb * 8 + j, sc, mnsB[j]);
        }
#pragma unroll
        for (int nt = 0; nt < MMQ_NT; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int tok = min(m.t0 + 8 * nt + 2 * m.t + h, n_tok - 1);  // a clamped token's output is not stored
                const long long base = (long long)tok * nb + sb * 8;
                const float dab = da[base];
                const int4 s0 = *(const int4*)(sa + base), s1 = *(const int4*)(sa + base + 4);
                const int s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
                int msA = 0, msB = 0;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    msA += mnsA[j] * s[j];
                    msB += mnsB[j] * s[j];
                }
                acc[nt][h] = acc[nt][h] + ((dA * dab) * (float)isum[nt][h] - (dminA * dab) * (float)msA);
                acc[nt][2 + h] = acc[nt][2 + h] + ((dB * dab) * (float)isum[nt][2 + h] - (dminB * dab) * (float)msB);
            }
    }
    mmq_store(m, acc, n_tok, n_rows, out);
}

// Q6_K: each 32-weight sub-block is two 16-weight halves with their own int8 scales (two k16 mmas).
// Weight i of a super-block: n = i / 128, k = (i % 128) / 32, l = i % 32; low 4 bits from
// ql[64 n + 32 (k % 2) + l] (low nibble for k < 2), high 2 bits from qh[32 n + l] >> 2k; minus 32.
extern "C" __global__ void __launch_bounds__(MMQ_WARPS * 32) mmq_q6_k(const i8* __restrict__ qa, const float* __restrict__ da,
                                                                      const int* __restrict__ sa, int K, int n_tok,
                                                                      const u8* __restrict__ w, int n_rows,
                                                                      float* __restrict__ out) {
    const int nb = K / 32, nsb = K / 256;
    const MmqTile m = mmq_tile(w, n_rows, (long long)nsb * 210);
    const u8 *wA = m.wA, *wB = m.wB;
    pdl_enter();
    float acc[MMQ_NT][4] = {};
    for (int sb = 0; sb < nsb; sb++) {
        const u8* xA = wA + sb * 210;
        const u8* xB = wB + sb * 210;
        int isum[MMQ_NT][4] = {};
#pragma unroll 2
        for (int j = 0; j < 8; j++) {
            const int n = j >> 2, k = j & 3;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int l = 16 * h + 4 * m.t;
                int a[2];
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const u8* x = r == 0 ? xA : xB;
                    const int ql = ld_i32_b2(x + 64 * n + 32 * (k & 1) + l);
                    const int lo = (k < 2 ? ql : (ql >> 4)) & 0x0F0F0F0F;
                    const int hi = ((ld_i32_b2(x + 128 + 32 * n + l) >> (2 * k)) & 0x03030303) << 4;
                    a[r] = __vsub4(lo | hi, 0x20202020);
                }
                const int scA = ((const i8*)xA)[192 + 2 * j + h], scB = ((const i8*)xB)[192 + 2 * j + h];
#pragma unroll
                for (int nt = 0; nt < MMQ_NT; nt++) {
                    const int b = act4(qa, m.t0 + 8 * nt + m.g, n_tok, K, sb * 256 + 32 * j + l);
                    int c[4];
                    mma_s8_k16(c, a[0], a[1], b);
                    isum[nt][0] += scA * c[0];
                    isum[nt][1] += scA * c[1];
                    isum[nt][2] += scB * c[2];
                    isum[nt][3] += scB * c[3];
                }
            }
        }
        const float dA = h2f(ld_u16(xA + 208)), dB = h2f(ld_u16(xB + 208));
#pragma unroll
        for (int nt = 0; nt < MMQ_NT; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int tok = min(m.t0 + 8 * nt + 2 * m.t + h, n_tok - 1);
                const float dab = da[(long long)tok * nb + sb * 8];
                acc[nt][h] = acc[nt][h] + (dA * dab) * (float)isum[nt][h];
                acc[nt][2 + h] = acc[nt][2 + h] + (dB * dab) * (float)isum[nt][2 + h];
            }
    }
    mmq_store(m, acc, n_tok, n_rows, out);
}
