// Paged attention over f16 K/V pools, for decode and prefill alike (flash-decoding style), computing the
// CPU backend's function (src/backend/cpu/attention.rs) up to f32 summation order:
//
// pool (K, and V alike)  [num_slots x n_kv_heads x head_dim] f16,  slot = block_id * block_size + offset;
//                        a K row's head_dim elements in kpos's order (common.cuh: the q . k lanes' pieces)
// rows[ATT_ROW t ..]     query row t (fields AR_*, filled by the host): its entry e in its sequence's table;
//                        it sees the live entries j in lo ..= e (lo: the first entry inside the window,
//                        by original position under a KV budget view; the host computes it as the CPU does)
// splits                 [lo, lo + S) [lo + S, lo + 2S) ... [.., e], S = ATT_SPLIT (the CPU's SPLIT_TOKENS),
//                        counted over entries, live or not
// live                   u64 masks, one per table block of a sequence under a view: bit o = entry
//                        block * block_size + o is live. A split's live entries are compacted in entry
//                        order (the CPU's kv_rows), so its sums run over exactly the CPU's keys in its
//                        order; a split with no live entry writes (m, l) = (-inf, 0) and is skipped by the
//                        merge. Without a view every entry is live.
//
// grid (query row, kv head x chunk of up to G query heads of its group, split). A CTA reads each K/V
// row once for all its query heads (GQA), in three phases over its split (at most ATT_SPLIT keys):
//   1. s_j = scale * (f16(q) . k_j), kept in shared memory; the split's max m;
//   2. e_j = exp(s_j - m), l = sum e_j in f64; weights w_j = f16(e_j * f32(1/l)) (ggml's f16 weights);
//   3. o = sum_j w_j v_j.
// A row with one split writes o; otherwise (o, m, l) per split, folded left in split order by attn_merge
// with the CPU's log-sum-exp weights (part_ml per split: m as f32, then l as f64 at float offset 2).
// Every float operation follows the CPU's order: q . k one warp per key in dot_f16's order
// (cpu_tree_sum), o one thread per (head, dim) accumulating keys in order by FMA (axpy_f16).
//
// Probabilities (rows with AR_WANT, KvView::score_offset): each split also stores its weights normalized
// within the split, before their f16 rounding, at wsc[AR_W + h * ctx + e]; attn_merge stores each split's
// share frac = l_s exp(m_s - M) / L of the merged softmax at part_ml float offset 1, and attn_scores sums
// frac * w over the group's heads and the sequence's rows in the CPU's order (add_probs).

// Fields of a query row in `rows` (ints).
#define ATT_ROW 8
#define AR_BT 0     // offset of its sequence's block table in bt; -1: the row belongs to no sequence
#define AR_ENTRY 1  // its entry e (the last key it may see)
#define AR_LO 2     // the first entry inside its window
#define AR_LIVE 3   // offset of its sequence's masks in live; -1: no view, every entry live
#define AR_CTX 4    // its sequence's ctx_len (the layout of its weights in wsc)
#define AR_W 5      // with AR_WANT: offset of its weights [n_heads x ctx] in wsc, low and high 32 bits
#define AR_WANT 7   // 1: its sequence wants its probabilities

#define ATT_SPLIT 512

// 16 bytes global -> shared without registers (cp.async, sm_80+), and its group fences. Below sm_80 (the
// host does not pick the ASYNC kernels there, but the module must build): a plain copy, already complete.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
#else
    const uint4 v = *(const uint4*)src;
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// 8 f16 values (16 aligned bytes) to floats
__device__ __forceinline__ void load8_f16(const u16* p, float f[8]) {
    const uint4 a = *(const uint4*)p;
    const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = h2f((u16)(w[i] & 0xffff));
        f[2 * i + 1] = h2f((u16)(w[i] >> 16));
    }
}

