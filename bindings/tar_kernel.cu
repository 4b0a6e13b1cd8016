// The TAR forward kernel and its launcher. No torch dependency: tar_op.cpp
// calls launch_tar_forward() with raw pointers, strides and the stream.
#include <cuda_runtime.h>

#include "tar_block.cuh"

namespace vstar {
namespace {

struct DeviceExec {
  template <typename F>
  __device__ void operator()(const F& phase) const {
    phase(static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
    __syncthreads();
  }
};

// Grid x holds the blocks (never y or z, which stop at 65,535); a grid-stride
// loop takes any blocks past the grid's size.
template <typename T, typename TD>
__global__ void __launch_bounds__(kThreads) tar_fwd_kernel(TarParams p, TarPlan plan, float* workspace,
                                                            bool rowmax_only) {
  extern __shared__ float smem[];
  for (int64_t blk = blockIdx.x; blk < plan.num_blocks; blk += gridDim.x) {
    tar_block<T, TD>(p, plan, blk, smem, workspace, rowmax_only, DeviceExec{});
  }
}

template <typename T, typename TD>
cudaError_t launch_typed(const TarParams& p, const TarPlan& plan, float* workspace, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(plan.num_blocks < kMaxGrid ? plan.num_blocks : kMaxGrid);
  if (plan.two_pass) {
    tar_fwd_kernel<T, TD><<<grid, plan.threads, plan.smem_bytes, stream>>>(p, plan, workspace, true);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  tar_fwd_kernel<T, TD><<<grid, plan.threads, plan.smem_bytes, stream>>>(p, plan, workspace, false);
  return cudaGetLastError();
}

}  // namespace

int launch_tar_forward(const TarParams& p, const TarPlan& plan, void* workspace, void* stream) {
  if (plan.threads > kThreads || plan.smem_bytes > kSmemBudget) return static_cast<int>(cudaErrorInvalidValue);
  float* ws = static_cast<float*>(workspace);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool own_delta = p.delta != nullptr && p.delta_dtype == p.dtype;
  cudaError_t err = cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      err = launch_typed<float, float>(p, plan, ws, st);
      break;
    case DType::kFloat16:
      err = own_delta ? launch_typed<__half, __half>(p, plan, ws, st) : launch_typed<__half, float>(p, plan, ws, st);
      break;
    case DType::kBFloat16:
      err = own_delta ? launch_typed<__nv_bfloat16, __nv_bfloat16>(p, plan, ws, st)
                      : launch_typed<__nv_bfloat16, float>(p, plan, ws, st);
      break;
  }
  return static_cast<int>(err);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace vstar
