// torch.ops.vstar.tar_attention_fwd: the PyTorch operator around the CUDA kernel.
//
// Checks the tensors, allocates the output (and the workspace of the two-pass
// global max), and launches on the current stream. Python
// (vstar_kernels/ops/tar_cuda.py) registers the fake (meta) function.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <optional>

#include "tar_params.h"

namespace vstar {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void copy_strides(int64_t* dst, const at::Tensor& t) {
  for (int n = 0; n < 4; ++n) dst[n] = t.stride(n);
}

// The arguments follow the order of tar_attention's keywords (sigma, strength, delta, causal,
// max_mode, scale), as the vstar::tar_attention op of vstar_kernels/_op.py does.
at::Tensor tar_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double sigma,
                             double strength, const std::optional<at::Tensor>& delta, bool causal,
                             bool global_max, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be 4-D (B, H, N, D), got ",
              q.dim(), "-D, ", k.dim(), "-D and ", v.dim(), "-D");
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
              "q, k and v must be CUDA tensors on one device");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), D = q.size(3);
  const int64_t nk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "k must be (B, H, Nk, D) = (", B, ", ", H,
              ", Nk, ", D, "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == nk, "v must be (B, H, Nk, Dv) with Nk = ", nk,
              ", got ", v.sizes());
  TORCH_CHECK(D <= kMaxHeadDim && dv <= kMaxHeadDim, "head dims must be <= ", kMaxHeadDim, ", got ", D,
              " and ", dv);
  TORCH_CHECK(nk >= 1 && nk <= kMaxKeys, "Nk must be in [1, ", kMaxKeys, "], got ", nk);
  TORCH_CHECK(sigma > 0, "sigma must be > 0, got ", sigma);
  // the kernel's math is float32: a larger factor would be inf there (the Python op refuses the same)
  TORCH_CHECK(std::abs(strength) <= FLT_MAX, "strength must be finite with |strength| <= ", FLT_MAX, ", got ",
              strength);
  TORCH_CHECK(scale > 0 && scale <= FLT_MAX, "scale must be > 0 and <= ", FLT_MAX, ", got ", scale);

  TarParams p{};
  p.dtype = dtype_of(q, "q");
  p.delta_dtype = DType::kFloat32;
  if (delta.has_value()) {
    const at::Tensor& dl = *delta;
    TORCH_CHECK(dl.device() == q.device(), "delta must be on q's device");
    TORCH_CHECK(dl.dim() == 4 && dl.size(0) == B && dl.size(1) == H && dl.size(2) == nq && dl.size(3) == nk,
                "delta must be (B, H, Nq, Nk) (an expanded view is fine), got ", dl.sizes());
    p.delta_dtype = dtype_of(dl, "delta");
    TORCH_CHECK(p.delta_dtype == DType::kFloat32 || p.delta_dtype == p.dtype,
                "delta must be float32 or q's dtype, got ", dl.scalar_type());
    p.delta = dl.data_ptr();
    copy_strides(p.delta_stride, dl);
  }

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, H, nq, dv}, q.options());
  if (B * H == 0 || nq == 0) return out;

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  copy_strides(p.q_stride, q);
  copy_strides(p.k_stride, k);
  copy_strides(p.v_stride, v);
  copy_strides(p.out_stride, out);
  p.batch = B;
  p.heads = H;
  p.nq = nq;
  p.nk = nk;
  p.head_dim = D;
  p.head_dim_v = dv;
  set_options(p, scale, sigma, strength, delta.has_value(), causal, global_max);

  TarPlan plan;
  TORCH_CHECK(make_plan(p, kThreads, &plan), "no launch plan fits shape (B, H, Nq, Nk, D, Dv) = (", B, ", ", H,
              ", ", nq, ", ", nk, ", ", D, ", ", dv, ")");
  at::Tensor workspace;
  if (const size_t bytes = workspace_bytes(p, plan)) {
    workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))}, q.options().dtype(at::kFloat));
  }
  const int err = launch_tar_forward(p, plan, workspace.defined() ? workspace.data_ptr() : nullptr,
                                     c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(err == 0, "vstar tar_attention_fwd kernel launch failed: ", error_string(err));
  return out;
}

}  // namespace
}  // namespace vstar

TORCH_LIBRARY(vstar, m) {
  m.def(
      "tar_attention_fwd(Tensor q, Tensor k, Tensor v, float sigma, float strength, Tensor? delta, "
      "bool causal, bool global_max, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(vstar, CUDA, m) { m.impl("tar_attention_fwd", &vstar::tar_attention_fwd); }
