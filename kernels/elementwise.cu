// Elementwise and row-wise ops. Rounding follows the CPU backend (src/backend/cpu/mod.rs) where it is
// visible in the logits: RMS norm sums squares in f64 and scales before the weight; RoPE angles come
// from ggml's running product; GELU goes through f16 like ggml's table.

// RMS norm of n_rows rows of row_len; one block per row. w may be null. y, if not null, is first added
// to x in place (x += y, the residual add before the norm: one launch instead of two, the same values).
//
// When row_len = PER * blockDim.x (PER = 1, 2, 4, 8; the host picks such a block), a thread keeps its
// values x[tid + k * blockDim.x] in registers, every load issued before the first use, and the
// quantizing epilogue runs its PER per-block reductions side by side, with no bounds checks: the
// one-CTA kernel is issue-bound (ncu: 1,200 instructions per warp, 40% of them branches of guarded
// loops, 11.7 us for a 4096-wide row). Other rows take the loops. __launch_bounds__(1024): the host launches
// up to 1024 threads, so the register budget must allow it on every architecture NVRTC compiles for.

// The sum of every thread's s over the block (every thread gets it).
__device__ __forceinline__ double block_sum(double s) {
    __shared__ double part[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        double t = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
        if (threadIdx.x == 0) part[0] = t;
    }
    __syncthreads();
    return part[0];
}

__device__ __forceinline__ float rms_of(double sum, int row_len, float eps) {
    const float mean = (float)(sum / (double)row_len);
    return 1.0f / sqrtf(mean + eps);
}

// The row's 1 / sqrt(mean(x^2) + eps) (every thread gets it; the block's x writes are visible after it).
__device__ __forceinline__ float rms_scale(float* xr, const float* __restrict__ yr, int row_len, float eps) {
    double s = 0.0;
    for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
        float v = xr[i];
        if (yr) {
            v = v + yr[i];
            xr[i] = v;
        }
        s += (double)(v * v);
    }
    return rms_of(block_sum(s), row_len, eps);
}

// The register path (row_len = PER * blockDim.x): v[k] = the normalized, weighted value of element
// tid + k * blockDim.x, also written to o. The same float operations, in the same order, as the loops.
template <int PER>
__device__ __forceinline__ void rms_regs(float* xr, const float* __restrict__ yr, const float* __restrict__ w,
                                         int row_len, float eps, float* __restrict__ o, float v[PER]) {
    float yv[PER], wv[PER];
#pragma unroll
    for (int k = 0; k < PER; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        v[k] = xr[i];
        yv[k] = yr ? yr[i] : 0.0f;
        wv[k] = w ? w[i] : 1.0f;
    }
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < PER; k++) {
        if (yr) {
            v[k] = v[k] + yv[k];
            xr[threadIdx.x + k * blockDim.x] = v[k];
        }
        s += (double)(v[k] * v[k]);
    }
    const float scale = rms_of(block_sum(s), row_len, eps);
#pragma unroll
    for (int k = 0; k < PER; k++) {
        const float t = v[k] * scale;
        v[k] = w ? t * wv[k] : t;
        o[threadIdx.x + k * blockDim.x] = v[k];
    }
}

