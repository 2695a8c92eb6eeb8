// jei-edge fused exit kernel: one launch per stage boundary.
//
// For the n live rows of a batch after stage k it
//   1. applies the JEI-DNN exit rule  g >= (1 - S)/2 + delta  to the stage's gates in order
//      (mode 0; a merged stage holds several exits, and the earliest gate that fires wins, S
//      accumulating gate by gate exactly as in the unmerged model), or lets every row pass the
//      gates (mode 1, "full" runs), or sends every row to the stage's last exit (mode 2, the final
//      head); with final_head set, the rows no gate took leave at the stage's last exit (the final
//      head of a merged last stage) instead of surviving;
//   2. writes every exiting row's probabilities, class (first argmax), confidence (max prob) and
//      exit index to its ORIGINAL output slot idx_in[r];
//   3. compacts the survivors, in stable order, into the next stage's input buffers: hidden row
//      (row_bytes bytes, any dtype), running sum S + (its gates) and original index;
//   4. writes the survivor count to *survivors (a device pointer to mapped pinned host memory),
//      which the host reads after an event sync to set the next stage's input shape.
//
// Layout: block b owns rows [b * rows_per_block, min(n, (b + 1) * rows_per_block)). A row's
// destination is (#survivors before the block) + (#survivors before it inside the block): each
// block counts the survivors before its first row itself (a block reduction over at most n
// decisions), so a single launch needs no grid-wide synchronisation. The hidden-row copy is
// coalesced: all threads of a block copy one row together, 16 bytes per thread when aligned.
//
// Gate and probabilities are FP32: gate [n, num_gates], probs [n, num_exits, C] (a one-exit stage:
// [n], [n, C]). The running sum S and the threshold are FP64, as in the numpy reference
// (jei_edge.exit_rule) and the CPU runtime: with round-to-nearest operations (never contracted)
// every decision and every S is bit-identical to theirs for the same gate values. (A handful of
// FP64 operations per row costs nothing measurable, even on GPUs with slow FP64.)
// The decision (jei_decide) is __host__ __device__: tests/cuda/test_exit_decision.py compiles it
// for the host with nvcc and checks it against the numpy rule on a machine without a GPU.
// Self-contained on purpose: NVRTC compiles it without any include path.

#define JEI_BLOCK 256
#define JEI_WARPS (JEI_BLOCK / 32)
#define JEI_MAX_GATES 32  // gates one stage may hold (kernel.py MAX_GATES)

#ifdef __CUDA_ARCH__
#define JEI_DADD(x, y) __dadd_rn((x), (y))
#define JEI_DSUB(x, y) __dsub_rn((x), (y))
#define JEI_DMUL(x, y) __dmul_rn((x), (y))
#else  // host build of the decision (tests): plain IEEE double operations, compiled without contraction
#define JEI_DADD(x, y) ((x) + (y))
#define JEI_DSUB(x, y) ((x) - (y))
#define JEI_DMUL(x, y) ((x) * (y))
#endif

struct ExitArgs {
    const float* gate;                 // [n, num_gates] this stage's gates (modes 0, 1)
    const double* s_in;                // [n]          running gate sum before this stage's gates
    const int* idx_in;                 // [n]          original output slot of each live row
    const float* probs;                // [n, num_exits, C] this stage's exits' probabilities
    const unsigned char* hidden_in;    // [n, row]     this stage's hidden output (unless final_head/mode 2)
    double* s_out;                     // [n]          next stage's S (compacted)
    int* idx_out;                      // [n]          next stage's original slots (compacted)
    unsigned char* hidden_out;         // [n, row]     next stage's hidden input (compacted)
    float* out_probs;                  // [B, C]       results, in input order
    int* out_class;                    // [B]
    float* out_conf;                   // [B]
    int* out_exit;                     // [B]
    int* survivors;                    // [1]          mapped pinned host memory (device pointer)
    long long row_bytes;               // bytes of one hidden row (0 when nobody can survive)
    double deltas[JEI_MAX_GATES];      // threshold offset of each gate
    int n;                             // live rows
    int num_classes;                   // C
    int mode;                          // 0: exit rule, 1: no gate fires, 2: everybody takes the last exit
    int first_exit;                    // exit index of the stage's first exit (the others follow it)
    int num_gates;                     // gates of this stage (0..JEI_MAX_GATES)
    int num_exits;                     // exits of this stage (num_gates, or num_gates + 1 with a final head)
    int final_head;                    // 1: rows no gate takes leave at the last exit instead of surviving
    int rows_per_block;
};

// The host packs this struct with ctypes (jei_edge/runtime/cuda/kernel.py): keep both in step
// (tests/cuda/test_nvrtc.py compares the field list, types and offsets with the ctypes mirror).
static_assert(sizeof(ExitArgs) == 400, "ExitArgs size changed: update kernel.py");

