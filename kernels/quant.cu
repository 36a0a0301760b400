// Quantized weights: decode of GGML blocks, matrix-vector products for decode (Q8 activations, dp4a),
// dequantization to f16 for the cuBLAS path, embedding lookup.
//
// Every quantized type is handled one 32-weight "Q8 block" at a time: block b of a row covers weights
// 32b..32b+32. decode<T> turns it into 8 ints of 4 signed bytes q (weights 4i..4i+3 in q[i]) and
//     weight = d0 * q + m   (weights 0..15)      weight = d1 * q + m   (weights 16..31)
// so one dot product form serves every type:  w . a = da * (d0 * sum_lo + d1 * sum_hi) + m * da * sum(qa).
// The float operations of d0 * q + m are those of the scalar reference dequantization (src/quant).

#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 4
#define T_Q8_0 5
#define T_Q4_K 6
#define T_Q6_K 7
// Q4_0 repacked at upload, per row: the 16 quant bytes of every block, then the f16 scales of every
// block (same bytes per row as the file, 16-byte loads; used when a row has an even number of blocks).
#define T_Q4_0R 8

// Q5_0: 4 high bits (bit 0..3 of h) to bit 4 of each byte.
__device__ __forceinline__ int expand_hi4(u32 h) {
    return (int)(((h & 1u) << 4) | ((h & 2u) << 11) | ((h & 4u) << 18) | ((h & 8u) << 25));
}

// Raw k-quant scales of Q8 block b: Q4_K sc, mn (6-bit) of sub-block b & 7; Q6_K the two int8 scales of
// its 16-weight halves (sc, mn).
template <int T>
__device__ __forceinline__ void kscales(const u8* __restrict__ row, int b, int& sc, int& mn) {
    if constexpr (T == T_Q4_K) {
        const u8* s = row + (b >> 3) * 144 + 4;
        const int j = b & 7;
        if (j < 4) {
            sc = s[j] & 63;
            mn = s[j + 4] & 63;
        } else {
            sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    } else {
        const i8* s = (const i8*)(row + (b >> 3) * 210 + 192) + 2 * (b & 7);
        sc = s[0];
        mn = s[1];
    }
}

// decode's codes are unsigned bytes; the weight is code - code_off<T>() (times the scale). The products
// take the offset out of their integer sums exactly (dot32<OFF>), so no per-byte subtraction is needed.
template <int T>
__device__ __forceinline__ constexpr int code_off() {
    return (T == T_Q4_0 || T == T_Q4_0R) ? 8 : T == T_Q5_0 ? 16 : T == T_Q6_K ? 32 : 0;
}

template <int T>
__device__ __forceinline__ void decode(const u8* __restrict__ row, int b, int nb, int q[8], float& d0, float& d1, float& m) {
    m = 0.0f;
    if constexpr (T == T_Q4_0R) {
        d0 = d1 = h2f(ld_u16(row + 16 * nb + 2 * b));
        int v[4];
        if ((nb & 7) == 0) {  // rows of 144-byte multiples: 16-byte aligned
            const uint4 u = *(const uint4*)(row + 16 * b);
            v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) v[i] = ld_i32_b4(row + 16 * b + 4 * i);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            q[i] = v[i] & 0x0F0F0F0F;
            q[i + 4] = (v[i] >> 4) & 0x0F0F0F0F;
        }
    } else if constexpr (T == T_Q4_0) {
        const u8* x = row + b * 18;
        d0 = d1 = h2f(ld_u16(x));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = ld_i32_b2(x + 2 + 4 * i);
            q[i] = v & 0x0F0F0F0F;
            q[i + 4] = (v >> 4) & 0x0F0F0F0F;
        }
    } else if constexpr (T == T_Q4_1) {
        const u8* x = row + b * 20;
        d0 = d1 = h2f(ld_u16(x));
        m = h2f(ld_u16(x + 2));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = ld_i32_b4(x + 4 + 4 * i);
            q[i] = v & 0x0F0F0F0F;
            q[i + 4] = (v >> 4) & 0x0F0F0F0F;
        }
    } else if constexpr (T == T_Q5_0) {
        const u8* x = row + b * 22;
        d0 = d1 = h2f(ld_u16(x));
        u32 qh = (u32)ld_i32_b2(x + 2);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int v = ld_i32_b2(x + 6 + 4 * i);
            q[i] = (v & 0x0F0F0F0F) | expand_hi4((qh >> (4 * i)) & 0xF);
            q[i + 4] = ((v >> 4) & 0x0F0F0F0F) | expand_hi4((qh >> (16 + 4 * i)) & 0xF);
        }
    } else if constexpr (T == T_Q8_0) {
        const u8* x = row + b * 34;
        d0 = d1 = h2f(ld_u16(x));
#pragma unroll
        for (int i = 0; i < 8; i++) q[i] = ld_i32_b2(x + 2 + 4 * i);
    } else if constexpr (T == T_Q4_K) {
        const u8* x = row + (b >> 3) * 144;
        const int j = b & 7;
        const float d = h2f(ld_u16(x)), dmin = h2f(ld_u16(x + 2));
        int sc, mn;
        kscales<T_Q4_K>(row, b, sc, mn);
        d0 = d1 = d * (float)sc;
        m = -(dmin * (float)mn);
        // rows are whole 144-byte super-blocks, so the 32 quant bytes are 16-byte aligned
        const uint4* qs = (const uint4*)(x + 16 + 32 * (j >> 1));
        const uint4 u0 = qs[0], u1 = qs[1];
        const int v[8] = {(int)u0.x, (int)u0.y, (int)u0.z, (int)u0.w, (int)u1.x, (int)u1.y, (int)u1.z, (int)u1.w};
        const int shift = (j & 1) * 4;
#pragma unroll
        for (int i = 0; i < 8; i++) q[i] = (v[i] >> shift) & 0x0F0F0F0F;
    } else if constexpr (T == T_Q6_K) {
        const u8* x = row + (b >> 3) * 210;
        const int j = b & 7, n = j >> 2, k = j & 3;
        const float d = h2f(ld_u16(x + 208));
        const i8* sc = (const i8*)(x + 192) + 2 * j;
        d0 = d * (float)sc[0];
        d1 = d * (float)sc[1];
        int l[8], h[8];
        ld8_b2(x + 64 * n + 32 * (k & 1), l);
        ld8_b2(x + 128 + 32 * n, h);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int lo = (k < 2 ? l[i] : (l[i] >> 4)) & 0x0F0F0F0F;
            const int hi = ((h[i] >> (2 * k)) & 0x03030303) << 4;
            q[i] = lo | hi;
        }
    }
}

