// One TAR forward call, described without torch or CUDA types.
//
// Shared by the kernel launcher (tar_kernel.cu), the PyTorch operator
// (tar_op.cpp) and the host emulation the CPU tests run (emulate.cpp), so the
// options, the limits and the work decomposition are decided in one place.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace vstar {

constexpr int64_t kMaxHeadDim = 256;    // q/k and v head dims
constexpr int64_t kMaxKeys = 1024;      // Nk: a block keeps its score rows (rows x Nk fp32) in shared memory
constexpr size_t kSmemBudget = 48 * 1024;  // dynamic shared memory per block: no opt-in needed on any arch
constexpr int kThreads = 256;
constexpr int64_t kTargetRows = 64;     // query rows per block (from one long or several short sequences)
constexpr int64_t kKeyTile = 64;        // keys staged in shared memory per sequence at a time
constexpr int64_t kMinKeyTile = 16;
constexpr int64_t kMaxGrid = 2147483647;  // grid x limit; blocks past it are taken by a grid-stride loop

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct TarParams {
  const void* q;      // (B, H, Nq, D)
  const void* k;      // (B, H, Nk, D)
  const void* v;      // (B, H, Nk, Dv)
  void* out;          // (B, H, Nq, Dv)
  const void* delta;  // (B, H, Nq, Nk) custom dA (stride-0 broadcast allowed), or null for the Gaussian
  int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4], delta_stride[4];  // elements, (b, h, n, d)
  int64_t batch, heads, nq, nk, head_dim, head_dim_v;
  float scale;        // S = scale * <q_i, k_j>
  float strength;     // c in S' = S + c * m * dA
  float gauss_coef;   // dA_ij = exp(gauss_coef * (j - i)^2) = exp(-0.5 ((j - i) / sigma)^2)
  DType dtype;        // q, k, v and out
  DType delta_dtype;  // float32 or dtype
  bool causal;        // mask j > i before the max
  bool global_max;    // one max per (batch, head) instead of per query row
  bool regularize;    // false when the bias cannot change the result (strength 0, sigma inf)
};

// Fills the scalar options the way docs/semantics.md defines them.
inline void set_options(TarParams& p, double scale, double sigma, double strength, bool has_delta,
                        bool causal, bool global_max) {
  p.scale = static_cast<float>(scale);
  p.strength = static_cast<float>(strength);
  p.regularize = strength != 0.0 && (has_delta || std::isfinite(sigma));
  // Floored like the Triton kernels' coefficient: a tiny sigma then gives exactly the identity
  // (every off-diagonal entry underflows to 0) instead of 0 * -inf = NaN on the diagonal.
  p.gauss_coef = (has_delta || !std::isfinite(sigma))
      ? 0.0f : static_cast<float>(std::max(-4294967296.0, -0.5 / sigma / sigma));
  p.causal = causal;
  p.global_max = global_max;
}

// How the (B*H sequences) x (Nq rows) are split over thread blocks.
// Block `blk` takes sequences [(blk / row_tiles) * seqs, + seqs) and, of each,
// query rows [(blk % row_tiles) * rows, + rows). Several sequences share a
// block only when one block holds all their rows (row_tiles == 1).
struct TarPlan {
  int64_t rows;        // query rows of one sequence per block
  int64_t seqs;        // sequences per block
  int64_t key_tile;    // keys per sequence staged in shared memory at a time
  int64_t row_tiles;   // blocks along one sequence's query axis
  int64_t num_blocks;  // ceil(B*H / seqs) * row_tiles
  int threads;
  size_t smem_bytes;
  bool two_pass;       // global max spread over several blocks: a first pass writes the row maxima
};

// Shared memory, in floats: Q rows, a padded K tile, the score rows, three per-row statistics.
inline size_t smem_floats(int64_t rows, int64_t seqs, int64_t key_tile, int64_t nk, int64_t d) {
  const int64_t r = rows * seqs;
  return static_cast<size_t>(r * d + seqs * key_tile * (d + 1) + r * nk + 3 * r);
}

// Returns false when the call is outside what the kernel supports (see the limits above).
inline bool make_plan(const TarParams& p, int threads, TarPlan* plan) {
  const int64_t bh = p.batch * p.heads;
  if (p.nq < 1 || p.nk < 1 || p.nk > kMaxKeys || bh < 1 || threads < 1 || p.head_dim < 1 ||
      p.head_dim > kMaxHeadDim || p.head_dim_v < 1 || p.head_dim_v > kMaxHeadDim) {
    return false;
  }
  int64_t rows = p.nq < kTargetRows ? p.nq : kTargetRows;
  int64_t seqs = rows == p.nq ? kTargetRows / p.nq : 1;
  if (seqs < 1) seqs = 1;
  if (seqs > bh) seqs = bh;
  int64_t key_tile = p.nk < kKeyTile ? p.nk : kKeyTile;
  while (smem_floats(rows, seqs, key_tile, p.nk, p.head_dim) * sizeof(float) > kSmemBudget) {
    if (key_tile > kMinKeyTile) {
      key_tile = (key_tile + 1) / 2;
    } else if (seqs > 1) {
      seqs /= 2;
    } else if (rows > 1) {
      rows = (rows + 1) / 2;
    } else {
      return false;
    }
  }
  plan->rows = rows;
  plan->seqs = seqs;
  plan->key_tile = key_tile;
  plan->row_tiles = (p.nq + rows - 1) / rows;
  plan->num_blocks = (bh + seqs - 1) / seqs * plan->row_tiles;
  plan->threads = threads;
  plan->smem_bytes = smem_floats(rows, seqs, key_tile, p.nk, p.head_dim) * sizeof(float);
  plan->two_pass = p.regularize && p.global_max && plan->row_tiles > 1;
  return true;
}

// fp32 row maxima (B*H x Nq) the two-pass global max needs; 0 otherwise.
inline size_t workspace_bytes(const TarParams& p, const TarPlan& plan) {
  return plan.two_pass ? static_cast<size_t>(p.batch * p.heads * p.nq) * sizeof(float) : 0;
}

// Launches the forward on `stream` (a cudaStream_t). `workspace` holds workspace_bytes().
// Returns 0 or a cudaError_t code; error_string() turns a code into text.
int launch_tar_forward(const TarParams& p, const TarPlan& plan, void* workspace, void* stream);
const char* error_string(int code);

}  // namespace vstar