// The exit slot (0..num_exits-1) row r takes in this stage, or -1 when it survives; *s_after gets
// its running sum after the gates it passed (what the next stage starts from).
__host__ __device__ __forceinline__ int jei_decide(const ExitArgs& a, int r, double* s_after) {
    double s = a.s_in ? a.s_in[r] : 0.0;
    if (a.mode == 2) {
        *s_after = s;
        return a.num_exits - 1;
    }
    const float* g = a.gate + (long long)r * a.num_gates;
    for (int j = 0; j < a.num_gates; ++j) {
        if (a.mode == 0) {
            const double thr = JEI_DADD(JEI_DMUL(JEI_DSUB(1.0, s), 0.5), a.deltas[j]);
            if ((double)g[j] >= thr) {  // a NaN gate never fires, as in numpy
                *s_after = s;
                return j;
            }
        }
        s = JEI_DADD(s, (double)g[j]);
    }
    *s_after = s;
    return a.final_head ? a.num_exits - 1 : -1;
}

__device__ __forceinline__ int jei_survives(const ExitArgs& a, int r) {
    double s;
    return jei_decide(a, r, &s) < 0;
}

__device__ __forceinline__ int jei_block_sum(int v, int* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < JEI_WARPS; ++w) total += red[w];
    return total;
}

// First index of the maximum of probs[0..C) (ties: lowest index, like numpy.argmax).
__device__ __forceinline__ void jei_block_argmax(const float* p, int C, float* rv, int* ri,
                                                 float* best_v, int* best_i) {
    float v = -3.402823466e38f;
    int i = 0x7fffffff;
    for (int c = threadIdx.x; c < C; c += JEI_BLOCK) {
        const float x = p[c];
        if (x > v || (x == v && c < i)) { v = x; i = c; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_down_sync(0xffffffffu, v, o);
        const int oi = __shfl_down_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { rv[warp] = v; ri[warp] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float bv = rv[0];
        int bi = ri[0];
        for (int w = 1; w < JEI_WARPS; ++w) {
            if (rv[w] > bv || (rv[w] == bv && ri[w] < bi)) { bv = rv[w]; bi = ri[w]; }
        }
        if (bi == 0x7fffffff) bi = 0;  // all-NaN row: numpy would pick the first NaN
        *best_v = p[bi];
        *best_i = bi;
    }
    __syncthreads();
}

__device__ __forceinline__ void jei_copy_row(const unsigned char* src, unsigned char* dst,
                                             long long nbytes) {
    const unsigned long long align =
        ((unsigned long long)src | (unsigned long long)dst | (unsigned long long)nbytes) & 15ull;
    if (align == 0) {
        const uint4* s = (const uint4*)src;
        uint4* d = (uint4*)dst;
        const long long m = nbytes >> 4;
        for (long long j = threadIdx.x; j < m; j += JEI_BLOCK) d[j] = s[j];
    } else if ((align & 3ull) == 0) {
        const unsigned int* s = (const unsigned int*)src;
        unsigned int* d = (unsigned int*)dst;
        const long long m = nbytes >> 2;
        for (long long j = threadIdx.x; j < m; j += JEI_BLOCK) d[j] = s[j];
    } else {
        for (long long j = threadIdx.x; j < nbytes; j += JEI_BLOCK) dst[j] = src[j];
    }
}

extern "C" __global__ void __launch_bounds__(JEI_BLOCK) jei_exit_compact(const ExitArgs a) {
    __shared__ int red[JEI_WARPS];
    __shared__ float arg_v[JEI_WARPS];
    __shared__ int arg_i[JEI_WARPS];
    __shared__ float best_v;
    __shared__ int best_i;

    const int r0 = blockIdx.x * a.rows_per_block;
    if (r0 >= a.n) return;  // block-uniform
    int r1 = r0 + a.rows_per_block;
    if (r1 > a.n) r1 = a.n;

    // Survivors before this block's first row.
    int mine = 0;
    for (int r = threadIdx.x; r < r0; r += JEI_BLOCK) mine += jei_survives(a, r);
    const int before = jei_block_sum(mine, red);

    int kept = 0;
    for (int r = r0; r < r1; ++r) {
        double s;
        const int j = jei_decide(a, r, &s);  // block-uniform
        if (j < 0) {
            const int d = before + kept;
            ++kept;
            jei_copy_row(a.hidden_in + (long long)r * a.row_bytes,
                         a.hidden_out + (long long)d * a.row_bytes, a.row_bytes);
            if (threadIdx.x == 0) {
                a.s_out[d] = s;
                a.idx_out[d] = a.idx_in[r];
            }
        } else {
            const int slot = a.idx_in[r];
            const float* p = a.probs + ((long long)r * a.num_exits + j) * a.num_classes;
            float* q = a.out_probs + (long long)slot * a.num_classes;
            for (int c = threadIdx.x; c < a.num_classes; c += JEI_BLOCK) q[c] = p[c];
            jei_block_argmax(p, a.num_classes, arg_v, arg_i, &best_v, &best_i);
            if (threadIdx.x == 0) {
                a.out_class[slot] = best_i;
                a.out_conf[slot] = best_v;
                a.out_exit[slot] = a.first_exit + j;
            }
        }
    }
    if (r1 == a.n && threadIdx.x == 0) {
        *(volatile int*)a.survivors = before + kept;
        __threadfence_system();
    }
}
