// Paged attention over f16 K/V pools, for decode and prefill alike (flash-decoding style).
//
// pool (K, and V alike)  [num_slots x n_kv_heads x head_dim] f16,  slot = block_id * block_size + offset
// rows[2t], rows[2t+1]   query row t: offset of its sequence's block table in bt (-1: no sequence), and
//                        its position pos; it sees keys j in lo ..= pos (lo = pos + 1 - window, or 0)
//
// grid (query row, kv head x chunk of up to ATT_G query heads of its group, key split). A CTA reads
// each K/V row once for all its query heads (GQA). Inside a warp, LPK = head_dim/16 lanes share a key
// (16 dims each, two 16-byte loads), so a warp step covers 32/LPK keys; every lane group keeps its own
// online-softmax state, merged (log-sum-exp) across lane groups, then warps, then splits (attn_merge).
// Like the CPU backend, Q is rounded to f16 before q . k (ggml multiplies f16 by f16 there).

#define ATT_WARPS 4
#define ATT_G 4

__device__ __forceinline__ void load16_f16(const u16* __restrict__ p, float f[16]) {
    const uint4 a = *(const uint4*)p, b = *(const uint4*)(p + 8);
    const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; i++) {
        f[2 * i] = h2f((u16)(w[i] & 0xffff));
        f[2 * i + 1] = h2f((u16)(w[i] >> 16));
    }
}

// exp(a - b) where a may be -inf (then 0).
__device__ __forceinline__ float exp_diff(float a, float b) { return a == NEG_INF ? 0.0f : expf(a - b); }

template <int HD>
__device__ __forceinline__ void attn_body(const float* __restrict__ q, const u16* __restrict__ kc,
                                          const u16* __restrict__ vc, const int* __restrict__ rows,
                                          const u32* __restrict__ bt, int n_heads, int n_kv, int block_size,
                                          float scale, int window, int split_len, int n_splits, float* __restrict__ out,
                                          float* __restrict__ part_o, float* __restrict__ part_ml) {
    constexpr int LPK = HD / 16;
    constexpr int KPW = 32 / LPK;
    const int t = blockIdx.x;
    const int group = n_heads / n_kv;
    const int n_hc = (group + ATT_G - 1) / ATT_G;
    const int g = blockIdx.y / n_hc, hc = blockIdx.y % n_hc;
    const int h0 = g * group + hc * ATT_G;
    const int nh = min(ATT_G, group - hc * ATT_G);
    const int split = blockIdx.z;
    const int bt_off = rows[2 * t], pos = rows[2 * t + 1];
    if (bt_off < 0) return;
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const int k_begin = max(lo, split * split_len), k_end = min(pos + 1, (split + 1) * split_len);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kg = lane / LPK, d0 = (lane % LPK) * 16;

    float qr[ATT_G][16], m[ATT_G], l[ATT_G], acc[ATT_G][16];
#pragma unroll
    for (int hh = 0; hh < ATT_G; hh++) {
        m[hh] = NEG_INF;
        l[hh] = 0.0f;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            acc[hh][i] = 0.0f;
            qr[hh][i] = hh < nh ? f16_round(q[((long long)t * n_heads + h0 + hh) * HD + d0 + i]) : 0.0f;
        }
    }

    // K/V rows of the lane group's key for a warp step starting at `base` (keys past k_end read a valid
    // row and are masked later); the next step's rows are loaded before this step's math (prefetch).
    auto row_of = [&](int base) -> long long {
        const int j = base + kg;
        const int jj = j < k_end ? j : min(base, k_end - 1);
        const u32 slot = bt[bt_off + jj / block_size] * (u32)block_size + (u32)(jj % block_size);
        return ((long long)slot * n_kv + g) * HD + d0;
    };
    const int step = ATT_WARPS * KPW;
    int base = k_begin + warp * KPW;
    float kf[16], vf[16];
    if (base < k_end) {
        const long long r0 = row_of(base);
        load16_f16(kc + r0, kf);
        load16_f16(vc + r0, vf);
    }
    for (; base < k_end; base += step) {
        float kn[16], vn[16];
        if (base + step < k_end) {
            const long long rn = row_of(base + step);
            load16_f16(kc + rn, kn);
            load16_f16(vc + rn, vn);
        }
        const bool valid = base + kg < k_end;
        float s[ATT_G];
#pragma unroll
        for (int hh = 0; hh < ATT_G; hh++) {
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < 16; i++) d += qr[hh][i] * kf[i];
#pragma unroll
            for (int off = LPK / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
            s[hh] = d * scale;
        }
        if (valid) {
#pragma unroll
            for (int hh = 0; hh < ATT_G; hh++) {
                const float mn = fmaxf(m[hh], s[hh]);
                const float c = exp_diff(m[hh], mn);
                const float p = expf(s[hh] - mn);
                l[hh] = l[hh] * c + p;
#pragma unroll
                for (int i = 0; i < 16; i++) acc[hh][i] = acc[hh][i] * c + p * vf[i];
                m[hh] = mn;
            }
        }
#pragma unroll
        for (int i = 0; i < 16; i++) {
            kf[i] = kn[i];
            vf[i] = vn[i];
        }
    }

    // merge the lane groups of the warp
