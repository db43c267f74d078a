// CUDA implementations of the mbf_kernels ops: checks, allocation and the
// current stream around the torch-free launchers of block_kernels.cu.
// Compiled only when setup.py finds a CUDA build of torch and nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../ops_common.h"
#include "mbf/batched.h"

namespace mbf {
namespace ops {
namespace {

void* current_stream() {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream());
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "mbf_kernels: ", what, " launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// Blocks whose factorisation failed get zeros, as on the CPU, instead of the
// Inf/NaN the substitution leaves behind.
void zero_failed(at::Tensor& out, const at::Tensor& info) {
  out.masked_fill_(info.ne(0).view({-1, 1, 1}), 0);
}

std::tuple<at::Tensor, at::Tensor> cholesky_ex_cuda(const at::Tensor& A_in,
                                                    double damping) {
  check_blocks(A_in, "A");
  const auto A = A_in.contiguous();
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.size(0);
  const int d = static_cast<int>(A.size(1));
  auto L = at::empty_like(A);
  auto info = at::empty({n}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "mbf_cholesky_ex_cuda", [&] {
    check_launch(cuda::cholesky_batched<scalar_t>(
                     A.const_data_ptr<scalar_t>(),
                     L.mutable_data_ptr<scalar_t>(),
                     info.mutable_data_ptr<int32_t>(), n, d,
                     static_cast<scalar_t>(damping), current_stream()),
                 "cholesky");
  });
  return {L, info};
}

at::Tensor cholesky_solve_cuda(const at::Tensor& B_in, const at::Tensor& L_in) {
  check_blocks(L_in, "L");
  check_rhs(B_in, L_in);
  const auto L = L_in.contiguous();
  const auto B = B_in.contiguous();
  const c10::cuda::CUDAGuard guard(L.device());
  auto X = B.clone();
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "mbf_cholesky_solve_cuda", [&] {
    check_launch(cuda::cholesky_solve_batched<scalar_t>(
                     L.const_data_ptr<scalar_t>(),
                     X.mutable_data_ptr<scalar_t>(), L.size(0),
                     static_cast<int>(L.size(1)), static_cast<int>(X.size(2)),
                     current_stream()),
                 "cholesky_solve");
  });
  return X;
}

std::tuple<at::Tensor, at::Tensor> solve_spd_ex_cuda(const at::Tensor& A_in,
                                                     const at::Tensor& B_in,
                                                     double damping) {
  check_rhs(B_in, A_in);
  at::Tensor L, info;
  std::tie(L, info) = cholesky_ex_cuda(A_in, damping);
  auto X = cholesky_solve_cuda(B_in, L);
  zero_failed(X, info);
  return {X, info};
}

std::tuple<at::Tensor, at::Tensor> inv_spd_ex_cuda(const at::Tensor& A_in,
                                                   double damping) {
  at::Tensor L, info;
  std::tie(L, info) = cholesky_ex_cuda(A_in, damping);
  auto Ainv = at::empty_like(L);
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "mbf_inv_spd_ex_cuda", [&] {
    check_launch(cuda::cholesky_inverse_batched<scalar_t>(
                     L.const_data_ptr<scalar_t>(),
                     Ainv.mutable_data_ptr<scalar_t>(), L.size(0),
                     static_cast<int>(L.size(1)), current_stream()),
                 "cholesky_inverse");
  });
  zero_failed(Ainv, info);
  return {Ainv, info};
}

void outer_ema_cuda(at::Tensor& F, const at::Tensor& G_in, double beta) {
  check_blocks(F, "F");
  check_vectors(G_in, F);
  const auto G = G_in.contiguous();
  const bool in_place = F.is_contiguous();
  at::Tensor Fc = in_place ? F : F.contiguous();
  const c10::cuda::CUDAGuard guard(F.device());
  AT_DISPATCH_FLOATING_TYPES(Fc.scalar_type(), "mbf_outer_ema_cuda", [&] {
    check_launch(cuda::outer_ema_batched<scalar_t>(
                     Fc.mutable_data_ptr<scalar_t>(),
                     G.const_data_ptr<scalar_t>(), Fc.size(0),
                     static_cast<int>(Fc.size(1)), static_cast<int>(G.size(1)),
                     static_cast<scalar_t>(beta), current_stream()),
                 "outer_ema");
  });
  if (!in_place) F.copy_(Fc);
}

}  // namespace

TORCH_LIBRARY_IMPL(mbf_kernels, CUDA, m) {
  m.impl("cholesky_ex", &cholesky_ex_cuda);
  m.impl("cholesky_solve", &cholesky_solve_cuda);
  m.impl("solve_spd_ex", &solve_spd_ex_cuda);
  m.impl("inv_spd_ex", &inv_spd_ex_cuda);
  m.impl("outer_ema_", &outer_ema_cuda);
}

}  // namespace ops
}  // namespace mbf
