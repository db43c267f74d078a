// CUDA implementations of the mbf_kernels ops: checks, allocation and the
// current stream around the torch-free launchers of block_kernels.cu and
// step_kernels.cuh. Compiled only when setup.py finds a CUDA build of torch and
// nvcc (and, compile-only, by the CMake build's check against torch's headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "../ops_common.h"
#include "mbf/batched.h"
#include "mbf/compact_block.h"

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


// The fused step and the compact ops: one thread per block (step_kernels.cuh).

void check_step_dim(int64_t d) {
  TORCH_CHECK(d >= 1 && d <= kMaxGenericDim, "mbf_kernels: the CUDA fused step and compact ops "
              "take blocks of size 1 to ", kMaxGenericDim, ", got ", d);
}

// The bucket's segment table and the CUDA-block prefix over it, in one device buffer: copied
// from pinned memory on the current stream, so the step never waits for the host (the
// caching host allocator keeps the pinned buffer until the copy has run).
template <typename T>
std::pair<at::Tensor, int64_t> upload_segments(const std::vector<StepSegment<T>>& segs,
                                               const at::Device& device) {
  const size_t seg_bytes = segs.size() * sizeof(StepSegment<T>);
  const size_t prefix_bytes = (segs.size() + 1) * sizeof(int64_t);
  auto host = at::empty({static_cast<int64_t>(seg_bytes + prefix_bytes)},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* bytes = host.mutable_data_ptr<uint8_t>();
  std::memcpy(bytes, segs.data(), seg_bytes);
  int64_t ctas = 0;
  auto* prefix = reinterpret_cast<int64_t*>(bytes + seg_bytes);
  for (size_t s = 0; s < segs.size(); ++s) {
    prefix[s] = ctas;
    ctas += (segs[s].n_blocks + cuda::kStepThreads - 1) / cuda::kStepThreads;
  }
  prefix[segs.size()] = ctas;
  return {host.to(device, /*non_blocking=*/true), ctas};
}

template <typename T, typename FT = T>
void run_bucket_step(const std::vector<StepSegment<T>>& segs, at::Tensor& curvature,
                     FT* factor, at::Tensor& stats, int64_t d, const StepConfig& cfg,
                     const StepTiles<T>& tiles = {}) {
  if (segs.empty()) return;
  const std::pair<at::Tensor, int64_t> uploaded = upload_segments<T>(segs, curvature.device());
  const at::Tensor& table = uploaded.first;
  const int64_t ctas = uploaded.second;
  const uint8_t* base = table.const_data_ptr<uint8_t>();
  check_launch(cuda::bucket_step<T, FT>(
                   reinterpret_cast<const StepSegment<T>*>(base),
                   reinterpret_cast<const int64_t*>(base + segs.size() * sizeof(StepSegment<T>)),
                   static_cast<int>(segs.size()), ctas, curvature.mutable_data_ptr<T>(),
                   factor, static_cast<int>(d), cfg, tiles,
                   reinterpret_cast<unsigned long long*>(stats.mutable_data_ptr<int64_t>()),
                   current_stream()),
               "bucket_step");
}

void mbf_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& momentum,
                   at::Tensor& curvature, at::Tensor& factor, at::Tensor& stats, double lr,
                   double momentum_coef, double beta, double damping, double weight_decay,
                   bool decoupled_weight_decay, bool update_curvature, bool first_curvature,
                   bool refactor) {
  const int64_t d = check_step(param, grad, momentum, curvature, factor);
  check_step_dim(d);
  check_stats(stats, param.device());
  const c10::cuda::CUDAGuard guard(param.device());
  const auto g = grad.contiguous();
  const StepConfig cfg{lr, momentum_coef, beta, damping, weight_decay, decoupled_weight_decay};
  const StepFlags flags{update_curvature, first_curvature, refactor};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "mbf_step_cuda", [&] {
    std::vector<StepSegment<scalar_t>> whole;
    if (param.size(0) > 0) whole.push_back(whole_segment<scalar_t>(param, g, momentum, flags));
    run_bucket_step<scalar_t>(whole, curvature, factor.mutable_data_ptr<scalar_t>(), stats, d,
                              cfg);
  });
}