#pragma unroll
    for (int off = LPK; off < 32; off <<= 1) {
#pragma unroll
        for (int hh = 0; hh < ATT_G; hh++) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[hh], off);
            const float lo2 = __shfl_xor_sync(0xffffffffu, l[hh], off);
            const float mn = fmaxf(m[hh], mo);
            const float c1 = exp_diff(m[hh], mn), c2 = exp_diff(mo, mn);
            l[hh] = l[hh] * c1 + lo2 * c2;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                const float ao = __shfl_xor_sync(0xffffffffu, acc[hh][i], off);
                acc[hh][i] = acc[hh][i] * c1 + ao * c2;
            }
            m[hh] = mn;
        }
    }

    // merge the warps
    __shared__ float sm_m[ATT_WARPS][ATT_G], sm_l[ATT_WARPS][ATT_G];
    __shared__ float sm_acc[ATT_WARPS][ATT_G][HD];
    if (kg == 0) {
#pragma unroll
        for (int hh = 0; hh < ATT_G; hh++) {
            if (lane == 0) {
                sm_m[warp][hh] = m[hh];
                sm_l[warp][hh] = l[hh];
            }
#pragma unroll
            for (int i = 0; i < 16; i++) sm_acc[warp][hh][d0 + i] = acc[hh][i];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * HD; idx += blockDim.x) {
        const int hh = idx / HD, d = idx % HD;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w][hh]);
        float L = 0.0f, O = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) {
            const float c = exp_diff(sm_m[w][hh], M);
            L += sm_l[w][hh] * c;
            O += sm_acc[w][hh][d] * c;
        }
        const long long th = (long long)t * n_heads + h0 + hh;
        if (n_splits == 1) {
            out[th * HD + d] = O / L;
        } else {
            part_o[(th * n_splits + split) * HD + d] = O;
            if (d == 0) {
                part_ml[(th * n_splits + split) * 2] = M;
                part_ml[(th * n_splits + split) * 2 + 1] = L;
            }
        }
    }
}

#define ATTN(HD)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attn_hd##HD(                                       \
        const float* q, const u16* kc, const u16* vc, const int* rows, const u32* bt, int n_heads, int n_kv,       \
        int block_size, float scale, int window, int split_len, int n_splits, float* out, float* part_o,           \
        float* part_ml) {                                                                                          \
        attn_body<HD>(q, kc, vc, rows, bt, n_heads, n_kv, block_size, scale, window, split_len, n_splits, out,     \
                      part_o, part_ml);                                                                            \
    }
ATTN(64)
ATTN(128)
ATTN(256)

// Log-sum-exp merge of the key splits: one block of head_dim threads per (query row, head).
extern "C" __global__ void attn_merge(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                      const int* __restrict__ rows, int n_heads, int head_dim, int n_splits,
                                      float* __restrict__ out) {
    const long long th = blockIdx.x;
    const int t = (int)(th / n_heads), d = threadIdx.x;
    if (rows[2 * t] < 0 || d >= head_dim) return;
    const float* ml = part_ml + th * n_splits * 2;
    float M = NEG_INF;
    for (int s = 0; s < n_splits; s++) M = fmaxf(M, ml[2 * s]);
    float L = 0.0f, O = 0.0f;
    for (int s = 0; s < n_splits; s++) {
        const float c = exp_diff(ml[2 * s], M);
        L += ml[2 * s + 1] * c;
        O += part_o[(th * n_splits + s) * head_dim + d] * c;
    }
    out[th * head_dim + d] = O / L;
}
