// Paged attention over f16 K/V pools, for decode and prefill alike (flash-decoding style), computing the
// CPU backend's function (src/backend/cpu/attention.rs) up to f32 summation order:
//
// pool (K, and V alike)  [num_slots x n_kv_heads x head_dim] f16,  slot = block_id * block_size + offset
// rows[2t], rows[2t+1]   query row t: offset of its sequence's block table in bt (-1: no sequence), and
//                        its position pos; it sees keys j in lo ..= pos (lo = pos + 1 - window, or 0)
// splits                 [lo, lo + S) [lo + S, lo + 2S) ... [.., pos], S = ATT_SPLIT (the CPU's SPLIT_TOKENS)
//
// grid (query row, kv head x chunk of up to ATT_G query heads of its group, split). A CTA reads each K/V
// row once for all its query heads (GQA), in three phases over its split (at most ATT_SPLIT keys):
//   1. s_j = scale * (f16(q) . k_j), kept in shared memory; the split's max m;
//   2. e_j = exp(s_j - m), l = sum e_j in f64; weights w_j = f16(e_j * f32(1/l)) (ggml's f16 weights);
//   3. o = sum_j w_j v_j.
// A row with one split writes o; otherwise (o, m, l) per split, folded left in split order by attn_merge
// with the CPU's log-sum-exp weights (part_ml per split: m as f32, then l as f64 at float offset 2).
// Every float operation follows the CPU's order: q . k one warp per key in dot_f16's order
// (cpu_tree_sum), o one thread per (head, dim) accumulating keys in order by FMA (axpy_f16).

#define ATT_WARPS 4
#define ATT_G 4
#define ATT_SPLIT 512
#define ATT_CH 64  // keys staged in shared memory at a time

__device__ __forceinline__ void load16_f16(const u16* __restrict__ p, float f[16]) {
    const uint4 a = *(const uint4*)p, b = *(const uint4*)(p + 8);
    const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; i++) {
        f[2 * i] = h2f((u16)(w[i] & 0xffff));
        f[2 * i + 1] = h2f((u16)(w[i] >> 16));
    }
}

template <int HD>
__device__ __forceinline__ void attn_body(const float* __restrict__ q, const u16* __restrict__ kc,
                                          const u16* __restrict__ vc, const int* __restrict__ rows,
                                          const u32* __restrict__ bt, int n_heads, int n_kv, int block_size,
                                          float scale, int window, int n_splits, float* __restrict__ out,
                                          float* __restrict__ part_o, float* __restrict__ part_ml) {
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
    const int row_splits = (pos + 1 - lo + ATT_SPLIT - 1) / ATT_SPLIT;
    if (split >= row_splits) return;
    const int k_begin = lo + split * ATT_SPLIT, k_end = min(pos + 1, k_begin + ATT_SPLIT);
    const int n = k_end - k_begin;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    __shared__ float sc[ATT_G][ATT_SPLIT];
    __shared__ float sm_red[ATT_WARPS][ATT_G];
    __shared__ double sm_sum[ATT_WARPS][ATT_G];

    constexpr int QPL = HD / 32;  // q . k terms per lane
    __shared__ u32 sslot[ATT_SPLIT];
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int j = k_begin + i;
        sslot[i] = bt[bt_off + j / block_size] * (u32)block_size + (u32)(j % block_size);
    }
    // lane c holds q elements c, c + 32, ... of each head, rounded to f16
    float qr[ATT_G][QPL];
#pragma unroll
    for (int hh = 0; hh < ATT_G; hh++)
#pragma unroll
        for (int e = 0; e < QPL; e++)
            qr[hh][e] = hh < nh ? f16_round(q[((long long)t * n_heads + h0 + hh) * HD + lane + 32 * e]) : 0.0f;
    __syncthreads();

    // K (then V) rows of the split staged through shared memory ATT_CH keys at a time: every thread's
    // 16-byte loads issued before the first store (memory parallelism for the few CTAs of a decode step)
    constexpr int VPR = HD / 8;                           // 16-byte pieces per row
    constexpr int PER = ATT_CH * VPR / (ATT_WARPS * 32);  // pieces per thread per chunk
    __shared__ __align__(16) u16 kvs[ATT_CH * HD];
    auto stage = [&](const u16* __restrict__ pool, int c0, int nk) {
        uint4 tmp[PER];
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int idx = threadIdx.x + j * ATT_WARPS * 32, r = idx / VPR;
            if (r < nk) tmp[j] = *(const uint4*)(pool + ((long long)sslot[c0 + r] * n_kv + g) * HD + 8 * (idx % VPR));
        }
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int idx = threadIdx.x + j * ATT_WARPS * 32;
            if (idx / VPR < nk) ((uint4*)kvs)[idx] = tmp[j];
        }
    };

    // 1. s_j = scale * (q . k_j), one warp per key, in the CPU's dot_f16 order; the split's max
    float m[ATT_G];
