// The work of one thread block of the TAR forward, as a sequence of phases.
//
// Every phase is a function of (thread index, thread count) that touches only
// its own output elements, and `exec` puts a barrier after each one. All state
// that crosses a phase lives in shared memory; nothing is exchanged between
// threads inside a phase (no warp shuffles, no atomics). So running the threads
// of a phase one after another, in any order, computes exactly what the GPU
// computes, which is what the host emulation (emulate.cpp) does on CPU:
//
//   GPU:  exec(f) = f(threadIdx.x, blockDim.x); __syncthreads();
//   host: exec(f) = for t in threads: f(t, threads)
//
// Math is fp32 whatever the input dtype (docs/semantics.md):
//   S_ij  = scale <q_i, k_j>,  -inf for j > i when causal
//   m     = max_j S_ij (row) or max_ij S_ij over the (batch, head) (global)
//   S'_ij = S_ij + strength * m * dA_ij,  dA_ij = exp(gauss_coef (j - i)^2) or delta_ij
//   O_i   = sum_j softmax_j(S'_i.) v_j
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "tar_params.h"

#if defined(__CUDACC__)
#define VSTAR_HD __host__ __device__
#else
#define VSTAR_HD
#endif

namespace vstar {

VSTAR_HD inline float to_float(float x) { return x; }
VSTAR_HD inline float to_float(__half x) { return __half2float(x); }
VSTAR_HD inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
VSTAR_HD inline T from_float(float x);
template <>
VSTAR_HD inline float from_float<float>(float x) { return x; }
template <>
VSTAR_HD inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
VSTAR_HD inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

VSTAR_HD inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

VSTAR_HD inline float neg_inf() { return -INFINITY; }

// One query row of a block: block row r = g * plan.rows + local row.
struct RowRef {
  int64_t b, h, i;   // batch, head, query index
  int64_t seq;       // b * heads + h
  int64_t hi;        // keys [0, hi) are visible to this row (causal: i + 1)
  bool valid;        // false past the last sequence or the last query row
};

struct BlockGeometry {
  int64_t seq0;  // first sequence of the block
  int64_t r0;    // first query row (of each sequence) of the block
  int64_t rows;  // rows per sequence in the block
  int64_t seqs;
  int64_t hi;    // keys any row of the block can see

  VSTAR_HD BlockGeometry(const TarParams& p, const TarPlan& plan, int64_t blk)
      : seq0((blk / plan.row_tiles) * plan.seqs),
        r0((blk % plan.row_tiles) * plan.rows),
        rows(plan.rows),
        seqs(plan.seqs),
        hi(p.causal ? min64(p.nk, r0 + plan.rows) : p.nk) {}  // members initialise in declaration order

  VSTAR_HD RowRef row(const TarParams& p, int64_t r) const {
    RowRef ref;
    ref.seq = seq0 + r / rows;
    ref.i = r0 + r % rows;
    ref.b = ref.seq / p.heads;
    ref.h = ref.seq % p.heads;
    ref.valid = ref.seq < p.batch * p.heads && ref.i < p.nq;
    ref.hi = p.causal ? min64(p.nk, ref.i + 1) : p.nk;
    return ref;
  }
};

// Offset of element (b, h, n, d) under 4-D strides.
VSTAR_HD inline int64_t offset(const int64_t* stride, int64_t b, int64_t h, int64_t n, int64_t d) {
  return b * stride[0] + h * stride[1] + n * stride[2] + d * stride[3];
}

// dA_ij: the Gaussian from (i, j) in registers, or the custom matrix.
template <typename TD>
VSTAR_HD inline float bias_weight(const TarParams& p, const RowRef& row, int64_t j) {
  if (p.delta != nullptr) {
    const TD* delta = static_cast<const TD*>(p.delta);
    return to_float(delta[offset(p.delta_stride, row.b, row.h, row.i, j)]);
  }
  const float dist = static_cast<float>(j - row.i);
  return expf(p.gauss_coef * dist * dist);
}

// Runs one block. `rowmax_only`: first pass of a two-pass global max, which
// writes each row's max to `workspace` (B*H x Nq) and stops there. In the
// second pass (plan.two_pass) each row reads its sequence's maxima back.
template <typename T, typename TD, typename Exec>
VSTAR_HD void tar_block(const TarParams& p, const TarPlan& plan, int64_t blk, float* smem, float* workspace,
                        bool rowmax_only, const Exec& exec) {
  const BlockGeometry geo(p, plan, blk);
  const int64_t R = plan.rows * plan.seqs;
  const int64_t D = p.head_dim;
  const int64_t DV = p.head_dim_v;
  const int64_t NK = p.nk;
  const int64_t TK = plan.key_tile;
  const int64_t KP = D + 1;  // K tile row pitch: odd, so threads reading different keys hit different banks

  float* qs = smem;                          // [R][D]       q rows, fp32
  float* ks = qs + R * D;                    // [seqs*TK][KP] k tile, fp32
  float* s = ks + plan.seqs * TK * KP;       // [R][NK]      S, then S', then P (unnormalised)
  float* row_max = s + R * NK;               // [R]          max_j S_ij
  float* row_bias = row_max + R;             // [R]          strength * m
  float* row_max2 = row_bias + R;            // [R]          max_j S'_ij

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);