template <int HD, int G, int WARPS, int CH, bool ASYNC>
__device__ __forceinline__ void attn_body(const float* __restrict__ q, const u16* __restrict__ kc,
                                          const u16* __restrict__ vc, const int* __restrict__ rows,
                                          const u32* __restrict__ bt, const u64* __restrict__ live, int n_heads,
                                          int n_kv, int block_size, float scale, int n_splits, float* __restrict__ out,
                                          float* __restrict__ part_o, float* __restrict__ part_ml,
                                          float* __restrict__ wsc) {
    const int t = blockIdx.x;
    const int group = n_heads / n_kv;
    const int n_hc = (group + G - 1) / G;
    const int g = blockIdx.y / n_hc, hc = blockIdx.y % n_hc;
    const int h0 = g * group + hc * G;
    const int nh = min(G, group - hc * G);
    const int split = blockIdx.z;
    const int* row = rows + ATT_ROW * t;
    // Before pdl_enter only the host's lists (rows, bt, live: copied in stream order before this launch) are
    // read: the row and the split's slots are found while the previous kernel finishes. A block with
    // nothing to do waits too before it returns (no launch may have every block return before the wait).
    const int bt_off = row[AR_BT];
    if (bt_off < 0) {
        pdl_enter();
        return;
    }
    const int entry = row[AR_ENTRY], lo = row[AR_LO], live_off = row[AR_LIVE];
    const int row_splits = (entry + 1 - lo + ATT_SPLIT - 1) / ATT_SPLIT;
    if (split >= row_splits) {
        pdl_enter();
        return;
    }
    const int k_begin = lo + split * ATT_SPLIT, k_end = min(entry + 1, k_begin + ATT_SPLIT);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    __shared__ float sc[G][ATT_SPLIT];
    __shared__ float sm_red[WARPS][G];
    __shared__ double sm_sum[WARPS][G];

    constexpr int QPL = HD / 32;  // q . k terms per lane
    // the slots of the split's live keys in entry order (and, under a view, their entries)
    __shared__ u32 sslot[ATT_SPLIT];
    __shared__ u32 sent[ATT_SPLIT];
    int n = k_end - k_begin;
    if (live_off < 0) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const int j = k_begin + i;
            sslot[i] = bt[bt_off + j / block_size] * (u32)block_size + (u32)(j % block_size);
        }
    } else {
        __shared__ int s_cnt[WARPS];
        int base = 0;
        for (int i0 = 0; i0 < n; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x, j = k_begin + i;
            const bool on = i < n && ((live[live_off + j / block_size] >> (j % block_size)) & 1ull);
            const u32 ballot = __ballot_sync(0xffffffffu, on);
            if (lane == 0) s_cnt[warp] = __popc(ballot);
            __syncthreads();
            int before = base + __popc(ballot & ((1u << lane) - 1u)), total = base;
#pragma unroll
            for (int w = 0; w < WARPS; w++) {
                before += w < warp ? s_cnt[w] : 0;
                total += s_cnt[w];
            }
            if (on) {
                sslot[before] = bt[bt_off + j / block_size] * (u32)block_size + (u32)(j % block_size);
                sent[before] = (u32)j;
            }
            base = total;
            __syncthreads();
        }
        n = base;
    }
    pdl_enter();  // q, the pool and the outputs from here on
    if (n == 0) {  // an entirely dead split: nothing to add (the CPU's partial returns false)
        if (row_splits > 1 && (int)threadIdx.x < nh) {
            float* ml = part_ml + (((long long)t * n_heads + h0 + threadIdx.x) * n_splits + split) * 4;
            ml[0] = NEG_INF;
            ml[1] = 0.0f;
            *(double*)(ml + 2) = 0.0;
        }
        return;
    }
    // The CPU's dot_f16 order (cpu_tree_sum): 32 FMA chains a_c over elements c, c + 32, ..., then
    //   v_j = (a_j + a_{j+8}) + (a_{j+16} + a_{j+24}),  w_j = v_j + v_{j+4},  x_j = w_j + w_{j+2},  s = x_0 + x_1.
    // Head dims up to 128 (QUAD): 8 lanes per key, 4 keys per warp step; lane j of a key runs the chains
    // j, j+8, j+16, j+24 and v_j in registers, then 3 shuffles inside its 8 lanes (the same float
    // operations, 4 keys per instruction). The G heads' trees share those shuffles: at each step a lane keeps
    // half of the heads it still holds (the lower half where its step bit is clear) and sends the other half
    // to its partner (lane xor the step), which adds it to its own: w_j = v_j + v_{j+4} is computed by lane j
    // or j + 4 (a + b == b + a exactly), so the sums are the same, with G / 2 + G / 4 + ... shuffles instead of
    // 3 G. Lane j of a quad ends holding the score of head qhead(j) (its steps' bits), the same in the lanes
    // that differ only in the bits of steps left unsplit (qmask). Larger heads: one warp per key, lane c
    // running chain c.
    constexpr bool QUAD = HD <= 128;
    static_assert(QUAD ? HD == 64 || HD == 128 : HD % 256 == 0, "attention: head dims kpos lays out");
    static_assert(!QUAD || (G & (G - 1)) == 0, "attention: heads per CTA a power of two");
    constexpr int QR = QUAD ? 4 * QPL : QPL;  // q values per lane and head
    const int j8 = lane & 7;
    // QUAD: the head whose score lane j8 ends with, and the bits of the steps left unsplit (the tree above)
    int qhead = 0, qmask = 0;
    {
        int held = G;
#pragma unroll
        for (int o = 4; o >= 1; o >>= 1)
            if (held >= 2) {
                held /= 2;
                if (j8 & o) qhead += held;
            } else {
                qmask |= o;
            }
    }
    float qr[G][QR];