#pragma unroll
    for (int hh = 0; hh < ATT_G; hh++) m[hh] = NEG_INF;
    for (int c0 = 0; c0 < n; c0 += ATT_CH) {
        const int nk = min(ATT_CH, n - c0);
        __syncthreads();
        stage(kc, c0, nk);
        __syncthreads();
        for (int u = warp; u < nk; u += ATT_WARPS) {
            float kf[QPL];
#pragma unroll
            for (int e = 0; e < QPL; e++) kf[e] = h2f(kvs[u * HD + lane + 32 * e]);
#pragma unroll
            for (int hh = 0; hh < ATT_G; hh++) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < QPL; e++) a = fmaf(kf[e], qr[hh][e], a);
                const float s = cpu_tree_sum(a) * scale;
                m[hh] = fmaxf(m[hh], s);
                if (lane == 0) sc[hh][c0 + u] = s;
            }
        }
    }
    if (lane == 0)
#pragma unroll
        for (int hh = 0; hh < ATT_G; hh++) sm_red[warp][hh] = m[hh];
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < ATT_G; hh++) {
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_red[w][hh]);
        m[hh] = M;
    }

    // 2. exp, the f64 sum, the f16 weights
    double l[ATT_G];
#pragma unroll
    for (int hh = 0; hh < ATT_G; hh++) {
        double s = 0.0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float e = exp_cr(sc[hh][i] - m[hh]);
            sc[hh][i] = e;
            s += (double)e;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) sm_sum[warp][hh] = s;
    }
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < ATT_G; hh++) {
        double s = 0.0;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) s += sm_sum[w][hh];
        l[hh] = s;
        const float inv = (float)(1.0 / s);
        for (int i = threadIdx.x; i < n; i += blockDim.x) sc[hh][i] = f16_round(sc[hh][i] * inv);
    }
    __syncthreads();

    // 3. o = sum_j w_j v_j: one thread per dim for every head of the chunk (ATT_G independent chains),
    //    keys in order by FMA (the CPU's axpy_f16)
    constexpr int DPT = (HD + ATT_WARPS * 32 - 1) / (ATT_WARPS * 32);  // dims per thread
    float o[DPT][ATT_G];
#pragma unroll
    for (int k = 0; k < DPT; k++)
#pragma unroll
        for (int hh = 0; hh < ATT_G; hh++) o[k][hh] = 0.0f;
    for (int c0 = 0; c0 < n; c0 += ATT_CH) {
        const int nk = min(ATT_CH, n - c0);
        __syncthreads();
        stage(vc, c0, nk);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < DPT; k++) {
            const int d = threadIdx.x + k * ATT_WARPS * 32;
            if (d < HD) {
                for (int u = 0; u < nk; u++) {
                    const float v = h2f(kvs[u * HD + d]);
#pragma unroll
                    for (int hh = 0; hh < ATT_G; hh++) o[k][hh] = fmaf(sc[hh][c0 + u], v, o[k][hh]);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < DPT; k++) {
        const int d = threadIdx.x + k * ATT_WARPS * 32;
        if (d >= HD) continue;
#pragma unroll
        for (int hh = 0; hh < ATT_G; hh++) {
            if (hh >= nh) break;
            const long long th = (long long)t * n_heads + h0 + hh;
            if (row_splits == 1) {
                out[th * HD + d] = o[k][hh];
            } else {
                part_o[(th * n_splits + split) * HD + d] = o[k][hh];
                if (d == 0) {
                    float* ml = part_ml + (th * n_splits + split) * 4;
                    ml[0] = m[hh];
                    *(double*)(ml + 2) = l[hh];
                }
            }
        }
    }
}

#define ATTN(HD)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attn_hd##HD(                                       \
        const float* q, const u16* kc, const u16* vc, const int* rows, const u32* bt, int n_heads, int n_kv,       \
        int block_size, float scale, int window, int n_splits, float* out, float* part_o, float* part_ml) {        \
        attn_body<HD>(q, kc, vc, rows, bt, n_heads, n_kv, block_size, scale, window, n_splits, out, part_o,        \
                      part_ml);                                                                                    \
    }
ATTN(64)
ATTN(128)
ATTN(256)

// The splits of a row folded left in order, as the CPU's `merge`: one block of head_dim threads per
// (query row, head); rows with one split were written by the attention kernel.
extern "C" __global__ void attn_merge(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                      const int* __restrict__ rows, int n_heads, int head_dim, int n_splits,
                                      int window, float* __restrict__ out) {
    const long long th = blockIdx.x;
    const int t = (int)(th / n_heads), d = threadIdx.x;
    if (rows[2 * t] < 0 || d >= head_dim) return;
    const int pos = rows[2 * t + 1];
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const int row_splits = (pos + 1 - lo + ATT_SPLIT - 1) / ATT_SPLIT;
    if (row_splits == 1) return;
    const float* ml = part_ml + th * n_splits * 4;
    const float* po = part_o + th * n_splits * head_dim;
    float o = po[d], M = ml[0];
    double L = *(const double*)(ml + 2);
    for (int s = 1; s < row_splits; s++) {
        const float mb = ml[4 * s];
        const float mx = fmaxf(M, mb);
        const double wa = L * exp((double)(M - mx));
        const double wb = *(const double*)(ml + 4 * s + 2) * exp((double)(mb - mx));
        const double sum = wa + wb;
        const float fa = (float)(wa / sum), fb = (float)(wb / sum);
        o = o * fa + po[s * head_dim + d] * fb;
        M = mx;
        L = sum;
    }
    out[th * head_dim + d] = o;
}
