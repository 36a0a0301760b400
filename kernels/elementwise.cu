// Elementwise and row-wise ops. Rounding follows the CPU backend (src/backend/cpu/mod.rs) where it is
// visible in the logits: RMS norm sums squares in f64 and scales before the weight; RoPE angles come
// from ggml's running product; GELU goes through f16 like ggml's table.

// RMS norm of n_rows rows of row_len; one block per row. w may be null.
// The row's 1 / sqrt(mean(x^2) + eps) (every thread gets it).
__device__ __forceinline__ float rms_scale(const float* __restrict__ xr, int row_len, float eps) {
    double s = 0.0;
    for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
        const float v = xr[i];
        s += (double)(v * v);
    }
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
    const float mean = (float)(part[0] / (double)row_len);
    return 1.0f / sqrtf(mean + eps);
}

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, int row_len, float eps,
                                    float* __restrict__ out) {
    pdl_enter();
    const long long r = blockIdx.x;
    const float* xr = x + r * row_len;
    float* o = out + r * row_len;
    const float scale = rms_scale(xr, row_len, eps);
    for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
        const float v = xr[i] * scale;
        o[i] = w ? v * w[i] : v;
    }
}

// rms_norm, then its output quantized for the next product as `quantize_q8` (qact 1; row_len a multiple
// of 32: each warp holds whole blocks) or `quantize_q8k` (qact 2; row_len a multiple of 256: a warp per
// super-block) would: one launch instead of two, the same values.
extern "C" __global__ void rms_norm_q(const float* __restrict__ x, const float* __restrict__ w, int row_len, float eps,
                                      float* __restrict__ out, i8* __restrict__ qa, float* __restrict__ da,
                                      int* __restrict__ sa, float* __restrict__ ss, int qact) {
    pdl_enter();
    const long long r = blockIdx.x;
    const float* xr = x + r * row_len;
    float* o = out + r * row_len;
    const float scale = rms_scale(xr, row_len, eps);
    if (qact == 1) {
        for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
            const float v = xr[i] * scale;
            const float y = w ? v * w[i] : v;
            o[i] = y;
            q8_store(y, (r * row_len + i) / 32, qa, da, sa, ss);
        }
    } else {
        const int lane = threadIdx.x & 31;
        for (int sb = threadIdx.x >> 5; sb < row_len / 256; sb += blockDim.x >> 5) {
            float y[8];
            int q[8];
            float d;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const int i = sb * 256 + 8 * lane + k;
                const float v = xr[i] * scale;
                y[k] = w ? v * w[i] : v;
                o[i] = y[k];
            }
            q8k_vals(y, q, d);
            q8k_store(q, d, r * (row_len / 256) + sb, qa, da, sa, ss);
        }
    }
}

// RoPE in place on x [n_tok x n_heads x head_dim]; one thread per (token, head, pair).
// mode 0: NORM (adjacent pairs), 1: NEOX (half split). ff: n_rot/2 frequency divisors or null.
extern "C" __global__ void rope(float* __restrict__ x, const u32* __restrict__ pos, int n_tok, int n_heads, int head_dim,
                                int n_rot, int mode, float theta_scale, float freq_scale, const float* __restrict__ ff) {
    pdl_enter();
    const int half = n_rot / 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
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

// K and V rows of n_tok tokens (width = n_kv_heads * head_dim) to f16 slots of the pools.
extern "C" __global__ void kv_write(u16* __restrict__ kc, u16* __restrict__ vc, const float* __restrict__ k,
                                    const float* __restrict__ v, const u32* __restrict__ slots, int n_tok, int width) {
    pdl_enter();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_tok * width) return;
    const int t = (int)(i / width), c = (int)(i % width);
    const long long dst = (long long)slots[t] * width + c;
    kc[dst] = f2h(k[i]);
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
