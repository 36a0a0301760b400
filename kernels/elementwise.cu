// Elementwise and row-wise ops. Rounding follows the CPU backend (src/backend/cpu/mod.rs) where it is
// visible in the logits: RMS norm sums squares in f64 and scales before the weight; RoPE angles come
// from ggml's running product; GELU goes through f16 like ggml's table.

// RMS norm of n_rows rows of row_len; one block per row. w may be null.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, int row_len, float eps,
                                    float* __restrict__ out) {
    const long long r = blockIdx.x;
    const float* xr = x + r * row_len;
    float* o = out + r * row_len;
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
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
        const float v = xr[i] * scale;
        o[i] = w ? v * w[i] : v;
    }
}

// RoPE in place on x [n_tok x n_heads x head_dim]; one thread per (token, head, pair).
// mode 0: NORM (adjacent pairs), 1: NEOX (half split). ff: n_rot/2 frequency divisors or null.
extern "C" __global__ void rope(float* __restrict__ x, const u32* __restrict__ pos, int n_tok, int n_heads, int head_dim,
                                int n_rot, int mode, float theta_scale, float freq_scale, const float* __restrict__ ff) {
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

// gate = act(gate) * up; act 0: SiLU, 1: GELU (tanh) through f16 like ggml's table.
extern "C" __global__ void glu(float* __restrict__ g, const float* __restrict__ u, long long n, int act) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = g[i], y = u[i];
    if (act == 0) {
        g[i] = x / (1.0f + exp_cr(-x)) * y;
    } else if (x <= -10.0f) {
        g[i] = 0.0f;
    } else if (x >= 10.0f) {
        g[i] = x * y;
    } else {
        g[i] = f16_round(gelu_tanh(f16_round(x))) * y;
    }
}

extern "C" __global__ void add(float* __restrict__ x, const float* __restrict__ y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void scale(float* __restrict__ x, float s, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// x [n x len] += bias [len]
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ b, int len, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += b[i % len];
}

// out[i] = src row rows[i]
extern "C" __global__ void get_rows(const float* __restrict__ src, int row_len, const u32* __restrict__ rows, int n,
                                    float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * row_len) return;
    const int r = (int)(i / row_len), c = (int)(i % row_len);
    out[i] = src[(long long)rows[r] * row_len + c];
}

// K and V rows of n_tok tokens (width = n_kv_heads * head_dim) to f16 slots of the pools.
extern "C" __global__ void kv_write(u16* __restrict__ kc, u16* __restrict__ vc, const float* __restrict__ k,
                                    const float* __restrict__ v, const u32* __restrict__ slots, int n_tok, int width) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_tok * width) return;
    const int t = (int)(i / width), c = (int)(i % width);
    const long long dst = (long long)slots[t] * width + c;
    kc[dst] = f2h(k[i]);
    vc[dst] = f2h(v[i]);
}

// Copy-on-write: block src to block dst, K and V (n = block_size * width f16 elements per block).
extern "C" __global__ void kv_copy_blocks(u16* __restrict__ kc, u16* __restrict__ vc, u32 src, u32 dst, long long n) {
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
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * width) return;
    const int m = (int)(i / width), c = (int)(i % width);
    const long long src = (long long)moves[2 * m] * width + c;
    tmp[i] = kc[src];
    tmp[(long long)n * width + i] = vc[src];
}

extern "C" __global__ void kv_scatter(u16* __restrict__ kc, u16* __restrict__ vc, const u32* __restrict__ moves, int n,
                                      int width, const u16* __restrict__ tmp) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * width) return;
    const int m = (int)(i / width), c = (int)(i % width);
    const long long dst = (long long)moves[2 * m + 1] * width + c;
    kc[dst] = tmp[i];
    vc[dst] = tmp[(long long)n * width + i];
}