// Signed byte k (0..3) of a packed int.
__device__ __forceinline__ int sbyte(int v, int k) { return (int)(i8)(v >> (8 * k)); }

// Bytes per row of K weights (K a multiple of 32; 256 for the k-quants).
__device__ __forceinline__ long long row_bytes_of(int T, int K) {
    switch (T) {
        case T_F32: return 4LL * K;
        case T_F16: return 2LL * K;
        case T_Q4_0: case T_Q4_0R: return K / 32 * 18;
        case T_Q4_1: return K / 32 * 20;
        case T_Q5_0: return K / 32 * 22;
        case T_Q8_0: return K / 32 * 34;
        case T_Q4_K: return K / 256 * 144;
        default: return K / 256 * 210;
    }
}

// ---- activations: x [n x K] f32 -> Q8 blocks of 32: qa [n x K] int8, da [n x K/32] (f16-rounded
// scale, as the CPU's Q8_0 stores it), sa [n x K/32] = sum of the block's qa, ss = f16(d * sa) (the
// CPU's Q8_1 sum, which Q4_1's dot uses). One warp per block.
// Q8 block blk from the warp's 32 values, v in lane order (also the epilogue of rms_norm_q and glu_q).
__device__ __forceinline__ void q8_store(float v, long long blk, i8* __restrict__ qa, float* __restrict__ da,
                                         int* __restrict__ sa, float* __restrict__ ss) {
    const int lane = threadIdx.x & 31;
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    const int qv = __float2int_rn(v * id);
    qa[(long long)blk * 32 + lane] = (i8)qv;
    const int s = warp_sum_i(qv);
    if (lane == 0) {
        da[blk] = f16_round(d);
        sa[blk] = s;
        ss[blk] = f16_round(d * (float)s);  // Q8_1's s, as the CPU's quantize_q8_1 rounds it (Q4_1)
    }
}

extern "C" __global__ void quantize_q8(const float* __restrict__ x, i8* __restrict__ qa, float* __restrict__ da,
                                       int* __restrict__ sa, float* __restrict__ ss, int n_blocks) {
    pdl_enter();
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (blk >= n_blocks) return;
    q8_store(x[(long long)blk * 32 + (threadIdx.x & 31)], blk, qa, da, sa, ss);
}

// Q8_K activations (for the k-quant weights, as the CPU's quantize_q8_k / ggml's quantize_row_q8_K_ref):
// one scale per 256 values, d = max / -127 with max the first value of largest magnitude,
// q = round_half_even(x * (-127 / max)) capped at 127. Written in the Q8-block layout above: da holds d
// for each of the 8 blocks of 32 (not f16-rounded: Q8_K keeps d in f32). One warp per 256 values; lane l
// takes values 8l..8l+8.
__device__ __forceinline__ void q8k_vals(const float v[8], int q[8], float& d) {
    const int lane = threadIdx.x & 31;
    float amax = 0.0f, mx = 0.0f;
    int at = 1 << 30;
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (fabsf(v[i]) > amax) { amax = fabsf(v[i]); mx = v[i]; at = 8 * lane + i; }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float oa = __shfl_xor_sync(0xffffffffu, amax, o), om = __shfl_xor_sync(0xffffffffu, mx, o);
        const int oi = __shfl_xor_sync(0xffffffffu, at, o);
        if (oa > amax || (oa == amax && oi < at)) { amax = oa; mx = om; at = oi; }
    }
    if (amax == 0.0f) {
        d = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) q[i] = 0;
        return;
    }
    const float iscale = -127.0f / mx;
