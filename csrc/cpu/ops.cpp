// CPU implementations of the mbf_kernels ops: shape checks, output
// allocation and a parallel split over blocks around the torch-free kernels
// of block_kernels.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ops_common.h"
#include "mbf/batched.h"

namespace mbf {
namespace ops {
namespace {

// Large outputs are fresh memory from the allocator (mmap'ed by malloc), and first-touch
// page faults on 4 KiB pages cost more than the kernels themselves: 18 ms for a 36 MB
// output on the development VM, against 2 ms to fill it once mapped. Where transparent huge
// pages are in "madvise" mode (a common default), asking for them before the first touch
// cuts the faults 512-fold. A hint only: if the kernel refuses, nothing changes.
at::Tensor with_huge_pages(at::Tensor t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && hi > lo)
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return t;
}

// Blocks per parallel task: enough work (about d^3 flops each) to amortise
// the task overhead, so small batches stay on one thread.
int64_t grain_for(int64_t d) { return 1 + 32768 / (d * d * d + 1); }

std::tuple<at::Tensor, at::Tensor> cholesky_ex_cpu(const at::Tensor& A_in,
                                                   double damping) {
  check_blocks(A_in, "A");
  const auto A = A_in.contiguous();
  const int64_t n = A.size(0);
  const int d = static_cast<int>(A.size(1));
  auto L = with_huge_pages(at::empty_like(A));
  auto info = at::empty({n}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "mbf_cholesky_ex_cpu", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    scalar_t* l = L.mutable_data_ptr<scalar_t>();
    int32_t* inf = info.mutable_data_ptr<int32_t>();
    at::parallel_for(0, n, grain_for(d), [&](int64_t b, int64_t e) {
      cpu::cholesky_batched<scalar_t>(a, l, inf, b, e, d,
                                      static_cast<scalar_t>(damping));
    });
  });
  return {L, info};
}

at::Tensor cholesky_solve_cpu(const at::Tensor& B_in, const at::Tensor& L_in) {
  check_blocks(L_in, "L");
  check_rhs(B_in, L_in);
  const auto L = L_in.contiguous();
  const auto B = B_in.contiguous();
  const int64_t n = L.size(0);
  const int d = static_cast<int>(L.size(1));
  const int k = static_cast<int>(B.size(2));
  auto X = with_huge_pages(at::empty_like(B));
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "mbf_cholesky_solve_cpu", [&] {
    const scalar_t* l = L.const_data_ptr<scalar_t>();
    const scalar_t* rhs = B.const_data_ptr<scalar_t>();
    scalar_t* x = X.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_for(d), [&](int64_t b, int64_t e) {
      cpu::cholesky_solve_batched<scalar_t>(l, rhs, x, b, e, d, k);
    });
  });
  return X;
}

std::tuple<at::Tensor, at::Tensor> solve_spd_ex_cpu(const at::Tensor& A_in,
                                                    const at::Tensor& B_in,
                                                    double damping) {
  check_blocks(A_in, "A");
  const auto A = A_in.contiguous();
  check_rhs(B_in, A);
  const auto B = B_in.contiguous();
  const int64_t n = A.size(0);
  const int d = static_cast<int>(A.size(1));
  const int k = static_cast<int>(B.size(2));
  auto X = with_huge_pages(at::empty_like(B));
  auto info = at::empty({n}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "mbf_solve_spd_ex_cpu", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* rhs = B.const_data_ptr<scalar_t>();
    scalar_t* x = X.mutable_data_ptr<scalar_t>();
    int32_t* inf = info.mutable_data_ptr<int32_t>();
    at::parallel_for(0, n, grain_for(d), [&](int64_t b, int64_t e) {
      cpu::solve_spd_batched<scalar_t>(a, rhs, x, inf, b, e, d, k,
                                       static_cast<scalar_t>(damping));
    });
  });
  return {X, info};
}