// Q8 blocks of the warp's values v[k] (lane order; block blk0 + k * stride), each as q8_store makes
// it, the PER reductions side by side.
template <int PER>
__device__ __forceinline__ void q8_store_regs(const float v[PER], long long blk0, int stride, i8* __restrict__ qa,
                                              float* __restrict__ da, int* __restrict__ sa, float* __restrict__ ss) {
    const int lane = threadIdx.x & 31;
    float amax[PER];
    int q[PER];
#pragma unroll
    for (int k = 0; k < PER; k++) amax[k] = fabsf(v[k]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int k = 0; k < PER; k++) amax[k] = fmaxf(amax[k], __shfl_xor_sync(0xffffffffu, amax[k], o));
#pragma unroll
    for (int k = 0; k < PER; k++) {
        const float id = amax[k] != 0.0f ? 127.0f / amax[k] : 0.0f;
        q[k] = __float2int_rn(v[k] * id);
        qa[(blk0 + (long long)k * stride) * 32 + lane] = (i8)q[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int k = 0; k < PER; k++) q[k] += __shfl_xor_sync(0xffffffffu, q[k], o);
    if (lane < PER) {  // lane k stores block k's scale and sums
        float am = amax[0];
        int qs = q[0];
#pragma unroll
        for (int k = 1; k < PER; k++)
            if (lane == k) {
                am = amax[k];
                qs = q[k];
            }
        const long long blk = blk0 + (long long)lane * stride;
        const float d = am / 127.0f;
        da[blk] = f16_round(d);
        sa[blk] = qs;
        ss[blk] = f16_round(d * (float)qs);  // as q8_store
    }
}

// The row's Q8_K super-blocks from o (complete: the caller synced), a warp per super-block.
__device__ __forceinline__ void q8k_from(const float* __restrict__ o, long long r, int row_len, i8* __restrict__ qa,
                                         float* __restrict__ da, int* __restrict__ sa, float* __restrict__ ss) {
    const int lane = threadIdx.x & 31;
    for (int sb = threadIdx.x >> 5; sb < row_len / 256; sb += blockDim.x >> 5) {
        float yv[8];
        int q[8];
        float d;
#pragma unroll
        for (int k = 0; k < 8; k++) yv[k] = o[sb * 256 + 8 * lane + k];
        q8k_vals(yv, q, d);
        q8k_store(q, d, r * (row_len / 256) + sb, qa, da, sa, ss);
    }
}

template <int PER>
__device__ __forceinline__ void rms_norm_q_regs(float* xr, const float* __restrict__ yr, const float* __restrict__ w,
                                                int row_len, float eps, float* __restrict__ o, long long r,
                                                i8* __restrict__ qa, float* __restrict__ da, int* __restrict__ sa,
                                                float* __restrict__ ss, int qact) {
    float v[PER];
    rms_regs<PER>(xr, yr, w, row_len, eps, o, v);
    if (qact == 1) {
        q8_store_regs<PER>(v, (r * row_len + threadIdx.x - (threadIdx.x & 31)) / 32, blockDim.x / 32, qa, da, sa, ss);
    } else if (qact == 2) {
        __syncthreads();  // o complete: the super-blocks read other threads' values
        q8k_from(o, r, row_len, qa, da, sa, ss);
    }
}

// The register path when row_len = PER x threads (PER 1, 2, 4, 8; qact 0: no epilogue); false: the
// caller takes the loops.
__device__ __forceinline__ bool rms_norm_regs(float* xr, const float* __restrict__ yr, const float* __restrict__ w,
                                              int row_len, float eps, float* __restrict__ o, long long r,
                                              i8* __restrict__ qa, float* __restrict__ da, int* __restrict__ sa,
                                              float* __restrict__ ss, int qact) {
    const int per = row_len / (int)blockDim.x;
    if (per * (int)blockDim.x != row_len) return false;
    switch (per) {
        case 1: rms_norm_q_regs<1>(xr, yr, w, row_len, eps, o, r, qa, da, sa, ss, qact); return true;
        case 2: rms_norm_q_regs<2>(xr, yr, w, row_len, eps, o, r, qa, da, sa, ss, qact); return true;
        case 4: rms_norm_q_regs<4>(xr, yr, w, row_len, eps, o, r, qa, da, sa, ss, qact); return true;
        case 8: rms_norm_q_regs<8>(xr, yr, w, row_len, eps, o, r, qa, da, sa, ss, qact); return true;
        default: return false;
    }
}

extern "C" __global__ void __launch_bounds__(1024) rms_norm(float* x, const float* __restrict__ w, int row_len, float eps,
                                    float* __restrict__ out, const float* __restrict__ y) {
    pdl_enter();
    const long long r = blockIdx.x;
    float* xr = x + r * row_len;
    float* o = out + r * row_len;
    const float* yr = y ? y + r * row_len : nullptr;
    if (rms_norm_regs(xr, yr, w, row_len, eps, o, r, nullptr, nullptr, nullptr, nullptr, 0)) return;
    const float scale = rms_scale(xr, yr, row_len, eps);
    for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
        const float v = xr[i] * scale;
        o[i] = w ? v * w[i] : v;
    }
}