#pragma unroll
    for (int hh = 0; hh < G; hh++)
#pragma unroll
        for (int i = 0; i < QR; i++) {
            // QUAD: i = 4e + mq holds element j8 + 8 mq + 32 e; else element lane + 32 i
            const int el = QUAD ? j8 + 8 * (i % 4) + 32 * (i / 4) : lane + 32 * i;
            qr[hh][i] = hh < nh ? f16_round(q[((long long)t * n_heads + h0 + hh) * HD + el]) : 0.0f;
        }
    __syncthreads();

    // K (then V) rows of the split staged through shared memory CH keys at a time, double-buffered
    // through registers (or, ASYNC, through two shared buffers filled by cp.async: fewer instructions and
    // registers a piece): the 16-byte loads of the next chunk are in flight while this one is computed
    constexpr int NT = WARPS * 32;
    constexpr int VPR = HD / 8;         // 16-byte pieces per row
    constexpr int PER = CH * VPR / NT;  // pieces per thread per chunk
    constexpr int RPP = NT / VPR;       // rows a pass of the CTA's threads covers
    static_assert(NT % VPR == 0 && CH % RPP == 0, "attention: staging passes");
    // row stride in kvs: unpadded. q . k reads 16-byte pieces of kpos's layout, 8 lanes on 128 contiguous
    // bytes; the weighted sum reads 32 lanes' 2-byte values of one row; staging writes whole rows
    constexpr int KS = HD;
    // ASYNC: two chunk buffers filled by cp.async (the next chunk lands while this one is computed); else
    // one, the next chunk waiting in registers
    constexpr int NBUF = ASYNC ? 2 : 1;
    __shared__ __align__(16) u16 kvs_all[NBUF][CH * KS];
    const u16* kvs = kvs_all[0];
    // a thread's pieces: column pcol of rows prow + RPP j; its addresses are the slot's row times the pool's
    // row stride (one 32 x 32 -> 64-bit multiply a piece) past a base fixed for the CTA
    const int prow = threadIdx.x / VPR, pcol = threadIdx.x % VPR;
    const u32 row_bytes = (u32)(n_kv * HD * 2);
    const u32 poff = (u32)((g * HD + 8 * pcol) * 2);  // byte offset of the thread's piece in a slot's row
    uint4* const sdst = (uint4*)kvs_all[0] + prow * (KS / 8) + pcol;
    uint4 tmp[PER];
    auto fetch = [&](const char* __restrict__ base, int c0) {
        const int nk = min(CH, n - c0);
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int r = prow + RPP * j;
            if (r < nk) tmp[j] = *(const uint4*)(base + (u64)sslot[c0 + r] * row_bytes);
        }
    };
    // ASYNC: chunk c0 of base into buffer b, one cp.async group (every thread commits, loads or not); the
    // shared addresses as 32-bit values (one add a piece)
    const u32 sdst_async = (u32)__cvta_generic_to_shared(kvs_all[0] + prow * KS + 8 * pcol);
    auto issue = [&](const char* __restrict__ base, int c0, int b) {
        const int nk = min(CH, n - c0);
        const u32* __restrict__ sl = sslot + c0 + prow;
        const u32 dst = sdst_async + (u32)(b * CH * KS * 2);
#pragma unroll
        for (int j = 0; j < PER; j++)
            if (prow + RPP * j < nk) cp_async16(dst + RPP * j * KS * 2, base + (u64)sl[RPP * j] * row_bytes);
        cp_async_commit();
    };
    // the fetched chunk into kvs (the caller syncs before: kvs is free; and after: kvs is complete)
    auto put = [&](int nk) {
#pragma unroll
        for (int j = 0; j < PER; j++)
            if (prow + RPP * j < nk) sdst[RPP * j * (KS / 8)] = tmp[j];
    };
    int chunk = 0;  // ASYNC: chunks so far, K's then V's (the buffer of chunk i is i & 1)
    // A step's start: its chunk (nk keys) ready in kvs for every thread, the next one (next_c0 of next;
    // none when next is null) on its way. ASYNC: into the other buffer, read last in the previous step
    // (whose trailing barrier the caller runs); an empty group when there is none, so wait<1> still means
    // "this chunk landed".
    auto begin_chunk = [&](int nk, const char* __restrict__ next, int next_c0) {
        if constexpr (ASYNC) {
            if (next) issue(next, next_c0, (chunk + 1) & 1);
            else cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            kvs = kvs_all[chunk & 1];
        } else {
            __syncthreads();
            put(nk);
            __syncthreads();
            if (next) fetch(next, next_c0);
        }
    };

    // 1. s_j = scale * (q . k_j), one warp per key, in the CPU's dot_f16 order; the split's max
    float m[G];