std::tuple<at::Tensor, at::Tensor> inv_spd_ex_cpu(const at::Tensor& A_in,
                                                  double damping) {
  check_blocks(A_in, "A");
  const auto A = A_in.contiguous();
  const int64_t n = A.size(0);
  const int d = static_cast<int>(A.size(1));
  auto Ainv = with_huge_pages(at::empty_like(A));
  auto info = at::empty({n}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "mbf_inv_spd_ex_cpu", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    scalar_t* out = Ainv.mutable_data_ptr<scalar_t>();
    int32_t* inf = info.mutable_data_ptr<int32_t>();
    at::parallel_for(0, n, grain_for(d), [&](int64_t b, int64_t e) {
      cpu::inv_spd_batched<scalar_t>(a, out, inf, b, e, d,
                                     static_cast<scalar_t>(damping));
    });
  });
  return {Ainv, info};
}

void outer_ema_cpu(at::Tensor& F, const at::Tensor& G_in, double beta) {
  check_blocks(F, "F");
  check_vectors(G_in, F);
  const auto G = G_in.contiguous();
  const bool in_place = F.is_contiguous();
  at::Tensor Fc = in_place ? F : F.contiguous();
  const int64_t n = Fc.size(0);
  const int d = static_cast<int>(Fc.size(1));
  const int S = static_cast<int>(G.size(1));
  AT_DISPATCH_FLOATING_TYPES(Fc.scalar_type(), "mbf_outer_ema_cpu", [&] {
    scalar_t* f = Fc.mutable_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, grain_for(d), [&](int64_t b, int64_t e) {
      cpu::outer_ema_batched<scalar_t>(f, g, b, e, d, S,
                                       static_cast<scalar_t>(beta));
    });
  });
  if (!in_place) F.copy_(Fc);
}

// A compact state tensor (ceil(N/16), d(d+1)/2, 16) for N blocks of size d.
void check_compact(const at::Tensor& C, int64_t n, int64_t d, const char* name) {
  const int64_t tiles = (n + cpu::kCompactTile - 1) / cpu::kCompactTile;
  TORCH_CHECK(C.dim() == 3 && C.size(0) == tiles && C.size(1) == d * (d + 1) / 2 &&
                  C.size(2) == cpu::kCompactTile,
              "mbf_kernels: ", name, " must have the compact shape (", tiles, ", ",
              d * (d + 1) / 2, ", ", cpu::kCompactTile, ") for ", n, " blocks of size ", d,
              ", got ", C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "mbf_kernels: ", name, " must be float32 or float64, got ", C.scalar_type());
}

// Compact tiles per parallel task.
int64_t tile_grain(int64_t d) { return 1 + grain_for(d) / cpu::kCompactTile; }

// The smallest d with d(d+1)/2 >= tri: the block size of a compact tensor with tri rows.
int64_t tri_dim(int64_t tri) {
  int64_t d = 0;
  while (d * (d + 1) / 2 < tri) ++d;
  return d;
}

void check_stats(const at::Tensor& stats) {
  TORCH_CHECK(stats.scalar_type() == at::kLong && stats.numel() == 2 && stats.is_contiguous() &&
                  stats.device().is_cpu(),
              "mbf_kernels: stats must be a contiguous int64 CPU tensor of 2 counters");
}

// The fused step over compact tiles [0, n_tiles) of the segments, split across threads;
// adds the counters to stats ([skipped curvature blocks, failed factorisations]).
template <typename T>
void run_step(const std::vector<cpu::StepSegment<T>>& segs, T* F, T* factor, int64_t d,
              int64_t n_tiles, const cpu::StepConfig& cfg, at::Tensor& stats) {
  std::atomic<int64_t> skipped{0}, failed{0};
  at::parallel_for(0, n_tiles, tile_grain(d), [&](int64_t b, int64_t e) {
    const cpu::StepStats st = cpu::mbf_bucket_step_tiles<T>(
        segs.data(), static_cast<int>(segs.size()), F, factor, static_cast<int>(d), b, e, cfg);
    skipped += st.skipped_curvature;
    failed += st.failed_factor;
  });
  auto* counters = stats.mutable_data_ptr<int64_t>();
  counters[0] += skipped.load();
  counters[1] += failed.load();
}