#pragma unroll
    for (int i = 0; i < 8; i++) q[i] = min(__float2int_rn(iscale * v[i]), 127);
    d = 1.0f / iscale;
}

__device__ __forceinline__ void q8k_block(const float* __restrict__ x, float v[8], int q[8], float& d) {
    const int lane = threadIdx.x & 31;
    const float4 a = ((const float4*)x)[2 * lane], b = ((const float4*)x)[2 * lane + 1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    q8k_vals(v, q, d);
}

// Super-block sb of Q8_K activations from the warp's q (lane l: values 8l..8l+8) and d.
__device__ __forceinline__ void q8k_store(const int q[8], float d, long long sb, i8* __restrict__ qa,
                                          float* __restrict__ da, int* __restrict__ sa, float* __restrict__ ss) {
    const int lane = threadIdx.x & 31;
    int s = 0;
    u32 lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        lo |= (u32)(q[i] & 0xff) << (8 * i);
        hi |= (u32)(q[i + 4] & 0xff) << (8 * i);
        s += q[i] + q[i + 4];
    }
    ((uint2*)(qa + sb * 256))[lane] = make_uint2(lo, hi);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if ((lane & 3) == 0) {
        da[sb * 8 + lane / 4] = d;
        sa[sb * 8 + lane / 4] = s;
        ss[sb * 8 + lane / 4] = d * (float)s;
    }
}

extern "C" __global__ void quantize_q8k(const float* __restrict__ x, i8* __restrict__ qa, float* __restrict__ da,
                                        int* __restrict__ sa, float* __restrict__ ss, int n_super) {
    pdl_enter();
    const int sb = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (sb >= n_super) return;
    float v[8], d;
    int q[8];
    q8k_block(x + (long long)sb * 256, v, q, d);
    q8k_store(q, d, sb, qa, da, sa, ss);
}

// The large-batch path multiplies f16 activations; they are first rounded through the same Q8 blocks
// as the small-batch path (and the CPU), so prefill and decode see the same activation values.
extern "C" __global__ void q8_to_f16(const float* __restrict__ x, u16* __restrict__ out, int n_blocks) {
    pdl_enter();
    const int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (blk >= n_blocks) return;
    const float v = x[(long long)blk * 32 + lane];
    const float amax = warp_max(fabsf(v));
    const float d = f16_round(amax / 127.0f);
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    out[(long long)blk * 32 + lane] = f2h((float)__float2int_rn(v * id) * d);
}

extern "C" __global__ void q8k_to_f16(const float* __restrict__ x, u16* __restrict__ out, int n_super) {
    pdl_enter();
    const int sb = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (sb >= n_super) return;
    float v[8], d;
    int q[8];
    q8k_block(x + (long long)sb * 256, v, q, d);
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) w[i] = (u32)f2h((float)q[2 * i] * d) | ((u32)f2h((float)q[2 * i + 1] * d) << 16);
    ((uint4*)(out + (long long)sb * 256))[lane] = make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- matrix-vector (decode, up to 8 tokens): out[t][r] = w[r] . x[t]. One warp per weight row; lane
// l takes Q8 blocks l, l+32, ... of the row; the weights are decoded once for all tokens.
#define MMV_MAX_TOK 8
#define MMV_WARPS 4
// Blocks per lane per step. 4 (all loads first) measured slower than 1 on the H100 (bench/GPU_NOTES.md).
#define MMV_UNROLL 1

// The two integer half-sums of one 32-weight block: codes q[0..4] against activations 0..16 (lo),
// q[4..8] against 16..32 (hi); `a` is the block's 32 Q8 activations (16-byte aligned).
// With OFF, the codes q are unsigned and each weight is q - OFF: OFF x the activations' half sums are taken
// out by dp4a against bytes of -OFF (exact integers, as the signed codes would give).
template <int OFF = 0>
__device__ __forceinline__ void dot32(const int q[8], const i8* __restrict__ a, int& lo, int& hi) {
    const int4* ap = (const int4*)a;
    const int4 a0 = ap[0], a1 = ap[1];
    lo = __dp4a(q[0], a0.x, lo);
    lo = __dp4a(q[1], a0.y, lo);
    lo = __dp4a(q[2], a0.z, lo);
    lo = __dp4a(q[3], a0.w, lo);
    hi = __dp4a(q[4], a1.x, hi);
    hi = __dp4a(q[5], a1.y, hi);
    hi = __dp4a(q[6], a1.z, hi);
    hi = __dp4a(q[7], a1.w, hi);
    if constexpr (OFF != 0) {
        constexpr int m = (int)(0x01010101u * (u32)(u8)(-OFF));
        lo = __dp4a(m, a0.x, __dp4a(m, a0.y, __dp4a(m, a0.z, __dp4a(m, a0.w, lo))));
        hi = __dp4a(m, a1.x, __dp4a(m, a1.y, __dp4a(m, a1.z, __dp4a(m, a1.w, hi))));
    }
}

