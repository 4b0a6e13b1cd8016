// Host emulation of the TAR forward kernel, for the CPU tests (not part of the extension).
//
// Runs tar_block() -- the code every GPU thread block runs -- over every block
// index and, phase by phase, every thread index, with the plan and the pass
// sequence of launch_tar_forward(). Exposed as a C ABI for ctypes.
//
// What this checks: the index math, strides and offsets, masking, the max,
// bias and softmax, the block decomposition (several sequences per block, row
// tiles, the two-pass global max, the grid-stride loop) and that each phase
// only reads what an earlier phase wrote (shared memory is poisoned with NaN
// before every block) and writes only its own elements (`reverse` runs the
// threads and the blocks in the opposite order; the result must not change).
// What it cannot check: device code generation, launch limits, real
// concurrency and the memory system; those need the GPU tests.
#include <cstdint>
#include <limits>
#include <vector>

#include "tar_block.cuh"

namespace {

struct HostExec {
  int threads;
  bool reverse;

  template <typename F>
  void operator()(const F& phase) const {
    for (int n = 0; n < threads; ++n) phase(reverse ? threads - 1 - n : n, threads);
  }
};

template <typename T, typename TD>
void run(const vstar::TarParams& p, const vstar::TarPlan& plan, int64_t grid, bool reverse) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> smem(plan.smem_bytes / sizeof(float));
  std::vector<float> workspace(vstar::workspace_bytes(p, plan) / sizeof(float), nan);
  const HostExec exec{plan.threads, reverse};
  const int passes = plan.two_pass ? 2 : 1;
  for (int pass = 0; pass < passes; ++pass) {
    const bool rowmax_only = plan.two_pass && pass == 0;
    for (int64_t n = 0; n < grid; ++n) {
      const int64_t block_idx = reverse ? grid - 1 - n : n;
      for (int64_t blk = block_idx; blk < plan.num_blocks; blk += grid) {
        smem.assign(smem.size(), nan);
        vstar::tar_block<T, TD>(p, plan, blk, smem.data(), workspace.data(), rowmax_only, exec);
      }
    }
  }
}

void fill_strides(int64_t* dst, const int64_t* src) {
  for (int n = 0; n < 4; ++n) dst[n] = src[n];
}

}  // namespace

extern "C" {

// sizes: batch, heads, nq, nk, head_dim, head_dim_v. strides: 4 each for q, k, v, out, delta.
// dtype / delta_dtype: 0 float32, 1 float16, 2 bfloat16. Returns 0, or -1 when no plan fits.
int vstar_emulate_forward(const void* q, const void* k, const void* v, void* out, const void* delta,
                          const int64_t* sizes, const int64_t* strides, double scale, double sigma,
                          double strength, int causal, int global_max, int dtype, int delta_dtype,
                          int threads, int64_t grid, int reverse) {
  vstar::TarParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.delta = delta;
  p.batch = sizes[0];
  p.heads = sizes[1];
  p.nq = sizes[2];
  p.nk = sizes[3];
  p.head_dim = sizes[4];
  p.head_dim_v = sizes[5];
  fill_strides(p.q_stride, strides);
  fill_strides(p.k_stride, strides + 4);
  fill_strides(p.v_stride, strides + 8);
  fill_strides(p.out_stride, strides + 12);
  fill_strides(p.delta_stride, strides + 16);
  p.dtype = static_cast<vstar::DType>(dtype);
  p.delta_dtype = static_cast<vstar::DType>(delta_dtype);
  vstar::set_options(p, scale, sigma, strength, delta != nullptr, causal != 0, global_max != 0);
  vstar::TarPlan plan;
  if (!vstar::make_plan(p, threads, &plan) || grid < 1) return -1;
  const bool own_delta = delta != nullptr && p.delta_dtype == p.dtype;
  switch (p.dtype) {
    case vstar::DType::kFloat32:
      run<float, float>(p, plan, grid, reverse != 0);
      break;
    case vstar::DType::kFloat16:
      if (own_delta) {
        run<__half, __half>(p, plan, grid, reverse != 0);
      } else {
        run<__half, float>(p, plan, grid, reverse != 0);
      }
      break;
    case vstar::DType::kBFloat16:
      if (own_delta) {
        run<__nv_bfloat16, __nv_bfloat16>(p, plan, grid, reverse != 0);
      } else {
        run<__nv_bfloat16, float>(p, plan, grid, reverse != 0);
      }
      break;
    default:
      return -1;
  }
  return 0;
}

// The plan the launcher would use: out = rows, seqs, key_tile, row_tiles, num_blocks, smem_bytes,
// two_pass. Returns 0, or -1 when the shape is unsupported.
int vstar_plan(const int64_t* sizes, int global_max, int regularize, int64_t* out) {
  vstar::TarParams p{};
  p.batch = sizes[0];
  p.heads = sizes[1];
  p.nq = sizes[2];
  p.nk = sizes[3];
  p.head_dim = sizes[4];
  p.head_dim_v = sizes[5];
  p.global_max = global_max != 0;
  p.regularize = regularize != 0;
  vstar::TarPlan plan;
  if (!vstar::make_plan(p, vstar::kThreads, &plan)) return -1;
  const int64_t values[] = {plan.rows, plan.seqs, plan.key_tile, plan.row_tiles, plan.num_blocks,
                            static_cast<int64_t>(plan.smem_bytes), plan.two_pass ? 1 : 0};
  for (int n = 0; n < 7; ++n) out[n] = values[n];
  return 0;
}

// The limits and budget tar_params.h declares, for the Python side to check its copies against.
int64_t vstar_limit(int which) {
  switch (which) {
    case 0:
      return vstar::kMaxHeadDim;
    case 1:
      return vstar::kMaxKeys;
    case 2:
      return static_cast<int64_t>(vstar::kSmemBudget);
    default:
      return -1;
  }
}

}  // extern "C"