  exec([&](int tid, int nt) {
    for (int64_t idx = tid; idx < R * D; idx += nt) {
      const RowRef row = geo.row(p, idx / D);
      const int64_t d = idx % D;
      qs[idx] = row.valid ? to_float(q[offset(p.q_stride, row.b, row.h, row.i, d)]) : 0.0f;
    }
  });

  for (int64_t t = 0; t < geo.hi; t += TK) {
    exec([&](int tid, int nt) {
      for (int64_t idx = tid; idx < plan.seqs * TK * D; idx += nt) {
        const int64_t g = idx / (TK * D);
        const int64_t jj = idx / D % TK;
        const int64_t d = idx % D;
        const int64_t seq = geo.seq0 + g;
        const int64_t j = t + jj;
        float val = 0.0f;
        if (seq < p.batch * p.heads && j < NK) {
          val = to_float(k[offset(p.k_stride, seq / p.heads, seq % p.heads, j, d)]);
        }
        ks[(g * TK + jj) * KP + d] = val;
      }
    });
    exec([&](int tid, int nt) {
      for (int64_t idx = tid; idx < R * TK; idx += nt) {
        const int64_t r = idx / TK;
        const int64_t j = t + idx % TK;
        const RowRef row = geo.row(p, r);
        if (!row.valid || j >= NK) continue;
        float score = neg_inf();
        if (j < row.hi) {
          const float* qr = qs + r * D;
          const float* kr = ks + ((r / plan.rows) * TK + idx % TK) * KP;
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          score = dot * p.scale;
        }
        s[r * NK + j] = score;
      }
    });
  }

  if (p.regularize) {
    exec([&](int tid, int nt) {
      for (int64_t r = tid; r < R; r += nt) {
        const RowRef row = geo.row(p, r);
        if (!row.valid) continue;
        float m = neg_inf();
        for (int64_t j = 0; j < row.hi; ++j) m = fmaxf(m, s[r * NK + j]);
        row_max[r] = m;
        if (rowmax_only) workspace[row.seq * p.nq + row.i] = m;
      }
    });
    if (rowmax_only) return;

    exec([&](int tid, int nt) {
      for (int64_t r = tid; r < R; r += nt) {
        const RowRef row = geo.row(p, r);
        if (!row.valid) continue;
        float m = row_max[r];
        if (p.global_max && plan.two_pass) {
          m = neg_inf();
          for (int64_t i = 0; i < p.nq; ++i) m = fmaxf(m, workspace[row.seq * p.nq + i]);
        } else if (p.global_max) {  // the block holds every row of the sequence
          const int64_t first = (r / plan.rows) * plan.rows;
          m = neg_inf();
          for (int64_t i = 0; i < p.nq; ++i) m = fmaxf(m, row_max[first + i]);
        }
        row_bias[r] = p.strength * m;
      }
    });

    exec([&](int tid, int nt) {
      for (int64_t idx = tid; idx < R * geo.hi; idx += nt) {
        const int64_t r = idx / geo.hi;
        const int64_t j = idx % geo.hi;
        const RowRef row = geo.row(p, r);
        if (!row.valid || j >= row.hi) continue;
        s[r * NK + j] += row_bias[r] * bias_weight<TD>(p, row, j);
      }
    });
  }

  exec([&](int tid, int nt) {
    for (int64_t r = tid; r < R; r += nt) {
      const RowRef row = geo.row(p, r);
      if (!row.valid) continue;
      float m = neg_inf();
      for (int64_t j = 0; j < row.hi; ++j) m = fmaxf(m, s[r * NK + j]);
      row_max2[r] = m;
    }
  });

  exec([&](int tid, int nt) {
    for (int64_t idx = tid; idx < R * geo.hi; idx += nt) {
      const int64_t r = idx / geo.hi;
      const int64_t j = idx % geo.hi;
      const RowRef row = geo.row(p, r);
      if (!row.valid || j >= row.hi) continue;
      s[r * NK + j] = expf(s[r * NK + j] - row_max2[r]);
    }
  });

  // Output (row, d): threads next to each other take neighbouring d, so V reads coalesce.
  exec([&](int tid, int nt) {
    for (int64_t idx = tid; idx < R * DV; idx += nt) {
      const int64_t r = idx / DV;
      const int64_t d = idx % DV;
      const RowRef row = geo.row(p, r);
      if (!row.valid) continue;
      const float* pr = s + r * NK;
      float acc = 0.0f;
      float denom = 0.0f;
      for (int64_t j = 0; j < row.hi; ++j) {
        acc += pr[j] * to_float(v[offset(p.v_stride, row.b, row.h, j, d)]);
        denom += pr[j];
      }
      out[offset(p.out_stride, row.b, row.h, row.i, d)] = from_float<T>(acc / denom);
    }
  });
}

}  // namespace vstar