// Rounds exactly as the CPU backend's dots (src/backend/cpu/kernels.rs, module doc):
//   32-weight types: t_b = (d_w * d_a) * sumi_b [+ m_w * s_a]; acc[b % 4] += t_b in block order;
//                    result (acc0 + acc2) + (acc1 + acc3);
//   k-quants:        per 256: exact integer isum (and msum), sumf += d * isum [- dmin * msum] in order.
// Lane l decodes blocks l, l + 32, ...; each round of 32 blocks is folded into the ordered sums by
// shuffles (lanes 0..3 hold acc[0..3]; every lane holds sumf).
template <int T>
__device__ __forceinline__ void mmv_q(const u8* __restrict__ w, int K, int n_rows, int row, const i8* __restrict__ qa,
                                      const float* __restrict__ da, const int* __restrict__ sa,
                                      const float* __restrict__ ss, int n_tok, float* __restrict__ out) {
    constexpr bool KQ = T == T_Q4_K || T == T_Q6_K;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const int nb = K / 32;
    const u8* wrow = w + (long long)row * row_bytes_of(T, K);
    float acc[MMV_MAX_TOK];
#pragma unroll
    for (int t = 0; t < MMV_MAX_TOK; t++) acc[t] = 0.0f;
    for (int b0 = 0; b0 < nb; b0 += 32) {
        const int b = b0 + lane;
        const bool have = b < nb;
        int q[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        float d0 = 0.0f, d1 = 0.0f, m = 0.0f;
        int sc = 0, mn = 0;
        float dw = 0.0f, dminw = 0.0f;
        if (have) {
            decode<T>(wrow, b, nb, q, d0, d1, m);
            if constexpr (KQ) {
                kscales<T>(wrow, b, sc, mn);
                const u8* x = wrow + (b >> 3) * (T == T_Q4_K ? 144 : 210);
                dw = h2f(ld_u16(x + (T == T_Q4_K ? 0 : 208)));
                if (T == T_Q4_K) dminw = h2f(ld_u16(x + 2));
            }
        }
#pragma unroll
        for (int t = 0; t < MMV_MAX_TOK; t++) {
            if (t < n_tok) {
                int lo = 0, hi = 0;
                float dab = 0.0f;
                if (have) {
                    dot32<code_off<T>()>(q, qa + (long long)t * K + b * 32, lo, hi);
                    dab = da[t * nb + b];
                }
                if constexpr (KQ) {
                    // exact integer sums over the 8 blocks (lanes) of each super-block
                    int isum = T == T_Q4_K ? sc * (lo + hi) : sc * lo + mn * hi;
                    int msum = T == T_Q4_K && have ? mn * sa[t * nb + b] : 0;
#pragma unroll
                    for (int o = 1; o < 8; o <<= 1) {
                        isum += __shfl_xor_sync(0xffffffffu, isum, o);
                        if (T == T_Q4_K) msum += __shfl_xor_sync(0xffffffffu, msum, o);
                    }
                    float v;
                    if (T == T_Q4_K) v = (dw * dab) * (float)isum - (dminw * dab) * (float)msum;
                    else v = (dw * dab) * (float)isum;
#pragma unroll
                    for (int g = 0; g < 4; g++) {
                        const float x = __shfl_sync(0xffffffffu, v, 8 * g);
                        if (b0 + 8 * g < nb) acc[t] = acc[t] + x;
                    }
                } else {
                    float v = (d0 * dab) * (float)(lo + hi);
                    if (T == T_Q4_1) v = v + m * (have ? ss[t * nb + b] : 0.0f);
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        const float x = __shfl_sync(0xffffffffu, v, (lane & 3) + 4 * i);
                        if (b0 + (lane & 3) + 4 * i < nb) acc[t] = acc[t] + x;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MMV_MAX_TOK; t++) {
        if (t < n_tok) {
            float s;
            if constexpr (KQ) {
                s = acc[t];
            } else {
                const float a1 = __shfl_sync(0xffffffffu, acc[t], 1), a2 = __shfl_sync(0xffffffffu, acc[t], 2);
                const float a3 = __shfl_sync(0xffffffffu, acc[t], 3);
                s = (acc[t] + a2) + (a1 + a3);
            }
            if (lane == 0) out[(long long)t * n_rows + row] = s;
        }
    }
}

// Float weights (F32, F16) times f32 activations.
template <int T>
__device__ __forceinline__ void mmv_f(const u8* __restrict__ w, int K, int n_rows, const float* __restrict__ x,
                                      int n_tok, float* __restrict__ out) {
    const int row = blockIdx.x * MMV_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    float acc[MMV_MAX_TOK];
#pragma unroll
    for (int t = 0; t < MMV_MAX_TOK; t++) acc[t] = 0.0f;
    for (int k = lane; k < K; k += 32) {
        const float wv = T == T_F32 ? ((const float*)w)[(long long)row * K + k] : h2f(((const u16*)w)[(long long)row * K + k]);
#pragma unroll
        for (int t = 0; t < MMV_MAX_TOK; t++)
            if (t < n_tok) acc[t] = fmaf(wv, x[(long long)t * K + k], acc[t]);
    }
    // the CPU's dot_f16w / dot_f32w order (K is a multiple of 32)
#pragma unroll
    for (int t = 0; t < MMV_MAX_TOK; t++) {
        if (t < n_tok) {
            const float s = cpu_tree_sum(acc[t]);
            if (lane == 0) out[(long long)t * n_rows + row] = s;
        }
    }
}

// One token (decode): the same float steps as mmv_q for n_tok = 1, but each lane first issues the
// loads of U (MMV1_U) rounds of 32 blocks (more bytes in flight per warp), then folds the rounds in block
// order exactly as mmv_q does.
#define MMV1_U 4
template <int T, int U = MMV1_U>
__device__ __forceinline__ void mmv1_q(const u8* __restrict__ w, int K, int n_rows, int row, const i8* __restrict__ qa,
                                       const float* __restrict__ da, const int* __restrict__ sa,
                                       const float* __restrict__ ss, float* __restrict__ out) {
    constexpr bool KQ = T == T_Q4_K || T == T_Q6_K;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const int nb = K / 32;
    const u8* wrow = w + (long long)row * row_bytes_of(T, K);
    float acc = 0.0f;
    for (int b0 = 0; b0 < nb; b0 += 32 * U) {
        int q[U][8];
        float d0[U], m[U], dw[U], dminw[U];
        int sc[U], mn[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int b = b0 + 32 * u + lane;
#pragma unroll
            for (int i = 0; i < 8; i++) q[u][i] = 0;
            d0[u] = m[u] = dw[u] = dminw[u] = 0.0f;
            sc[u] = mn[u] = 0;
            if (b < nb) {
                float d1;
                decode<T>(wrow, b, nb, q[u], d0[u], d1, m[u]);
                if constexpr (KQ) {
                    kscales<T>(wrow, b, sc[u], mn[u]);
                    const u8* x = wrow + (b >> 3) * (T == T_Q4_K ? 144 : 210);
                    dw[u] = h2f(ld_u16(x + (T == T_Q4_K ? 0 : 208)));
                    if (T == T_Q4_K) dminw[u] = h2f(ld_u16(x + 2));
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int bb = b0 + 32 * u;  // first block of this round (warp-uniform)
            if (bb >= nb) break;
            const int b = bb + lane;
            const bool have = b < nb;
            int lo = 0, hi = 0;
            float dab = 0.0f;
            if (have) {
                dot32<code_off<T>()>(q[u], qa + b * 32, lo, hi);
                dab = da[b];
            }
            if constexpr (KQ) {
                int isum = T == T_Q4_K ? sc[u] * (lo + hi) : sc[u] * lo + mn[u] * hi;
                int msum = T == T_Q4_K && have ? mn[u] * sa[b] : 0;
#pragma unroll
                for (int o = 1; o < 8; o <<= 1) {
                    isum += __shfl_xor_sync(0xffffffffu, isum, o);
                    if (T == T_Q4_K) msum += __shfl_xor_sync(0xffffffffu, msum, o);
                }
                float v;
                if (T == T_Q4_K) v = (dw[u] * dab) * (float)isum - (dminw[u] * dab) * (float)msum;
                else v = (dw[u] * dab) * (float)isum;
#pragma unroll
                for (int g = 0; g < 4; g++) {
                    const float x = __shfl_sync(0xffffffffu, v, 8 * g);
                    if (bb + 8 * g < nb) acc = acc + x;
                }
            } else {
                float v = (d0[u] * dab) * (float)(lo + hi);
                if (T == T_Q4_1) v = v + m[u] * (have ? ss[b] : 0.0f);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float x = __shfl_sync(0xffffffffu, v, (lane & 3) + 4 * i);
                    if (bb + (lane & 3) + 4 * i < nb) acc = acc + x;
                }
            }
        }
    }
    float s;
    if constexpr (KQ) {
        s = acc;
    } else {
        const float a1 = __shfl_sync(0xffffffffu, acc, 1), a2 = __shfl_sync(0xffffffffu, acc, 2);
        const float a3 = __shfl_sync(0xffffffffu, acc, 3);
        s = (acc + a2) + (a1 + a3);
    }
    if (lane == 0) out[row] = s;
}

// One token, Q4_0 repacked (T_Q4_0R), persistent warps with software pipelining: warp w of the grid
// (W warps in all) takes rows w, w + W, ... of the parts' rows concatenated, each row in batches of
// U rounds of 32 blocks. The raw weight bytes of the next batch (this row's next one, or the next
// row's first) are loaded before this batch is unpacked and multiplied, so a warp always has a batch of
// loads in flight, also across rows. Per row the float steps are mmv1_q's (and mmv_q's) exactly.
struct Q4r_raw {
    uint4 qs[MMV1_U];
    u16 d[MMV1_U];
};

__device__ __forceinline__ void q4r_load(Q4r_raw& r, const u8* __restrict__ wrow, int nb, int b0) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < MMV1_U; u++) {
        const int b = b0 + 32 * u + lane;
        if (b < nb) {
            if ((nb & 7) == 0) {
                r.qs[u] = *(const uint4*)(wrow + 16 * b);
            } else {
                r.qs[u] = make_uint4(ld_i32_b4(wrow + 16 * b), ld_i32_b4(wrow + 16 * b + 4), ld_i32_b4(wrow + 16 * b + 8),
                                     ld_i32_b4(wrow + 16 * b + 12));
            }
            r.d[u] = ld_u16(wrow + 16 * nb + 2 * b);
        } else {
            r.qs[u] = make_uint4(0, 0, 0, 0);
            r.d[u] = 0;
        }
    }
}

// The part of concatenated row R: its weight row and output element.
__device__ __forceinline__ void mmvp_row(int R, int K, const u8* w0, int r0, float* o0, const u8* w1, int r1, float* o1,
                                         const u8* w2, float* o2, const u8*& wrow, float*& out) {
    const long long rb = row_bytes_of(T_Q4_0R, K);
    if (R < r0) {
        wrow = w0 + (long long)R * rb;
        out = o0 + R;
    } else if (R < r0 + r1) {
        wrow = w1 + (long long)(R - r0) * rb;
        out = o1 + (R - r0);
    } else {
        wrow = w2 + (long long)(R - r0 - r1) * rb;
        out = o2 + (R - r0 - r1);
    }
}

// Block b's term as the CPU rounds it, (d_w * d_a) * sumi, with sumi = (q - 8) . a taken as q . a - 8 * sum(a):
// the nibbles go to dp4a unsigned (0..15) and the activations' block sum `sa` (exact in int32) corrects them,
// so the codes need no per-byte subtraction (__vsub4 is 4-5 instructions on sm_80+). Zero when absent.
__device__ __forceinline__ float q4r_term(const uint4 raw, u16 d, const i8* __restrict__ qa, const float* __restrict__ da,
                                          const int* __restrict__ sa, int b, bool have) {
    if (!have) return 0.0f;
    const u32 v4[4] = {raw.x, raw.y, raw.z, raw.w};
    int q[8];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        q[i] = (int)(v4[i] & 0x0F0F0F0Fu);
        q[i + 4] = (int)((v4[i] >> 4) & 0x0F0F0F0Fu);
    }
    int lo = 0, hi = 0;
    dot32(q, qa + b * 32, lo, hi);
    return (h2f(d) * da[b]) * (float)(lo + hi - code_off<T_Q4_0R>() * sa[b]);
}

// 6 CTAs per SM: up to 80 registers, none spilled (8 per SM spilled and measured 11% slower, call 82).
extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32, 6) mmvp_q4_0r(
    const i8* __restrict__ qa, const float* __restrict__ da, const int* __restrict__ sa, const float* __restrict__ ss,
    int K, int n_tok, const u8* w0, int r0, float* o0, const u8* w1, int r1, float* o1, const u8* w2, int r2, float* o2) {
    const int lane = threadIdx.x & 31;
    const int W = gridDim.x * MMV_WARPS, rows = r0 + r1 + r2;
    int R = blockIdx.x * MMV_WARPS + (threadIdx.x >> 5);
    if (R >= rows) return;
    const int nb = K / 32, batch = 32 * MMV1_U;
    const u8* wrow;
    float* out;
    mmvp_row(R, K, w0, r0, o0, w1, r1, o1, w2, o2, wrow, out);
    int b0 = 0;
    Q4r_raw cur, nxt;
    q4r_load(cur, wrow, nb, b0);  // the weights only: before the inputs are ready (pdl_enter)
    pdl_enter();
    float acc = 0.0f;
    while (true) {
        // the next batch's loads first
        int R2 = R, nb0 = b0 + batch;
        const u8* wrow2 = wrow;
        float* out2 = out;
        if (nb0 >= nb) {
            R2 = R + W;
            nb0 = 0;
            if (R2 < rows) mmvp_row(R2, K, w0, r0, o0, w1, r1, o1, w2, o2, wrow2, out2);
        }
        const bool more = R2 < rows;
        if (more) q4r_load(nxt, wrow2, nb, nb0);
        // this batch: mmv1_q's float steps for T_Q4_0R; lanes 0..3 fold blocks (lane & 3) + 4i in order
#pragma unroll
        for (int u = 0; u < MMV1_U; u++) {
            const int bb = b0 + 32 * u;
            if (bb >= nb) break;
            const int b = bb + lane;
            const float v = q4r_term(cur.qs[u], cur.d[u], qa, da, sa, b, b < nb);
            if (bb + 32 <= nb) {  // a whole round (warp-uniform): no per-block checks
#pragma unroll
                for (int i = 0; i < 8; i++) acc = acc + __shfl_sync(0xffffffffu, v, (lane & 3) + 4 * i);
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float x = __shfl_sync(0xffffffffu, v, (lane & 3) + 4 * i);
                    if (bb + (lane & 3) + 4 * i < nb) acc = acc + x;
                }
            }
        }
        if (b0 + batch >= nb) {  // the row's last batch: (acc0 + acc2) + (acc1 + acc3)
            const float a1 = __shfl_sync(0xffffffffu, acc, 1), a2 = __shfl_sync(0xffffffffu, acc, 2);
            const float a3 = __shfl_sync(0xffffffffu, acc, 3);
            const float s = (acc + a2) + (a1 + a3);
            if (lane == 0) *out = s;
            acc = 0.0f;
        }
        if (!more) break;
        cur = nxt;
        R = R2;
        b0 = nb0;
        wrow = wrow2;
        out = out2;
    }
}