// rms_norm, then its output quantized for the next product as `quantize_q8` (qact 1; row_len a multiple
// of 32: each warp holds whole blocks) or `quantize_q8k` (qact 2; row_len a multiple of 256: a warp per
// super-block) would: one launch instead of two, the same values.
extern "C" __global__ void __launch_bounds__(1024) rms_norm_q(float* x, const float* __restrict__ w, int row_len, float eps,
                                      float* __restrict__ out, const float* __restrict__ y, i8* __restrict__ qa,
                                      float* __restrict__ da, int* __restrict__ sa, float* __restrict__ ss, int qact) {
    pdl_enter();
    const long long r = blockIdx.x;
    float* xr = x + r * row_len;
    float* o = out + r * row_len;
    const float* yr = y ? y + r * row_len : nullptr;
    if (rms_norm_regs(xr, yr, w, row_len, eps, o, r, qa, da, sa, ss, qact)) return;
    const float scale = rms_scale(xr, yr, row_len, eps);
    if (qact == 1) {
        for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
            const float t = xr[i] * scale;
            const float yv = w ? t * w[i] : t;
            o[i] = yv;
            q8_store(yv, (r * row_len + i) / 32, qa, da, sa, ss);
        }
    } else {
        for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
            const float t = xr[i] * scale;
            o[i] = w ? t * w[i] : t;
        }
        __syncthreads();
        q8k_from(o, r, row_len, qa, da, sa, ss);
    }
}

// RoPE in place on x [n_tok x n_heads x head_dim]; one thread per (token, head, pair).
// mode 0: NORM (adjacent pairs), 1: NEOX (half split). ff: n_rot/2 frequency divisors or null.
// A second tensor xb of n_heads1 heads (0: none) at the same positions is rotated by the same launch
// (Q and K: one launch instead of two, the same values); threads past the first tensor's take it.
extern "C" __global__ void rope(float* __restrict__ x, const u32* __restrict__ pos, int n_tok, int n_heads, int head_dim,
                                int n_rot, int mode, float theta_scale, float freq_scale, const float* __restrict__ ff,
                                float* __restrict__ xb, int n_heads1) {
    pdl_enter();
    const int half = n_rot / 2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total0 = (long long)n_tok * n_heads * half;
    if (idx >= total0) {
        idx -= total0;
        x = xb;
        n_heads = n_heads1;
    }
    if (idx >= (long long)n_tok * n_heads * half) return;
    const int i = (int)(idx % half);
    const long long th = idx / half;  // token * n_heads + head
    const int t = (int)(th / n_heads);
    // ggml's ggml_rope_cache_init: theta = pos * theta_scale^i as a running product
    float theta = (float)pos[t];
    for (int k = 0; k < i; k++) theta *= theta_scale;
    const float f = ff ? ff[i] : 1.0f;
    const float a = freq_scale * (theta / f);
    const float c = cos_cr(a), s = sin_cr(a);
    float* h = x + th * head_dim;
    const int i0 = mode == 0 ? 2 * i : i;
    const int i1 = mode == 0 ? 2 * i + 1 : i + half;
    const float x0 = h[i0], x1 = h[i1];
    h[i0] = x0 * c - x1 * s;
    h[i1] = x0 * s + x1 * c;
}

__device__ __forceinline__ float gelu_tanh(float x) {
    const float GELU_COEF_A = 0.044715f;
    const float SQRT_2_OVER_PI = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * x * (1.0f + GELU_COEF_A * x * x)));
}

// act(x) * y; act 0: SiLU, 1: GELU (tanh) through f16 like ggml's table.
__device__ __forceinline__ float glu1(float x, float y, int act) {
    if (act == 0) return x / (1.0f + exp_cr(-x)) * y;
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x * y;
    return f16_round(gelu_tanh(f16_round(x))) * y;
}

// gate = act(gate) * up.
extern "C" __global__ void glu(float* __restrict__ g, const float* __restrict__ u, long long n, int act) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    g[i] = glu1(g[i], u[i], act);
}

// glu, then gate quantized for the next product as quantize_q8 (qact 1: one thread per value, n a
// multiple of 32) or quantize_q8k (qact 2: 8 values per thread, a warp per super-block, n a multiple of
// 256) would.
extern "C" __global__ void glu_q(float* __restrict__ g, const float* __restrict__ u, long long n, int act,
                                 i8* __restrict__ qa, float* __restrict__ da, int* __restrict__ sa,
                                 float* __restrict__ ss, int qact) {
    pdl_enter();
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (qact == 1) {
        if (t >= n) return;
        const float y = glu1(g[t], u[t], act);
        g[t] = y;
        q8_store(y, t / 32, qa, da, sa, ss);
    } else {
        const long long sb = t >> 5;
        if (sb >= n / 256) return;
        const int lane = threadIdx.x & 31;
        float y[8];
        int q[8];
        float d;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const long long i = sb * 256 + 8 * lane + k;
            y[k] = glu1(g[i], u[i], act);
            g[i] = y[k];
        }
        q8k_vals(y, q, d);
        q8k_store(q, d, sb, qa, da, sa, ss);
    }
}