#pragma unroll
    for (int hh = 0; hh < G; hh++) m[hh] = NEG_INF;
    float ml = NEG_INF;  // QUAD: the max of head qhead's scores this lane kept
    const char* __restrict__ kbase = (const char*)kc + poff;
    const char* __restrict__ vbase = (const char*)vc + poff;
    if constexpr (ASYNC) issue(kbase, 0, 0);
    else fetch(kbase, 0);
    for (int c0 = 0; c0 < n; c0 += CH, chunk++) {
        const int nk = min(CH, n - c0);
        // after the last K chunk, V's first: in flight during the softmax
        begin_chunk(nk, c0 + CH < n ? kbase : vbase, c0 + CH < n ? c0 + CH : 0);
        if constexpr (QUAD) {
            // every lane of the warp takes part in the shuffles: a warp runs whole quads. A quad's keys past
            // nk (a last chunk's) read rows of kvs the chunk did not fill (still inside kvs: CH is a multiple
            // of 4): their sums are never stored or compared, so their loads need no check
            for (int ub = 4 * warp; ub < nk; ub += 4 * WARPS) {
                const int u = ub + (lane >> 3);
                float kf[QR];  // the lane's elements i = 4 e + mq, 16 bytes at a time (kpos)
#pragma unroll
                for (int p = 0; p < QR / 8; p++) load8_f16(kvs + u * KS + 64 * p + 8 * j8, kf + 8 * p);
                float cur[G];  // v_j, then w, x, s of the heads the lane still holds
#pragma unroll
                for (int hh = 0; hh < G; hh++) {
                    float a[4];
#pragma unroll
                    for (int mq = 0; mq < 4; mq++) {
                        a[mq] = 0.0f;
#pragma unroll
                        for (int e = 0; e < QPL; e++) a[mq] = fmaf(kf[4 * e + mq], qr[hh][4 * e + mq], a[mq]);
                    }
                    cur[hh] = (a[0] + a[1]) + (a[2] + a[3]);
                }
                int held = G;
#pragma unroll
                for (int o = 4; o >= 1; o >>= 1) {
                    if (held >= 2) {
                        held /= 2;
                        const bool up = j8 & o;
#pragma unroll
                        for (int i = 0; i < G / 2; i++) {
                            if (i >= held) break;
                            const float give = up ? cur[i] : cur[held + i], mine = up ? cur[held + i] : cur[i];
                            cur[i] = mine + __shfl_xor_sync(0xffffffffu, give, o);
                        }
                    } else {
                        cur[0] = cur[0] + __shfl_xor_sync(0xffffffffu, cur[0], o);
                    }
                }
                const float sv = cur[0] * scale;
                const bool keep = u < nk && (j8 & qmask) == 0;
                ml = fmaxf(ml, keep ? sv : NEG_INF);
                if (keep) sc[qhead][c0 + u] = sv;
            }
        } else {
            for (int u = warp; u < nk; u += WARPS) {
                float kf[QPL];  // the lane's elements lane + 32 e, 16 bytes at a time (kpos)
#pragma unroll
                for (int p = 0; p < QPL / 8; p++) load8_f16(kvs + u * KS + 256 * p + 8 * lane, kf + 8 * p);
#pragma unroll
                for (int hh = 0; hh < G; hh++) {
                    float a = 0.0f;
#pragma unroll
                    for (int e = 0; e < QPL; e++) a = fmaf(kf[e], qr[hh][e], a);
                    const float s = cpu_tree_sum0(a) * scale;  // lane 0's is the score; its m is the one kept
                    m[hh] = fmaxf(m[hh], s);
                    if (lane == 0) sc[hh][c0 + u] = s;
                }
            }
        }
        if constexpr (ASYNC) __syncthreads();  // the buffer is refilled next step
    }
    // QUAD: the maxima of the warp's 4 key lanes (j8, j8 + 8, j8 + 16, j8 + 24) into lane j8 (max is exact in
    // any order); lane j8 < 8 with (j8 & qmask) == 0 holds head qhead's
    if constexpr (QUAD) {
        ml = fmaxf(ml, __shfl_down_sync(0xffffffffu, ml, 16));
        ml = fmaxf(ml, __shfl_down_sync(0xffffffffu, ml, 8));
    }
    if constexpr (QUAD) {
        if (lane < 8 && (lane & qmask) == 0) sm_red[warp][qhead] = ml;
    } else if (lane == 0) {
#pragma unroll
        for (int hh = 0; hh < G; hh++) sm_red[warp][hh] = m[hh];
    }
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < G; hh++) {
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, sm_red[w][hh]);
        m[hh] = M;
    }

    // 2. exp, the f64 sum, the f16 weights (kept unrounded in wsc when the row wants its probabilities)
    const bool want = row[AR_WANT] == 1;
    const int ctx = row[AR_CTX];
    float* wrow = want ? wsc + ((long long)(u32)row[AR_W] | ((long long)row[AR_W + 1] << 32)) : wsc;
    double l[G];