void mbf_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& momentum,
                  at::Tensor& curvature, at::Tensor& factor, at::Tensor& stats, double lr,
                  double momentum_coef, double beta, double damping, double weight_decay,
                  bool decoupled_weight_decay, bool update_curvature, bool first_curvature,
                  bool refactor) {
  TORCH_CHECK(param.dim() == 2, "mbf_kernels: param must have shape (N, d), got ",
              param.sizes());
  const int64_t n = param.size(0);
  const int64_t d = param.size(1);
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble,
              "mbf_kernels: param must be float32 or float64, got ", param.scalar_type());
  for (const at::Tensor* t : {&grad, static_cast<const at::Tensor*>(&momentum)}) {
    TORCH_CHECK(t->sizes() == param.sizes(), "mbf_kernels: grad and momentum must have shape ",
                param.sizes(), ", got ", t->sizes());
  }
  check_compact(curvature, n, d, "curvature");
  check_compact(factor, n, d, "factor");
  check_like(grad, param, "grad");
  check_like(momentum, param, "momentum");
  check_like(curvature, param, "curvature");
  check_like(factor, param, "factor");
  for (const auto* t : {&param, &momentum, &curvature, &factor}) {
    TORCH_CHECK(t->is_contiguous(), "mbf_kernels: mbf_step_ updates its state in place, which "
                "must be contiguous");
  }
  check_stats(stats);
  const auto g = grad.contiguous();
  const cpu::StepConfig cfg{lr, momentum_coef, beta, damping, weight_decay,
                            decoupled_weight_decay};
  const cpu::StepFlags flags{update_curvature, first_curvature, refactor};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "mbf_step_cpu", [&] {
    // The whole (N, d) array is one segment of contiguous rows.
    const std::vector<cpu::StepSegment<scalar_t>> whole{
        {param.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
         momentum.mutable_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, n, d, 0,
         static_cast<int>(d), flags}};
    run_step<scalar_t>(whole, curvature.mutable_data_ptr<scalar_t>(),
                       factor.mutable_data_ptr<scalar_t>(), d, curvature.size(0), cfg, stats);
  });
}

// The step for a whole bucket: `segments` holds kSegmentFields ints per segment (see
// registration.cpp); the tensors it indexes are params[i] / grads[i] / momenta[i].
constexpr int kSegmentFields = 8;