// The first 4 KB of the warp's weight row asked of L2 (one line per lane) before the kernel waits for
// its inputs (pdl_enter): under programmatic dependent launch the reads overlap the previous kernel.
template <int T>
__device__ __forceinline__ void mmv_prefetch(const u8* __restrict__ w, int K, int n_rows, int row) {
    if (row >= n_rows) return;
    const long long rb = row_bytes_of(T, K), at = 128LL * (threadIdx.x & 31);
    if (at < rb) prefetch_l2(w + (long long)row * rb + at);
}

// A launch takes up to 3 products of the same activations (Q, K, V; gate, up): part p has its weight
// w_p, rows r_p and output o_p (r_p = 0: absent). Blocks are handed out part after part, MMV_WARPS rows
// each. Returns this warp's part and sets its row.
__device__ __forceinline__ int mmv_part(int r0, int r1, int& row) {
    int blk = blockIdx.x;
    const int n0 = (r0 + MMV_WARPS - 1) / MMV_WARPS, n1 = (r1 + MMV_WARPS - 1) / MMV_WARPS;
    int p = 0;
    if (blk >= n0) {
        blk -= n0;
        p = 1;
        if (blk >= n1) {
            blk -= n1;
            p = 2;
        }
    }
    row = blk * MMV_WARPS + (threadIdx.x >> 5);
    return p;
}