#pragma unroll
    for (int hh = 0; hh < G; hh++) {
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
    for (int hh = 0; hh < G; hh++) {
        double s = 0.0;
#pragma unroll
        for (int w = 0; w < WARPS; w++) s += sm_sum[w][hh];
        l[hh] = s;
        const float inv = (float)(1.0 / s);
        if (want && hh < nh) {
            float* wh = wrow + (long long)(h0 + hh) * ctx;
            for (int i = threadIdx.x; i < n; i += blockDim.x) wh[sent[i]] = sc[hh][i] * inv;
        }
        for (int i = threadIdx.x; i < n; i += blockDim.x) sc[hh][i] = f16_round(sc[hh][i] * inv);
    }
    __syncthreads();

    // 3. o = sum_j w_j v_j: one thread per (dim, HPT heads of the chunk): HPT independent chains, keys
    //    in order by FMA (the CPU's axpy_f16)
    constexpr int HPT = G * HD / NT;  // hd64: 1, hd128: 2, hd256: 4
    static_assert(HPT >= 1 && G % HPT == 0 && NT % HD == 0, "attention: threads per (head, dim)");
    const int d = threadIdx.x % HD, hb = (threadIdx.x / HD) * HPT;
    float o[HPT];
#pragma unroll
    for (int k = 0; k < HPT; k++) o[k] = 0.0f;
    for (int c0 = 0; c0 < n; c0 += CH, chunk++) {
        const int nk = min(CH, n - c0);
        begin_chunk(nk, c0 + CH < n ? vbase : nullptr, c0 + CH);
        if (nk == CH) {  // a whole chunk: 4 keys' values and weights (one 16-byte load a head) per step
#pragma unroll 4
            for (int u = 0; u < CH; u += 4) {
                float v[4];
#pragma unroll
                for (int j = 0; j < 4; j++) v[j] = h2f(kvs[(u + j) * KS + d]);
#pragma unroll
                for (int k = 0; k < HPT; k++) {
                    const float4 w = *(const float4*)&sc[hb + k][c0 + u];
                    o[k] = fmaf(w.x, v[0], o[k]);
                    o[k] = fmaf(w.y, v[1], o[k]);
                    o[k] = fmaf(w.z, v[2], o[k]);
                    o[k] = fmaf(w.w, v[3], o[k]);
                }
            }
        } else {
            for (int u = 0; u < nk; u++) {
                const float v = h2f(kvs[u * KS + d]);
#pragma unroll
                for (int k = 0; k < HPT; k++) o[k] = fmaf(sc[hb + k][c0 + u], v, o[k]);
            }
        }
        if constexpr (ASYNC) __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < HPT; k++) {
        const int hh = hb + k;
        if (hh >= nh) break;
        const long long th = (long long)t * n_heads + h0 + hh;
        if (row_splits == 1) {
            out[th * HD + d] = o[k];
        } else {
            part_o[(th * n_splits + split) * HD + d] = o[k];
            if (d == 0) {
                float* ml = part_ml + (th * n_splits + split) * 4;
#pragma unroll
                for (int h2 = 0; h2 < G; h2++) {  // constant indices: m and l stay in registers
                    if (h2 != hh) continue;
                    ml[0] = m[h2];
                    ml[1] = 0.0f;
                    *(double*)(ml + 2) = l[h2];
                }
            }
        }
    }
}