void mbf_bucket_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                         at::Tensor& curvature, at::Tensor& factor, at::Tensor& stats,
                         at::IntArrayRef segments, double lr, double momentum_coef, double beta,
                         double damping, double weight_decay, bool decoupled_weight_decay) {
  TORCH_CHECK(curvature.dim() == 3 && curvature.size(2) == cpu::kCompactTile,
              "mbf_kernels: curvature must be a compact tensor (tiles, d(d+1)/2, ",
              cpu::kCompactTile, "), got ", curvature.sizes());
  const int64_t tiles = curvature.size(0), tri = curvature.size(1);
  const int64_t d = tri_dim(tri);
  TORCH_CHECK(d >= 1 && d * (d + 1) / 2 == tri, "mbf_kernels: curvature has ", tri,
              " rows per tile, not a triangle number d(d+1)/2");
  TORCH_CHECK(factor.sizes() == curvature.sizes(), "mbf_kernels: factor must have shape ",
              curvature.sizes(), ", got ", factor.sizes());
  TORCH_CHECK(curvature.scalar_type() == at::kFloat || curvature.scalar_type() == at::kDouble,
              "mbf_kernels: curvature must be float32 or float64, got ", curvature.scalar_type());
  check_like(factor, curvature, "factor");
  TORCH_CHECK(curvature.is_contiguous() && factor.is_contiguous(),
              "mbf_kernels: curvature and factor are updated in place and must be contiguous");
  check_stats(stats);
  TORCH_CHECK(grads.size() == params.size() && momenta.size() == params.size(),
              "mbf_kernels: params, grads and momenta must have the same length, got ",
              params.size(), ", ", grads.size(), ", ", momenta.size());
  std::vector<at::Tensor> grads_c;
  grads_c.reserve(grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_like(p, curvature, "params[i]");
    check_like(grads[i], curvature, "grads[i]");
    check_like(momenta[i], curvature, "momenta[i]");
    TORCH_CHECK(grads[i].sizes() == p.sizes() && momenta[i].sizes() == p.sizes(),
                "mbf_kernels: grads[", i, "] and momenta[", i, "] must have shape ", p.sizes(),
                ", got ", grads[i].sizes(), " and ", momenta[i].sizes());
    TORCH_CHECK(p.is_contiguous() && momenta[i].is_contiguous(), "mbf_kernels: params[", i,
                "] and momenta[", i, "] are updated in place and must be contiguous");
    grads_c.push_back(grads[i].contiguous());
  }
  TORCH_CHECK(segments.size() % kSegmentFields == 0, "mbf_kernels: segments must hold ",
              kSegmentFields, " ints per segment, got ", segments.size());
  const int64_t n_segments = static_cast<int64_t>(segments.size()) / kSegmentFields;
  const auto n_tensors = static_cast<int64_t>(params.size());
  AT_DISPATCH_FLOATING_TYPES(curvature.scalar_type(), "mbf_bucket_step_cpu", [&] {
    using Seg = cpu::StepSegment<scalar_t>;
    std::vector<Seg> segs;
    segs.reserve(n_segments);
    int64_t next_free_tile = 0;
    for (int64_t s = 0; s < n_segments; ++s) {
      const int64_t* f = segments.data() + s * kSegmentFields;
      const int64_t main = f[0], tail = f[1], n = f[2], col = f[3], width = f[4],
                    stride = f[5], tile_offset = f[6], flag_bits = f[7];
      TORCH_CHECK(main >= 0 && main < n_tensors && tail >= -1 && tail < n_tensors,
                  "mbf_kernels: segment ", s, " names tensor ", main, " / ", tail, " of ",
                  n_tensors);
      TORCH_CHECK(width + (tail >= 0 ? 1 : 0) == d, "mbf_kernels: segment ", s,
                  " has blocks of ", width, (tail >= 0 ? " + 1" : ""), " values, the bucket ",
                  d);
      TORCH_CHECK(n >= 0 && col >= 0 && stride >= width, "mbf_kernels: segment ", s,
                  " has a bad layout (n ", n, ", offset ", col, ", stride ", stride, ")");
      TORCH_CHECK(n == 0 || col + (n - 1) * stride + width <= params[main].numel(),
                  "mbf_kernels: segment ", s, " reaches past the end of params[", main, "]");
      TORCH_CHECK(tail < 0 || params[tail].numel() >= n, "mbf_kernels: segment ", s,
                  " needs ", n, " tail values, params[", tail, "] has ",
                  tail < 0 ? 0 : params[tail].numel());
      const int64_t seg_tiles = (n + cpu::kCompactTile - 1) / cpu::kCompactTile;
      TORCH_CHECK(tile_offset >= next_free_tile && tile_offset + seg_tiles <= tiles,
                  "mbf_kernels: segment ", s, " owns tiles [", tile_offset, ", ",
                  tile_offset + seg_tiles, "), which overlap the previous segment's or exceed ",
                  "the ", tiles, " tiles of the state");
      TORCH_CHECK(flag_bits >= 0 && flag_bits < 8 && (flag_bits & 2) <= 2 * (flag_bits & 1),
                  "mbf_kernels: segment ", s, " has bad flags ", flag_bits,
                  " (1: update curvature, 2: first update, which needs 1, 4: refactor)");
      next_free_tile = tile_offset + seg_tiles;
      auto ptr = [&](const at::Tensor& t) { return t.template mutable_data_ptr<scalar_t>(); };
      auto cptr = [&](const at::Tensor& t) { return t.template const_data_ptr<scalar_t>(); };
      const bool has_tail = tail >= 0;
      segs.push_back(Seg{ptr(params[main]) + col, cptr(grads_c[main]) + col,
                         ptr(momenta[main]) + col, has_tail ? ptr(params[tail]) : nullptr,
                         has_tail ? cptr(grads_c[tail]) : nullptr,
                         has_tail ? ptr(momenta[tail]) : nullptr, n, stride, tile_offset,
                         static_cast<int>(width),
                         cpu::StepFlags{(flag_bits & 1) != 0, (flag_bits & 2) != 0,
                                        (flag_bits & 4) != 0}});
    }
    const cpu::StepConfig cfg{lr, momentum_coef, beta, damping, weight_decay,
                              decoupled_weight_decay};
    run_step<scalar_t>(segs, curvature.mutable_data_ptr<scalar_t>(),
                       factor.mutable_data_ptr<scalar_t>(), d, next_free_tile, cfg, stats);
  });
}