#define MMV_ARGS                                                                                              \
    const i8 *qa, const float *da, const int *sa, const float *ss, int K, int n_tok, const u8 *w0, int r0,     \
        float *o0, const u8 *w1, int r1, float *o1, const u8 *w2, int r2, float *o2
#define MMV_PICK(T)                                                                                           \
    int row;                                                                                                  \
    const int p = mmv_part(r0, r1, row);                                                                      \
    const u8* w = p == 0 ? w0 : p == 1 ? w1 : w2;                                                             \
    const int n_rows = p == 0 ? r0 : p == 1 ? r1 : r2;                                                        \
    float* out = p == 0 ? o0 : p == 1 ? o1 : o2;                                                             \
    mmv_prefetch<T>(w, K, n_rows, row);                                                                       \
    pdl_enter();
#define MMV_Q(suffix, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32) mmv_##suffix(MMV_ARGS) {                      \
        MMV_PICK(T)                                                                                           \
        mmv_q<T>(w, K, n_rows, row, qa, da, sa, ss, n_tok, out);                                              \
    }
// One-token kernels, 4 rounds in flight per lane for the 32-weight types; for Q4_K and Q6_K 4 rounds
// measured slower than mmv on the H200 (94 / 72 registers; Q4_K_M tg128 211 vs 230 tok/s) and 2 rounds
// faster (56 / 48 registers; 248-252 vs 228-232), bench/GPU_NOTES.md session 3.
#define MMV_Q1(suffix, T)                                                                                     \
    MMV_Q(suffix, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32) mmv1_##suffix(MMV_ARGS) {                     \
        MMV_PICK(T)                                                                                           \
        mmv1_q<T>(w, K, n_rows, row, qa, da, sa, ss, out);                                                    \
    }
