// Shared helpers for pagellm's CUDA kernels. The Rust side prepends this file to every kernel source,
// so no header search path is needed (NVRTC compiles one string). No CUDA headers are used: f16 is
// handled as raw bits through PTX conversions, which round to nearest even like the `half` crate.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Programmatic dependent launch (sm_90+; a no-op before): a kernel launched with the
// programmatic-serialization attribute may start while the previous kernel of the stream is finishing.
// pdl_enter() waits until that kernel has completed and its writes are visible (nothing a kernel reads
// or writes through its arguments may be touched before it, only the weights, which no kernel writes, and
// host lists uploaded before the previous kernel's launch: attn_merge's rows), then lets the next kernel
// start early in turn. Every kernel calls it, so every launch may carry the attribute (CudaBackend::pdl).
// A kernel whose every block may return before it must not be launched: the next kernel would then wait
// only for that kernel, not for the one before.
__device__ __forceinline__ void pdl_enter() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 for the 128-byte line at p (no register is loaded).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// f32 -> nearest f16 -> f32.
__device__ __forceinline__ float f16_round(float f) { return h2f(f2h(f)); }

// Where element d of a K row (one token, one KV head of head_dim hd) lies in the pool: in the order the
// attention's q . k lanes read it (kernels/attention.cu), so a lane's elements are whole 16-byte pieces.
// hd 64 / 128: 8 lanes per key, lane j8 runs the elements d = j8 + 8 mq + 32 e as its i = 4 e + mq; piece
// i / 8 of every lane lies together (8 lanes x 16 bytes: one shared-memory wavefront). hd a multiple of
// 256: 32 lanes per key, lane l's elements l + 32 e, e = 0..7 of each piece. Other head dims: in order.
__device__ __forceinline__ int kpos(int d, int hd) {
    if (hd == 64 || hd == 128) {
        const int i = 4 * (d >> 5) + ((d >> 3) & 3);
        return (i >> 3) * 64 + (d & 7) * 8 + (i & 7);
    }
    if (hd % 256 == 0) {
        const int e = d >> 5;
        return (e >> 3) * 256 + (d & 31) * 8 + (e & 7);
    }
    return d;
}

// Little-endian loads from blocks that are only 2-byte aligned (GGML block sizes 18, 22, 34, 210).
__device__ __forceinline__ u16 ld_u16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ int ld_i32_b2(const u8* p) {
    const u16* q = (const u16*)p;
    return (int)((u32)q[0] | ((u32)q[1] << 16));
}
__device__ __forceinline__ int ld_i32_b4(const u8* p) { return *(const int*)p; }
// 8 little-endian words from p (2-byte aligned, and p + 34 inside the allocation when p is not 4-byte
// aligned): 8 or 9 aligned loads instead of 16 halves.
__device__ __forceinline__ void ld8_b2(const u8* p, int w[8]) {
    const u32* a = (const u32*)((size_t)p & ~(size_t)3);
    if (((size_t)p & 2) == 0) {
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = (int)a[i];
    } else {
        u32 v[9];
#pragma unroll
        for (int i = 0; i < 9; i++) v[i] = a[i];
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = (int)__byte_perm(v[i], v[i + 1], 0x5432);
    }
}

// The CPU backend's float dot-product order (src/backend/cpu/avx2.rs, dot_f16_ptr / dot_f32_ptr): 32
// running sums, sum c taking elements c, c + 32, ... by FMA in order, then
//     v[l] = (a[l] + a[8 + l]) + (a[16 + l] + a[24 + l])                  l = 0..7
//     s    = ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))          (hsum_ps)
// Lane c holds a[c]; every lane gets s. The kernels are compiled with --fmad=false, so a float
// expression rounds as the same Rust expression does, and FMA appears only where written (fmaf).
// cpu_tree_sum's s in lane 0 only (the other lanes hold partial sums): one shuffle fewer.
__device__ __forceinline__ float cpu_tree_sum0(float a) {
    const float t1 = a + __shfl_down_sync(0xffffffffu, a, 8);
    const float v = t1 + __shfl_down_sync(0xffffffffu, t1, 16);
    const float w = v + __shfl_down_sync(0xffffffffu, v, 4);
    const float x = w + __shfl_down_sync(0xffffffffu, w, 2);
    return x + __shfl_down_sync(0xffffffffu, x, 1);
}
__device__ __forceinline__ float cpu_tree_sum(float a) { return __shfl_sync(0xffffffffu, cpu_tree_sum0(a), 0); }

// exp, cos, sin of an f32 as glibc's expf/cosf/sinf (what Rust's f32 methods call) give them: through
// f64, so the result is the correctly rounded one, which glibc returns in all but rare cases.
__device__ __forceinline__ float exp_cr(float x) { return (float)exp((double)x); }
__device__ __forceinline__ float cos_cr(float x) { return (float)cos((double)x); }
__device__ __forceinline__ float sin_cr(float x) { return (float)sin((double)x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