void compact_outer_ema_cpu(at::Tensor& F, const at::Tensor& G_in, double beta) {
  TORCH_CHECK(G_in.dim() == 2, "mbf_kernels: G must have shape (N, d), got ", G_in.sizes());
  const int64_t n = G_in.size(0), d = G_in.size(1);
  check_compact(F, n, d, "F");
  check_like(G_in, F, "G");
  TORCH_CHECK(F.is_contiguous(), "mbf_kernels: F is updated in place and must be contiguous");
  const auto G = G_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mbf_compact_outer_ema_cpu", [&] {
    scalar_t* f = F.mutable_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    at::parallel_for(0, F.size(0), tile_grain(d), [&](int64_t b, int64_t e) {
      cpu::compact_outer_ema_tiles<scalar_t>(f, g, n, static_cast<int>(d), b, e,
                                             static_cast<scalar_t>(beta));
    });
  });
}

std::tuple<at::Tensor, at::Tensor> compact_cholesky_ex_cpu(const at::Tensor& F_in, int64_t n,
                                                           double damping) {
  TORCH_CHECK(F_in.dim() == 3, "mbf_kernels: F must be a compact tensor, got ", F_in.sizes());
  const int64_t tri = F_in.size(1);
  const int64_t d = tri_dim(tri);
  check_compact(F_in, n, d, "F");
  const auto F = F_in.contiguous();
  auto factor = at::empty_like(F);
  auto info = at::empty({n}, F.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mbf_compact_cholesky_cpu", [&] {
    const scalar_t* f = F.const_data_ptr<scalar_t>();
    scalar_t* l = factor.mutable_data_ptr<scalar_t>();
    int32_t* inf = info.mutable_data_ptr<int32_t>();
    at::parallel_for(0, F.size(0), tile_grain(d), [&](int64_t b, int64_t e) {
      cpu::compact_cholesky_tiles<scalar_t>(f, l, inf, n, static_cast<int>(d), b, e,
                                            static_cast<scalar_t>(damping));
    });
  });
  return {factor, info};
}

at::Tensor compact_solve_cpu(const at::Tensor& factor_in, const at::Tensor& B_in) {
  TORCH_CHECK(B_in.dim() == 2, "mbf_kernels: B must have shape (N, d), got ", B_in.sizes());
  const int64_t n = B_in.size(0), d = B_in.size(1);
  check_compact(factor_in, n, d, "factor");
  check_like(B_in, factor_in, "B");
  const auto factor = factor_in.contiguous();
  const auto B = B_in.contiguous();
  auto X = with_huge_pages(at::empty_like(B));
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "mbf_compact_solve_cpu", [&] {
    const scalar_t* l = factor.const_data_ptr<scalar_t>();
    const scalar_t* rhs = B.const_data_ptr<scalar_t>();
    scalar_t* x = X.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, factor.size(0), tile_grain(d), [&](int64_t b, int64_t e) {
      cpu::compact_solve_tiles<scalar_t>(l, rhs, x, n, static_cast<int>(d), b, e);
    });
  });
  return X;
}

}  // namespace

TORCH_LIBRARY_IMPL(mbf_kernels, CPU, m) {
  m.impl("cholesky_ex", &cholesky_ex_cpu);
  m.impl("cholesky_solve", &cholesky_solve_cpu);
  m.impl("solve_spd_ex", &solve_spd_ex_cpu);
  m.impl("inv_spd_ex", &inv_spd_ex_cpu);
  m.impl("outer_ema_", &outer_ema_cpu);
  m.impl("mbf_step_", &mbf_step_cpu);
  m.impl("mbf_bucket_step_", &mbf_bucket_step_cpu);
  m.impl("compact_outer_ema_", &compact_outer_ema_cpu);
  m.impl("compact_cholesky_ex", &compact_cholesky_ex_cpu);
  m.impl("compact_solve", &compact_solve_cpu);
}

}  // namespace ops
}  // namespace mbf