MMV_Q1(q4_0, T_Q4_0)
MMV_Q1(q4_0r, T_Q4_0R)
MMV_Q1(q4_1, T_Q4_1)
MMV_Q1(q5_0, T_Q5_0)
MMV_Q1(q8_0, T_Q8_0)
MMV_Q(q4_k, T_Q4_K)
MMV_Q(q6_k, T_Q6_K)
// k-quants, one token, 2 rounds in flight per lane
#define MMV1K(suffix, T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32) mmv1_##suffix(MMV_ARGS) {                     \
        MMV_PICK(T)                                                                                           \
        mmv1_q<T, 2>(w, K, n_rows, row, qa, da, sa, ss, out);                                                 \
    }
MMV1K(q4_k, T_Q4_K)
MMV1K(q6_k, T_Q6_K)

extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32) mmv_f32(const u8* w, int K, int n_rows, const float* x, int n_tok, float* out) {
    pdl_enter();
    mmv_f<T_F32>(w, K, n_rows, x, n_tok, out);
}
extern "C" __global__ void __launch_bounds__(MMV_WARPS * 32) mmv_f16(const u8* w, int K, int n_rows, const float* x, int n_tok, float* out) {
    pdl_enter();
    mmv_f<T_F16>(w, K, n_rows, x, n_tok, out);
}