extern "C" __global__ void add(float* __restrict__ x, const float* __restrict__ y, long long n) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void scale(float* __restrict__ x, float s, long long n) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// x [n x len] += bias [len]
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ b, int len, long long n) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += b[i % len];
}

// out[i] = src row rows[i]
extern "C" __global__ void get_rows(const float* __restrict__ src, int row_len, const u32* __restrict__ rows, int n,
                                    float* __restrict__ out) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * row_len) return;
    const int r = (int)(i / row_len), c = (int)(i % row_len);
    out[i] = src[(long long)rows[r] * row_len + c];
}

// K and V rows of n_tok tokens (width = n_kv_heads * head_dim) to f16 slots of the pools; each head's K
// elements in the attention's reading order (kpos), V's in order.
extern "C" __global__ void kv_write(u16* __restrict__ kc, u16* __restrict__ vc, const float* __restrict__ k,
                                    const float* __restrict__ v, const u32* __restrict__ slots, int n_tok, int width,
                                    int hd) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_tok * width) return;
    const int t = (int)(i / width), c = (int)(i % width);
    const long long dst = (long long)slots[t] * width + c;
    kc[dst - c % hd + kpos(c % hd, hd)] = f2h(k[i]);
    vc[dst] = f2h(v[i]);
}

// Copy-on-write: block src to block dst, K and V (n = block_size * width f16 elements per block).
extern "C" __global__ void kv_copy_blocks(u16* __restrict__ kc, u16* __restrict__ vc, u32 src, u32 dst, long long n) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    kc[(long long)dst * n + i] = kc[(long long)src * n + i];
    vc[(long long)dst * n + i] = vc[(long long)src * n + i];
}

// Slot moves (a sequence's compaction under a KV budget), every source read before any destination is
// written: kv_gather copies the K and V rows of the n sources to tmp [2 x n x width], then kv_scatter
// (the next launch on the stream) writes them to the destinations. moves[2m], moves[2m + 1]: source and
// destination slot of move m (destinations distinct: the host keeps the last move to each).
extern "C" __global__ void kv_gather(const u16* __restrict__ kc, const u16* __restrict__ vc, const u32* __restrict__ moves,
                                     int n, int width, u16* __restrict__ tmp) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * width) return;
    const int m = (int)(i / width), c = (int)(i % width);
    const long long src = (long long)moves[2 * m] * width + c;
    tmp[i] = kc[src];
    tmp[(long long)n * width + i] = vc[src];
}

extern "C" __global__ void kv_scatter(u16* __restrict__ kc, u16* __restrict__ vc, const u32* __restrict__ moves, int n,
                                      int width, const u16* __restrict__ tmp) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * width) return;
    const int m = (int)(i / width), c = (int)(i % width);
    const long long dst = (long long)moves[2 * m + 1] * width + c;
    kc[dst] = tmp[i];
    vc[dst] = tmp[(long long)n * width + i];
}

// argmax_rows' order: (v, i) replaces (best, bi) when its value is larger, or equal with a lower index.
__device__ __forceinline__ void argmax_take(float& best, int& bi, float v, int i) {
    if (v > best || (v == best && i < bi)) {
        best = v;
        bi = i;
    }
}

// Each row's greedy token (sampling::argmax): the lowest index whose value equals the row's maximum,
// NaNs never winning, and 0 for a row whose first value is NaN. One CTA a row (blockDim a multiple of
// 32, at most 1024): (value, index) pairs reduced by argmax_take, an order in which any reduction tree
// gives the same pair (-0 and +0 compare equal, as on the host).
extern "C" __global__ void argmax_rows(const float* __restrict__ x, int n_cols, u32* __restrict__ dst) {
    pdl_enter();
    const float* row = x + (long long)blockIdx.x * n_cols;
    float best = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n_cols; i += blockDim.x) argmax_take(best, bi, row[i], i);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, off);
        const int i = __shfl_xor_sync(0xffffffffu, bi, off);
        argmax_take(best, bi, v, i);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) argmax_take(best, bi, sv[w], si[w]);
        dst[blockIdx.x] = n_cols == 0 || row[0] != row[0] || bi == 0x7fffffff ? 0u : (u32)bi;
    }
}