void mbf_bucket_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                          at::Tensor& curvature, at::Tensor& factor, at::Tensor& stats,
                          at::IntArrayRef segments, double lr, double momentum_coef,
                          double beta, double damping, double weight_decay,
                          bool decoupled_weight_decay, at::TensorList second_moments,
                          const c10::optional<at::Tensor>& tile_damping,
                          const c10::optional<at::Tensor>& tile_scale,
                          const c10::optional<at::Tensor>& tile_norms,
                          const c10::optional<at::Tensor>& directions, double beta2, double eps,
                          int64_t mode, const c10::optional<at::Tensor>& block_second_moment) {
  const int64_t d = check_bucket(params, grads, momenta, curvature, factor, stats,
                                 FactorReaders::kCuda);
  check_step_dim(d);
  const c10::cuda::CUDAGuard guard(curvature.device());
  const auto grads_c = contiguous_all(grads);
  const StepConfig config{lr, momentum_coef, beta, damping, weight_decay,
                          decoupled_weight_decay, beta2, eps};
  AT_DISPATCH_FLOATING_TYPES(curvature.scalar_type(), "mbf_bucket_step_cuda", [&] {
    bucket_pass_with<scalar_t>(
        params, grads_c, momenta, curvature, segments, d, config, second_moments, tile_damping,
        tile_scale, tile_norms, directions, block_second_moment, mode, /*tile_sums=*/false,
        [&](const auto& segs, const StepConfig& cfg, const auto& tiles, int64_t) {
          with_factor<scalar_t, FactorReaders::kCuda>(factor, [&](auto* L) {
            run_bucket_step<scalar_t>(segs, curvature, L, stats, d, cfg, tiles);
          });
        });
  });
}

void compact_outer_ema_cuda(at::Tensor& F, const at::Tensor& G_in, double beta) {
  const int64_t d = check_compact_outer_ema(F, G_in);
  const int64_t n = G_in.size(0);
  check_step_dim(d);
  const c10::cuda::CUDAGuard guard(F.device());
  const auto G = G_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mbf_compact_outer_ema_cuda", [&] {
    check_launch(cuda::compact_outer_ema<scalar_t>(F.mutable_data_ptr<scalar_t>(),
                                                   G.const_data_ptr<scalar_t>(), n,
                                                   static_cast<int>(d),
                                                   static_cast<scalar_t>(beta), current_stream()),
                 "compact_outer_ema");
  });
}

std::tuple<at::Tensor, at::Tensor> compact_cholesky_ex_cuda(const at::Tensor& F_in, int64_t n,
                                                            double damping) {
  const int64_t d = check_compact_cholesky(F_in, n);
  check_step_dim(d);
  const c10::cuda::CUDAGuard guard(F_in.device());
  const auto F = F_in.contiguous();
  auto factor = at::zeros_like(F);  // padding blocks stay finite (zeros)
  auto info = at::empty({n}, F.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mbf_compact_cholesky_cuda", [&] {
    check_launch(cuda::compact_cholesky<scalar_t>(
                     F.const_data_ptr<scalar_t>(), factor.mutable_data_ptr<scalar_t>(),
                     info.mutable_data_ptr<int32_t>(), n, static_cast<int>(d),
                     static_cast<scalar_t>(damping), current_stream()),
                 "compact_cholesky");
  });
  return {factor, info};
}

at::Tensor compact_solve_cuda(const at::Tensor& factor_in, const at::Tensor& B_in) {
  const int64_t d = check_compact_solve(factor_in, B_in);
  const int64_t n = B_in.size(0);
  check_step_dim(d);
  const c10::cuda::CUDAGuard guard(B_in.device());
  const auto factor = factor_in.contiguous();
  const auto B = B_in.contiguous();
  auto X = at::empty_like(B);
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "mbf_compact_solve_cuda", [&] {
    check_launch(cuda::compact_solve<scalar_t>(factor.const_data_ptr<scalar_t>(),
                                               B.const_data_ptr<scalar_t>(),
                                               X.mutable_data_ptr<scalar_t>(), n,
                                               static_cast<int>(d), current_stream()),
                 "compact_solve");
  });
  return X;
}

}  // namespace

TORCH_LIBRARY_IMPL(mbf_kernels, CUDA, m) {
  m.impl("cholesky_ex", &cholesky_ex_cuda);
  m.impl("cholesky_solve", &cholesky_solve_cuda);
  m.impl("solve_spd_ex", &solve_spd_ex_cuda);
  m.impl("inv_spd_ex", &inv_spd_ex_cuda);
  m.impl("outer_ema_", &outer_ema_cuda);
  m.impl("mbf_step_", &mbf_step_cuda);
  m.impl("mbf_bucket_step_", &mbf_bucket_step_cuda);
  m.impl("compact_outer_ema_", &compact_outer_ema_cuda);
  m.impl("compact_cholesky_ex", &compact_cholesky_ex_cuda);
  m.impl("compact_solve", &compact_solve_cuda);
}

}  // namespace ops
}  // namespace mbf