// ---- the 32 weights of Q8 block b of a row, as f32 ----
template <int T>
__device__ __forceinline__ void block_values(const u8* __restrict__ row, int b, int nb, float v[32]) {
    if constexpr (T == T_F32) {
#pragma unroll
        for (int i = 0; i < 32; i++) v[i] = ((const float*)row)[b * 32 + i];
    } else if constexpr (T == T_F16) {
#pragma unroll
        for (int i = 0; i < 32; i++) v[i] = h2f(((const u16*)row)[b * 32 + i]);
    } else {
        int q[8];
        float d0, d1, m;
        decode<T>(row, b, nb, q, d0, d1, m);
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float d = i < 4 ? d0 : d1;
                const float qv = (float)(sbyte(q[i], k) - code_off<T>());
                v[4 * i + k] = (T == T_Q4_1 || T == T_Q4_K) ? d * qv + m : qv * d;
            }
    }
}

// Dequantize rows to f16 (the cuBLAS path): out [n_rows x K]; one thread per Q8 block.
template <int T>
__device__ __forceinline__ void dequant_f16(const u8* __restrict__ w, int K, int n_rows, u16* __restrict__ out) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int nb = K / 32;
    if (idx >= (long long)n_rows * nb) return;
    const long long row = idx / nb;
    const int b = (int)(idx % nb);
    float v[32];
    block_values<T>(w + row * row_bytes_of(T, K), b, nb, v);
    uint4* o = (uint4*)(out + row * K + b * 32);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint4 p;
        p.x = (u32)f2h(v[8 * i + 0]) | ((u32)f2h(v[8 * i + 1]) << 16);
        p.y = (u32)f2h(v[8 * i + 2]) | ((u32)f2h(v[8 * i + 3]) << 16);
        p.z = (u32)f2h(v[8 * i + 4]) | ((u32)f2h(v[8 * i + 5]) << 16);
        p.w = (u32)f2h(v[8 * i + 6]) | ((u32)f2h(v[8 * i + 7]) << 16);
        o[i] = p;
    }
}

// Embedding rows: out[t] = row tokens[t] of the table, f32; one thread per Q8 block.
template <int T>
__device__ __forceinline__ void embed_rows(const u8* __restrict__ w, int K, const u32* __restrict__ tokens, int n_tok,
                                           float* __restrict__ out) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int nb = K / 32;
    if (idx >= (long long)n_tok * nb) return;
    const int t = (int)(idx / nb), b = (int)(idx % nb);
    float v[32];
    block_values<T>(w + (long long)tokens[t] * row_bytes_of(T, K), b, nb, v);
    float4* o = (float4*)(out + (long long)t * K + b * 32);
#pragma unroll
    for (int i = 0; i < 8; i++) o[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

#define DEQ(suffix, T)                                                                                 \
    extern "C" __global__ void dequant_f16_##suffix(const u8* w, int K, int n_rows, u16* out) {         \
        pdl_enter();                                                                                   \
        dequant_f16<T>(w, K, n_rows, out);                                                             \
    }                                                                                                  \
    extern "C" __global__ void embed_##suffix(const u8* w, int K, const u32* tokens, int n_tok, float* out) { \
        pdl_enter();                                                                                   \
        embed_rows<T>(w, K, tokens, n_tok, out);                                                       \
    }
DEQ(f32, T_F32)
DEQ(f16, T_F16)
DEQ(q4_0, T_Q4_0)
DEQ(q4_0r, T_Q4_0R)
DEQ(q4_1, T_Q4_1)
DEQ(q5_0, T_Q5_0)
DEQ(q8_0, T_Q8_0)
DEQ(q4_k, T_Q4_K)
DEQ(q6_k, T_Q6_K)

// f32 activations -> f16 (the cuBLAS path).
extern "C" __global__ void f32_to_f16(const float* __restrict__ x, u16* __restrict__ out, long long n) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f2h(x[i]);
}