// NAME: head dim HD, G query heads per CTA, WARPS warps (CudaBackend's threads for NAME), CH keys per
// staged chunk (the loads in flight per CTA), ASYNC: staged by cp.async (sm_80+) instead of registers
#define ATTN(NAME, HD, G, WARPS, CH, ASYNC)                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 16 / WARPS) NAME(                                     \
        const float* q, const u16* kc, const u16* vc, const int* rows, const u32* bt, const u64* live,             \
        int n_heads, int n_kv, int block_size, float scale, int n_splits, float* out, float* part_o, float* part_ml, \
        float* wsc) {                                                                                              \
        attn_body<HD, G, WARPS, CH, ASYNC>(q, kc, vc, rows, bt, live, n_heads, n_kv, block_size, scale, n_splits, \
                                           out, part_o, part_ml, wsc);                                             \
    }
ATTN(attn_hd64, 64, 4, 8, 64, false)
ATTN(attn_hd128, 128, 4, 8, 64, false)
ATTN(attn_hd256, 256, 4, 8, 64, false)
// variants for head dim 128, picked by PAGELLM_CUDA_ATTN (measured against each other on the GPU)
ATTN(attn_hd128_g2c64, 128, 2, 8, 64, false)
ATTN(attn_hd128_w16, 128, 4, 16, 64, false)
ATTN(attn_hd128_g2c128, 128, 2, 8, 128, false)
ATTN(attn_hd128_a4c64, 128, 4, 4, 64, true)

// The splits of a row folded left in order, as the CPU's `merge`: one block of head_dim threads per
// (query row, head); rows with one split were written by the attention kernel. Splits with no live key
// (l = 0) are skipped; a row with none at all is left alone, as the CPU leaves it. For a row that wants
// its probabilities, each split's share of the merged softmax is then stored at part_ml offset 1.
//
// The fold's float operations are the CPU's, in its order, but only what differs per dimension runs
// serially in every thread. Per chunk of MERGE_CH splits: the splits' (m, l) staged in shared memory;
// warp 0 marks the first live split and takes the running max before and after each live split (a
// max-scan: max is exact in any order, and a split's max is never NaN: the attention kernel folds its
// scores with fmaxf from -inf); all threads take the f64 exps side by side; thread 0 runs the weight
// chain wa = L e1, L <- wa + wb (a multiply and an add a split); all threads divide; then each dimension
// folds o <- o fa + po fb, its partial outputs loaded 8 splits ahead. (Every thread running the whole
// chain, f64 exps and global loads included, cost ~4% of a decode step at 4096 keys on the H200; merging
// in the attention kernel's last CTA instead was slower: bench/GPU_NOTES.md call 70.) With qact 1 the merged
// rows are also written as Q8 blocks (q8_store), so the product reading them needs no quantize_q8 launch.
#define MERGE_CH 128
extern "C" __global__ void attn_merge(const float* __restrict__ part_o, float* __restrict__ part_ml,
                                      const int* __restrict__ rows, int n_heads, int head_dim, int n_splits,
                                      float* __restrict__ out, i8* __restrict__ qa, float* __restrict__ da,
                                      int* __restrict__ sa, float* __restrict__ ss, int qact) {
    // `rows` before the wait: the host uploaded it before the attention launch this merge follows, so
    // it is complete even while that kernel runs (only part_o and part_ml are its outputs). Blocks of
    // one-split rows return without waiting; the host launches the merge only when some row has more
    // splits (n_splits is the maximum over the rows), so some block waits and the next kernel, waiting
    // for this one, also waits for the attention.
    const long long th = blockIdx.x;
    const int t = (int)(th / n_heads), d = threadIdx.x, lane = d & 31;
    const int* row = rows + ATT_ROW * t;
    if (row[AR_BT] < 0) return;
    const int row_splits = (row[AR_ENTRY] + 1 - row[AR_LO] + ATT_SPLIT - 1) / ATT_SPLIT;
    if (row_splits <= 1) return;
    const bool want = row[AR_WANT] == 1;
    pdl_enter();
    float* ml = part_ml + th * n_splits * 4;
    const float* po = part_o + th * n_splits * head_dim;
    __shared__ signed char kind[MERGE_CH];  // 0: no live key, skipped; 1: the first live split; 2: folded in
    __shared__ float mb[MERGE_CH], mprev[MERGE_CH], mnew[MERGE_CH], fa[MERGE_CH], fb[MERGE_CH];
    __shared__ double lb[MERGE_CH], wa[MERGE_CH], wb[MERGE_CH], sum[MERGE_CH];
    __shared__ float run_m;
    __shared__ double run_l;
    __shared__ int started;
    if (d == 0) {
        run_m = NEG_INF;
        run_l = 0.0;
        started = 0;
    }
    float o = 0.0f;
    for (int c0 = 0; c0 < row_splits; c0 += MERGE_CH) {
        const int nc = min(MERGE_CH, row_splits - c0);
        for (int i = d; i < nc; i += blockDim.x) {
            const float* m = ml + 4 * (c0 + i);
            mb[i] = m[0];
            lb[i] = *(const double*)(m + 2);
        }
        __syncthreads();
        if (d < 32) {  // warp 0: kinds and the running max, 32 splits a step
            float M = run_m;
            int on = started;
            for (int b = 0; b < nc; b += 32) {
                const int i = b + lane;
                const bool live = i < nc && lb[i] != 0.0;
                const unsigned ball = __ballot_sync(0xffffffffu, live);
                // the first live split of the row starts the fold (its max starts the scan)
                const int first = on || ball == 0 ? -1 : __ffs(ball) - 1;
                const bool folded = live && lane != first;
                float x = folded || lane == first ? mb[i < nc ? i : 0] : NEG_INF;
#pragma unroll
                for (int off = 1; off < 32; off <<= 1) {
                    const float y = __shfl_up_sync(0xffffffffu, x, off);
                    if (lane >= off) x = fmaxf(y, x);
                }
                const float incl = fmaxf(M, x);  // the max over live splits up to i, with the carry
                const float below = __shfl_up_sync(0xffffffffu, x, 1);
                if (i < nc) {
                    kind[i] = lane == first ? 1 : folded ? 2 : 0;
                    mprev[i] = lane == 0 ? M : fmaxf(M, below);
                    mnew[i] = incl;
                }
                M = __shfl_sync(0xffffffffu, incl, 31);
                on = on || ball != 0;
            }
            if (d == 0) {
                run_m = M;
                started = on;
            }
        }
        __syncthreads();
        for (int i = d; i < nc; i += blockDim.x) {
            if (kind[i] != 2) continue;
            wa[i] = exp((double)(mprev[i] - mnew[i]));  // times the running l below
            wb[i] = lb[i] * exp((double)(mb[i] - mnew[i]));
        }
        __syncthreads();
        if (d == 0) {
            double L = run_l;
            for (int i = 0; i < nc; i++) {
                if (kind[i] == 1) {
                    L = lb[i];
                } else if (kind[i] == 2) {
                    const double a = L * wa[i];
                    wa[i] = a;
                    L = a + wb[i];
                    sum[i] = L;
                }
            }
            run_l = L;
        }
        __syncthreads();
        for (int i = d; i < nc; i += blockDim.x) {
            if (kind[i] != 2) continue;
            fa[i] = (float)(wa[i] / sum[i]);
            fb[i] = (float)(wb[i] / sum[i]);
        }
        __syncthreads();
        if (d < head_dim) {
            for (int i0 = 0; i0 < nc; i0 += 8) {
                float p[8];
#pragma unroll
                for (int k = 0; k < 8; k++) p[k] = i0 + k < nc ? po[(long long)(c0 + i0 + k) * head_dim + d] : 0.0f;
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const int i = i0 + k;
                    if (i >= nc) break;
                    if (kind[i] == 1) o = p[k];
                    else if (kind[i] == 2) o = o * fa[i] + p[k] * fb[i];
                }
            }
        }
        __syncthreads();  // the chunk's arrays are rewritten next
    }
    // qact 1: the output also quantized to Q8 blocks for the product that reads it next (its 32-dim
    // blocks lie inside a head: the host asks only when every row has splits to merge and head_dim is a
    // multiple of 32); a row left alone is quantized as it stands, as quantize_q8 would
    if (qact == 1) q8_store(started ? o : out[th * head_dim + d], (th * head_dim + d) / 32, qa, da, sa, ss);
    if (!started) return;
    if (d < head_dim) out[th * head_dim + d] = o;
    if (want) {
        const float M = run_m;
        const double L = run_l;
        for (int s = d; s < row_splits; s += blockDim.x) {
            const double ls = *(const double*)(ml + 4 * s + 2);
            if (ls > 0.0) ml[4 * s + 1] = (float)(ls * exp((double)(ml[4 * s] - M)) / L);
        }
    }
}

// The probabilities of a sequence under a view with a score offset (KvView::score_offset): one thread per
// (entry e, KV head g, such sequence z); dst[g * ctx + e] = sum over the sequence's rows in order of
// (sum over g's query heads in order of frac * w), 0 where no row sees e: the CPU's add_probs and its
// sum over rows, in the same order. Every element of dst is written (no zeroing needed).
// seqs[5 z ..]: first row, rows, ctx_len, offset of dst in scores (low and high 32 bits).
extern "C" __global__ void attn_scores(const int* __restrict__ rows, const int* __restrict__ seqs,
                                       const u64* __restrict__ live, const float* __restrict__ wsc,
                                       const float* __restrict__ part_ml, int n_heads, int n_kv, int block_size,
                                       int n_splits, float* __restrict__ scores) {
    pdl_enter();
    const int* sq = seqs + 5 * blockIdx.z;
    const int q_start = sq[0], n_q = sq[1], ctx = sq[2];
    const int e = blockIdx.x * blockDim.x + threadIdx.x, g = blockIdx.y;
    if (e >= ctx) return;
    const int group = n_heads / n_kv;
    float acc = 0.0f;
    for (int t = q_start; t < q_start + n_q; t++) {
        const int* row = rows + ATT_ROW * t;
        const int lo = row[AR_LO];
        if (e < lo || e > row[AR_ENTRY]) continue;
        if (!((live[row[AR_LIVE] + e / block_size] >> (e % block_size)) & 1ull)) continue;
        const int row_splits = (row[AR_ENTRY] + 1 - lo + ATT_SPLIT - 1) / ATT_SPLIT, s = (e - lo) / ATT_SPLIT;
        const float* w = wsc + ((long long)(u32)row[AR_W] | ((long long)row[AR_W + 1] << 32)) + e;
        float pr = 0.0f;
        for (int hh = 0; hh < group; hh++) {
            const int h = g * group + hh;
            const float frac = row_splits == 1 ? 1.0f : part_ml[(((long long)t * n_heads + h) * n_splits + s) * 4 + 1];
            pr += frac * w[(long long)h * ctx];
        }
        acc += pr;
    }
    scores[((long long)(u32)sq[3] | ((long long)sq[4] << 32)) + (long long)g * ctx + e] = acc;
}
