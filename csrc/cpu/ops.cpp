// CPU implementations of the mbf_kernels ops: shape checks, output
// allocation and a parallel split over blocks around the torch-free kernels
// of block_kernels.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "../ops_common.h"
#include "dispatch.h"
#include "mbf/batched.h"
#include "mbf/cpu_features.h"

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

// Denormals flushed to zero on this thread while in scope (x86-64: MXCSR's flush-to-zero and
// denormals-are-zero bits; elsewhere the caller's mode), the caller's mode restored after.
// The optimizer's step ops run each task under one (step_parallel_for), because an EMA whose
// coefficient exceeds 1/2 never decays to zero in IEEE arithmetic: a dead unit's momentum (0.9
// per step, gradient 0) reaches the smallest denormals about 900 steps after the unit died and
// stays there (0.9 times one ulp rounds back to one ulp), and on Intel cores each multiply that
// reads or writes a denormal takes a microcode assist. With a tenth of a Linear(4096, 4096)'s
// rows dead, MBF's step went from 12.5 ms to 83-145 ms and stayed there (bench/RESULTS.md).
// Flushed, such state reaches exactly zero. A float32 value under 1.2e-38 is 30 orders of
// magnitude below anything the step resolves; the linear-algebra ops keep IEEE semantics.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__x86_64__)
    _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero);
#endif
  }
  ~FlushDenormals() {
#if defined(__x86_64__)
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
#if defined(__x86_64__)
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  const unsigned saved_ = _mm_getcsr();
#endif
};

// at::parallel_for for the optimizer's step ops: every task with denormals flushed.
template <typename F>
void step_parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const FlushDenormals flush;
    f(b, e);
  });
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
      cpu::kernels().of<scalar_t>().cholesky_batched(a, l, inf, b, e, d,
                                      static_cast<scalar_t>(damping));
    });
  });
  return {L, info};
}

at::Tensor cholesky_solve_cpu(const at::Tensor& B_in, const at::Tensor& L_in) {
  check_blocks(L_in, "L");
  check_rhs(B_in, L_in);
  // torch.linalg.cholesky returns its factors column-major: such a batch is read in place (its
  // storage is each L^T, row-major) rather than copied, a copy that cost more than the solve.
  const bool transposed = !L_in.is_contiguous() && L_in.transpose(1, 2).is_contiguous();
  const auto L = transposed ? L_in.transpose(1, 2) : L_in.contiguous();
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
      cpu::kernels().of<scalar_t>().cholesky_solve_batched(l, rhs, x, b, e, d, k, transposed);
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
      cpu::kernels().of<scalar_t>().solve_spd_batched(a, rhs, x, inf, b, e, d, k,
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
      cpu::kernels().of<scalar_t>().inv_spd_batched(a, out, inf, b, e, d,
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
      cpu::kernels().of<scalar_t>().outer_ema_batched(f, g, b, e, d, S,
                                       static_cast<scalar_t>(beta));
    });
  });
  if (!in_place) F.copy_(Fc);
}

// Compact tiles per parallel task: about 20 us of work, from the fused step's time per block on
// one thread (AMD Zen 4: 4 ns at d = 1, 15 at d = 9, 80 at d = 17; about 4 + d^3 / 64 ns), so
// that a small bucket stays on one thread: by grain_for's d^3 alone the ReLU autoencoder's
// bucket (64 blocks of d = 17) went to two threads, whose wake-up made its step 27 us against 13
// on one, while a d^3 grain large enough for that left a 33k-block bucket of d = 1 on one
// thread (140 us against 70 on two).
int64_t tile_grain(int64_t d) {
  return 1 + ((int64_t(1) << 20) / (d * d * d + 256)) / kCompactTile;
}

// The fused step over compact tiles [0, n_tiles) of the segments, split across threads;
// adds the counters to stats ([skipped curvature blocks, failed factorisations]).
template <typename T, typename FT = T>
void run_step(const std::vector<cpu::StepSegment<T>>& segs, T* F, FT* factor, int64_t d,
              int64_t n_tiles, const cpu::StepConfig& cfg, at::Tensor& stats,
              const StepTiles<T>& tiles = {}) {
  const auto kernel = [] {
    if constexpr (std::is_same_v<FT, T>) return cpu::kernels().of<T>().mbf_bucket_step_tiles;
    else if constexpr (std::is_same_v<FT, UnitI8>) return cpu::kernels().f32_bucket_step_unit_i8;
    else return cpu::kernels().f32_bucket_step_bf16;
  }();
  std::atomic<int64_t> skipped{0}, failed{0};
  step_parallel_for(0, n_tiles, tile_grain(d), [&](int64_t b, int64_t e) {
    const cpu::StepStats st = kernel(segs.data(), static_cast<int>(segs.size()), F, factor,
                                     static_cast<int>(d), b, e, cfg, tiles);
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
  const int64_t d = check_step(param, grad, momentum, curvature, factor);
  check_stats(stats, param.device());
  const auto g = grad.contiguous();
  const StepConfig cfg{lr, momentum_coef, beta, damping, weight_decay, decoupled_weight_decay};
  const StepFlags flags{update_curvature, first_curvature, refactor};
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "mbf_step_cpu", [&] {
    const std::vector<StepSegment<scalar_t>> whole{
        whole_segment<scalar_t>(param, g, momentum, flags)};
    run_step<scalar_t>(whole, curvature.mutable_data_ptr<scalar_t>(),
                       factor.mutable_data_ptr<scalar_t>(), d, curvature.size(0), cfg, stats);
  });
}

// A grafted measuring pass writes its directions with non-temporal stores from this size on:
// larger than the L3 of the hosts met (32 MiB on the dev VM's EPYC), where they cannot stay
// cached until the writing pass reads them anyway, and a plain store's read of each line
// first is pure traffic. On VGG16-w512 (59 MB of directions) that pass went from 15.3-16.1 ms
// to 14.2-14.3 ms; below it plain stores keep the directions in cache for the writing pass.
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

// One pass of the bucket step over checked tensors (grads contiguous): mbf_bucket_step_'s body,
// shared with BoundBuckets below.
void bucket_pass(at::TensorList params, const std::vector<at::Tensor>& grads,
                 at::TensorList momenta, at::Tensor& curvature, at::Tensor& factor,
                 at::Tensor& stats, at::IntArrayRef segments, int64_t d,
                 const cpu::StepConfig& config, at::TensorList second_moments,
                 const c10::optional<at::Tensor>& tile_damping,
                 const c10::optional<at::Tensor>& tile_scale,
                 const c10::optional<at::Tensor>& tile_norms,
                 const c10::optional<at::Tensor>& directions,
                 const c10::optional<at::Tensor>& block_second_moment, int64_t mode) {
  cpu::StepConfig cfg = config;
  cfg.stream_directions = directions.has_value() && directions->nbytes() >= kStreamMinBytes;
  AT_DISPATCH_FLOATING_TYPES(curvature.scalar_type(), "mbf_bucket_step_cpu", [&] {
    bucket_pass_with<scalar_t>(
        params, grads, momenta, curvature, segments, d, cfg, second_moments, tile_damping,
        tile_scale, tile_norms, directions, block_second_moment, mode, /*tile_sums=*/true,
        [&](const auto& segs, const cpu::StepConfig& cfg, const auto& tiles, int64_t used) {
          with_factor<scalar_t, FactorReaders::kCpu>(factor, [&](auto* L) {
            run_step<scalar_t>(segs, curvature.mutable_data_ptr<scalar_t>(), L, d, used, cfg,
                               stats, tiles);
          });
        });
  });
}

// The step for a whole bucket (segments: see registration.cpp).
void mbf_bucket_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                         at::Tensor& curvature, at::Tensor& factor, at::Tensor& stats,
                         at::IntArrayRef segments, double lr, double momentum_coef, double beta,
                         double damping, double weight_decay, bool decoupled_weight_decay,
                         at::TensorList second_moments,
                         const c10::optional<at::Tensor>& tile_damping,
                         const c10::optional<at::Tensor>& tile_scale,
                         const c10::optional<at::Tensor>& tile_norms,
                         const c10::optional<at::Tensor>& directions, double beta2, double eps,
                         int64_t mode, const c10::optional<at::Tensor>& block_second_moment) {
  const int64_t d = check_bucket(params, grads, momenta, curvature, factor, stats,
                                 FactorReaders::kCpu);
  const cpu::StepConfig cfg{lr, momentum_coef, beta, damping, weight_decay,
                            decoupled_weight_decay, beta2, eps};
  bucket_pass(params, contiguous_all(grads), momenta, curvature, factor, stats, segments, d, cfg,
              second_moments, tile_damping, tile_scale, tile_norms, directions,
              block_second_moment, mode);
}

void compact_outer_ema_cpu(at::Tensor& F, const at::Tensor& G_in, double beta) {
  const int64_t d = check_compact_outer_ema(F, G_in);
  const int64_t n = G_in.size(0);
  const auto G = G_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mbf_compact_outer_ema_cpu", [&] {
    scalar_t* f = F.mutable_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    at::parallel_for(0, F.size(0), tile_grain(d), [&](int64_t b, int64_t e) {
      cpu::kernels().of<scalar_t>().compact_outer_ema_tiles(f, g, n, static_cast<int>(d), b, e,
                                             static_cast<scalar_t>(beta));
    });
  });
}

std::tuple<at::Tensor, at::Tensor> compact_cholesky_ex_cpu(const at::Tensor& F_in, int64_t n,
                                                           double damping) {
  const int64_t d = check_compact_cholesky(F_in, n);
  const auto F = F_in.contiguous();
  auto factor = at::empty_like(F);
  auto info = at::empty({n}, F.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "mbf_compact_cholesky_cpu", [&] {
    const scalar_t* f = F.const_data_ptr<scalar_t>();
    scalar_t* l = factor.mutable_data_ptr<scalar_t>();
    int32_t* inf = info.mutable_data_ptr<int32_t>();
    at::parallel_for(0, F.size(0), tile_grain(d), [&](int64_t b, int64_t e) {
      cpu::kernels().of<scalar_t>().compact_cholesky_tiles(f, l, inf, n, static_cast<int>(d), b, e,
                                            static_cast<scalar_t>(damping));
    });
  });
  return {factor, info};
}

at::Tensor compact_solve_cpu(const at::Tensor& factor_in, const at::Tensor& B_in) {
  const int64_t d = check_compact_solve(factor_in, B_in);
  const int64_t n = B_in.size(0);
  const auto factor = factor_in.contiguous();
  const auto B = B_in.contiguous();
  auto X = with_huge_pages(at::empty_like(B));
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "mbf_compact_solve_cpu", [&] {
    const scalar_t* l = factor.const_data_ptr<scalar_t>();
    const scalar_t* rhs = B.const_data_ptr<scalar_t>();
    scalar_t* x = X.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, factor.size(0), tile_grain(d), [&](int64_t b, int64_t e) {
      cpu::kernels().of<scalar_t>().compact_solve_tiles(l, rhs, x, n, static_cast<int>(d), b, e);
    });
  });
  return X;
}

// Grafting's rescaling of a unit from the sums of its blocks' squared norms (pairs with a
// non-finite value left out by the caller): sqrt(sum |a|^2 / sum |u|^2), 0 where sum |u|^2 = 0.
double graft_ratio(double su, double sa) { return su > 0 ? std::sqrt(sa / su) : 0.0; }

// Rows of `width` elements per parallel task of the element-wise row ops: about 64k elements.
int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(width, 1));
}

std::tuple<at::Tensor, at::Tensor> graft_rows_cpu(
    at::Tensor& m, const c10::optional<at::Tensor>& second_moment,
    const c10::optional<at::Tensor>& grad_weight, const c10::optional<at::Tensor>& grad_bias,
    double momentum, double beta2, double eps, const c10::optional<at::Tensor>& basis,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& apply_weight, double decay,
    const c10::optional<at::Tensor>& coef) {
  TORCH_CHECK(m.dim() == 2 && m.is_contiguous(),
              "mbf_kernels: graft_rows_ takes contiguous (n, d) rows m, got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble,
              "mbf_kernels: graft_rows_ needs float32 or float64 rows, got ", m.scalar_type());
  if (second_moment.has_value()) {
    TORCH_CHECK(second_moment->is_contiguous() && second_moment->sizes() == m.sizes(),
                "mbf_kernels: graft_rows_ takes contiguous v and m of one shape, got ",
                second_moment->sizes(), " and ", m.sizes());
    check_like(*second_moment, m, "v");
  }
  const int64_t n = m.size(0), d = m.size(1);
  const bool has_bias = grad_bias.has_value();
  const int64_t width = grad_weight.has_value() ? grad_weight->numel() / std::max<int64_t>(n, 1)
                                                : d - (has_bias ? 1 : 0);
  if (grad_weight.has_value()) {
    check_like(*grad_weight, m, "grad_weight");
    TORCH_CHECK(grad_weight->is_contiguous() && grad_weight->numel() == n * width &&
                    (width == d || width == d - 1),
                "mbf_kernels: graft_rows_: grad_weight must be contiguous with n rows of d or ",
                "d - 1 values, got ", grad_weight->sizes(), " for rows ", m.sizes());
  }
  if (has_bias) {
    check_like(*grad_bias, m, "grad_bias");
    TORCH_CHECK(grad_bias->is_contiguous() && grad_bias->numel() == n && width == d - 1,
                "mbf_kernels: graft_rows_: grad_bias must be contiguous with n values, the ",
                "rows' last column, got ", grad_bias->sizes(), " for rows ", m.sizes());
  }
  int64_t k = 0;
  at::Tensor basis_t;  // V^T, k x d: the projection's inner loop runs along d
  if (basis.has_value()) {
    check_like(*basis, m, "basis");
    TORCH_CHECK(basis->dim() == 2 && basis->size(0) == d,
                "mbf_kernels: graft_rows_: basis must be (d, k) for rows ", m.sizes(), ", got ",
                basis->sizes());
    k = basis->size(1);
    basis_t = basis->t().contiguous();
  }
  const bool apply = weight.has_value();
  if (apply) {  // the update in the same pass (see registration.cpp)
    TORCH_CHECK(k > 0 && apply_weight.has_value() && coef.has_value() && coef->numel() == 1 &&
                    apply_weight->numel() == k && apply_weight->is_contiguous(),
                "mbf_kernels: graft_rows_: an update needs the basis, apply_weight (k,) and a ",
                "one-element coef");
    check_like(*weight, m, "weight");
    check_like(*apply_weight, m, "apply_weight");
    const int64_t w_width = d - (bias.has_value() ? 1 : 0);
    TORCH_CHECK(weight->is_contiguous() && weight->numel() == n * w_width &&
                    (!bias.has_value() || (bias->is_contiguous() && bias->numel() == n)) &&
                    (!grad_weight.has_value() || w_width == width),
                "mbf_kernels: graft_rows_: weight must be contiguous with n rows of ", w_width,
                " values (and bias n values), got ", weight->sizes());
    if (bias.has_value()) check_like(*bias, m, "bias");
  }
  auto sq = at::empty({n, 2}, m.options());
  auto projection = at::empty({n, k}, m.options());
  // T diag(apply_weight) (-coef), the update's rank-k rows
  auto scaled = apply ? at::empty({n, k}, m.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "mbf_graft_rows_cpu", [&] {
    scalar_t* vp =
        second_moment.has_value() ? second_moment->mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* mp = m.mutable_data_ptr<scalar_t>();
    const scalar_t* gw =
        grad_weight.has_value() ? grad_weight->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gb = has_bias ? grad_bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = sq.mutable_data_ptr<scalar_t>();
    const scalar_t* vt = k > 0 ? basis_t.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* proj = projection.mutable_data_ptr<scalar_t>();
    const auto& kern = cpu::kernels().of<scalar_t>();
    const int64_t grain = row_grain(d);
    scalar_t* wp = apply ? weight->mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* bp = apply && bias.has_value() ? bias->mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* aw = apply ? apply_weight->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* ts = apply ? scaled.mutable_data_ptr<scalar_t>() : nullptr;
    const auto a = static_cast<scalar_t>(decay);
    const scalar_t c = apply ? coef->item<scalar_t>() : scalar_t(0);
    const int64_t w_width = d - (bp != nullptr ? 1 : 0);
    // Rows per round of row pass then projection: about 16 KB of m, half of the smallest L1
    // (and at least the 4 rows project_rows takes at a time). With the update, at least the 8
    // that scaled_add_rows takes at a time at AVX-512 (each load of V^T serves 8 rows): on
    // 4096 x 4097 rows, k = 16, Zen 4, 12.7 ms at 4 rows, 11.5 at 8 and 16, 12.3 at 32.
    const int64_t rows_per_round =
        k > 0 ? std::max<int64_t>(apply ? 8 : 4,
                                  (int64_t(16) << 10) / (d * int64_t(sizeof(scalar_t))) / 4 * 4)
              : grain;
    // Rows whose length is not a whole number of cache lines (a 4097-wide row of weights and
    // bias) start anywhere in a line, and then most vector loads of the projection and the
    // update split across two lines: those passes read an aligned copy of the round's rows,
    // which the row pass writes while the values are in registers, and V^T padded alike (zeros
    // past d). Intel Xeon VM, one thread, rows in cache, k = 16: projection 0.43 -> 0.27 ns and
    // update 0.44 -> 0.33 ns per row entry at d = 4097 against 4096.
    const int64_t line = 64 / int64_t(sizeof(scalar_t));
    const bool padded = k > 0 && d % line != 0;
    const int64_t ld = padded ? (d + line - 1) / line * line : d;
    at::Tensor vt_padded;
    if (padded) {
      vt_padded = at::zeros({k, ld}, m.options());
      vt_padded.narrow(1, 0, d).copy_(basis_t);
    }
    const scalar_t* vtp = padded ? vt_padded.const_data_ptr<scalar_t>() : vt;
    step_parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
      // A thread's range is its whole share of the rows (tens of MB on a large layer): the
      // projection follows the row pass a few rows at a time, so that it reads the rows just
      // written from L1, not again from memory (Linear(4096, 4096) on the Zen 3 dev VM: the
      // projection's share 8.0 -> 6.3 ms in medians of interleaved runs, against rounds of a
      // 256 KB grain, whose rows it read from L2).
      const at::Tensor copy =
          padded ? at::zeros({rows_per_round, ld}, m.options()) : at::Tensor();
      scalar_t* cp = padded ? copy.mutable_data_ptr<scalar_t>() : nullptr;
      for (int64_t b0 = b; b0 < e; b0 += rows_per_round) {
        const int64_t e0 = std::min(e, b0 + rows_per_round), rows = e0 - b0;
        kern.graft_rows(mp, vp, gw, gb, width, d, b0, e0, static_cast<scalar_t>(momentum),
                        static_cast<scalar_t>(beta2), static_cast<scalar_t>(eps), out, cp, ld);
        if (k == 0) continue;
        const scalar_t* round = padded ? cp : mp + b0 * d;  // the round's rows, ld apart
        kern.project_rows(round, ld, 0, rows, vtp, k, proj + b0 * k);
        if (!apply) continue;
        // The same rows' update while they are in L1: p = decay p + c m + (T w (-c)) V^T.
        for (int64_t r = b0; r < e0; ++r)
          for (int64_t q = 0; q < k; ++q) ts[r * k + q] = proj[r * k + q] * aw[q] * -c;
        kern.scaled_add_rows(wp + b0 * w_width, w_width, round, ld, ts + b0 * k, k, vtp, ld,
                             w_width, 0, rows, a, c);
        if (bp != nullptr)
          kern.scaled_add_rows(bp + b0, 1, round + w_width, ld, ts + b0 * k, k, vtp + w_width, ld,
                               1, 0, rows, a, c);
      }
    });
  });
  return {sq, projection};
}

void scaled_add_cpu(at::Tensor& p, const at::Tensor& u, double decay, const at::Tensor& coef,
                    const c10::optional<at::Tensor>& t,
                    const c10::optional<at::Tensor>& basis_t) {
  TORCH_CHECK(p.dim() >= 1 && p.dim() <= 2 && p.is_contiguous() && u.sizes() == p.sizes() &&
                  (p.dim() == 1 || u.stride(1) == 1),
              "mbf_kernels: scaled_add_ takes a contiguous 1-D or 2-D p and a u of its shape "
              "whose rows are contiguous, got ", p.sizes(), " and ", u.sizes(), " strides ",
              u.strides());
  check_like(u, p, "u");
  TORCH_CHECK(coef.numel() == 1, "mbf_kernels: scaled_add_: coef must have one element");
  TORCH_CHECK(t.has_value() == basis_t.has_value(),
              "mbf_kernels: scaled_add_: t and basis_t come together");
  const int64_t n = p.size(0), w = p.dim() == 2 ? p.size(1) : 1;
  int64_t k = 0, vt_ld = 0;
  if (t.has_value()) {
    check_like(*t, p, "t");
    check_like(*basis_t, p, "basis_t");
    k = t->dim() == 2 ? t->size(1) : -1;
    const bool vt_ok = basis_t->dim() == 2 && basis_t->size(0) == k &&
                       basis_t->size(1) == w && (w == 1 || basis_t->stride(1) == 1);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->is_contiguous() && vt_ok,
                "mbf_kernels: scaled_add_: t must be a contiguous (n, k) and basis_t a (k, w) "
                "with contiguous rows, for p ", p.sizes(), ", got ", t->sizes(), " and ",
                basis_t->sizes(), " strides ", basis_t->strides());
    vt_ld = basis_t->stride(0);
  }
  const int64_t u_row = n > 0 ? u.stride(0) : 0;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "mbf_scaled_add_cpu", [&] {
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* tp = k > 0 ? t->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* vt = k > 0 ? basis_t->const_data_ptr<scalar_t>() : nullptr;
    const auto a = static_cast<scalar_t>(decay), c = coef.item<scalar_t>();
    const auto& kern = cpu::kernels().of<scalar_t>();
    step_parallel_for(0, n, row_grain(w * (k + 1)), [&](int64_t b, int64_t e) {
      kern.scaled_add_rows(pp, w, up, u_row, tp, k, vt, vt_ld, w, b, e, a, c);
    });
  });
}

// Y = G^T (G omega) and |G|^2 of a low-rank shared block's refresh, straight from the gradient
// (registration.cpp; mbf/batched.h sketch_rows): each thread accumulates its rows into its own
// Y^T, summed at the end.
std::tuple<at::Tensor, at::Tensor> sketch_rows_cpu(const at::Tensor& grad_weight,
                                                   const c10::optional<at::Tensor>& grad_bias,
                                                   const at::Tensor& omega) {
  TORCH_CHECK(grad_weight.dim() == 2 && grad_weight.is_contiguous(),
              "mbf_kernels: sketch_rows takes contiguous (n, width) weight gradient rows, got ",
              grad_weight.sizes());
  TORCH_CHECK(grad_weight.scalar_type() == at::kFloat || grad_weight.scalar_type() == at::kDouble,
              "mbf_kernels: sketch_rows needs float32 or float64, got ",
              grad_weight.scalar_type());
  const int64_t n = grad_weight.size(0), width = grad_weight.size(1);
  const bool has_bias = grad_bias.has_value();
  const int64_t d = width + (has_bias ? 1 : 0);
  if (has_bias) {
    check_like(*grad_bias, grad_weight, "grad_bias");
    TORCH_CHECK(grad_bias->is_contiguous() && grad_bias->numel() == n,
                "mbf_kernels: sketch_rows: grad_bias must be contiguous with ", n,
                " values, got ", grad_bias->sizes());
  }
  check_like(omega, grad_weight, "omega");
  TORCH_CHECK(omega.dim() == 2 && omega.size(0) == d && omega.size(1) >= 1,
              "mbf_kernels: sketch_rows: omega must be (", d, ", s) for rows of ", d,
              " values, got ", omega.sizes());
  const int64_t s = omega.size(1);
  // Omega^T and Y^T with rows padded to a stride of 16 values plus 16: at a stride of d values
  // (16388 B at d = 4097) every row of either starts in the same L1 set, and the s rows the
  // accumulation touches per column evicted each other (2.6x slower at s = 20, dev VM).
  const int64_t ld = (d + 15) / 16 * 16 + 16;
  auto omega_t = at::zeros({s, ld}, omega.options());
  omega_t.narrow(1, 0, d).copy_(omega.t());
  const int64_t threads = at::get_num_threads();
  auto y_t = at::zeros({threads, s, ld}, omega.options());
  auto t = at::empty({n, s}, omega.options());
  std::vector<double> sq(threads, 0.0);
  AT_DISPATCH_FLOATING_TYPES(grad_weight.scalar_type(), "mbf_sketch_rows_cpu", [&] {
    const scalar_t* gw = grad_weight.const_data_ptr<scalar_t>();
    const scalar_t* gb = has_bias ? grad_bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ot = omega_t.const_data_ptr<scalar_t>();
    scalar_t* tp = t.mutable_data_ptr<scalar_t>();
    scalar_t* yp = y_t.mutable_data_ptr<scalar_t>();
    const auto& kern = cpu::kernels().of<scalar_t>();
    step_parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
      const int64_t tid = at::get_thread_num();  // one accumulator per thread
      TORCH_CHECK(tid >= 0 && tid < threads, "mbf_kernels: sketch_rows: thread ", tid,
                  " outside the ", threads, " intra-op threads it planned for");
      sq[tid] += kern.sketch_rows(gw, gb, width, b, e, ot, ld, s, tp, yp + tid * s * ld);
    });
  });
  const double total = std::accumulate(sq.begin(), sq.end(), 0.0);
  return {y_t.sum(0).narrow(1, 0, d).t().contiguous(), at::scalar_tensor(total, omega.options())};
}

// The size from which a shared block's GEMM runs on oneDNN (ops_common.h). MKL's sgemm runs AVX2
// code on AMD CPUs; oneDNN's float32 matmul (brg_matmul:avx512_core) uses AVX-512 where it runs.
// On an AVX-512 CPU (the dev VM's AMD EPYC, Zen 5) oneDNN took 64 x 513 by 513 x 513 in 124 us
// against MKL's 225 and 128 x 257 by 257 x 257 in 56 against 101, but 16 x 65 by 65 x 65 in 15
// against 4 (its call's fixed cost): from 8 MFLOP. On an AVX2-only CPU (AMD EPYC Zen 3, 2
// threads) its AVX2 kernel lost to MKL at every size up to 270 MFLOP (1.04-1.46x MKL's time:
// 128 x 257 in 218 against 180 us) and won only at 4.3 GFLOP (0.91x): from 1 GFLOP there
// (bench/RESULTS.md, "oneDNN or MKL by CPU").
// `side_by_side`: a GEMM on one thread while the others run other blocks (for_each_gemm_block).
// On AMD's family 25 (Zen 3; Zen 4, whose AVX-512 runs on 256-bit units) MKL won there (Zen 4:
// 128 x 257 in 183 us against 188, 256 x 129 in 96 against 108), while on both threads oneDNN
// won on Zen 4 (107 against 113 us, and 10 x 4097 in 4.3 ms against MKL's 9.3): from 1 GFLOP
// side by side on family 25.
double default_onednn_gemm_min_flops(bool side_by_side) {
  static const bool family_25 = cpu::amd_family_25();
  if (side_by_side && family_25) return double(1 << 30);
  return cpu::cpu_runs_level("avx512") ? 8.0 * (1 << 20) : double(1 << 30);
}

std::atomic<double> g_onednn_gemm_min_flops{-1.0};  // negative: this CPU's default

// out = m inv for a shared block's rows, inv symmetric (registration.cpp): a GEMM of at least
// onednn_gemm_min_flops() on oneDNN's float32 matmul (torch's mkldnn::_linear_pointwise, m W^T;
// strict float32, no down-conversion), smaller ones on torch's mm (MKL).
const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op.has_value() ? &*op : nullptr;
}

// A bfloat16 inverse beside float32 rows (shared_matmul="bfloat16", docs/options.md): the
// rows are rounded to bfloat16 and the product, accumulated in float32 by oneDNN (where the CPU
// has AVX512_BF16 or AMX, twice the float32 rate: 64 x 513 rows 208 -> 122 us on 2 Zen 4
// threads), is rounded to bfloat16 and widened into `out`: U = bf16(bf16(M) bf16(inv)).
bool bf16_apply(const at::Tensor& m, const at::Tensor& inverse) {
  return inverse.scalar_type() == at::kBFloat16 && m.scalar_type() == at::kFloat;
}

// The inverse in the rows' dtype, or bfloat16 beside float32 rows, on their device.
void check_inverse(const at::Tensor& inverse, const at::Tensor& m) {
  if (!bf16_apply(m, inverse)) return check_like(inverse, m, "inverse");
  TORCH_CHECK(inverse.device() == m.device(), "mbf_kernels: inverse must be on ", m.device(),
              ", got ", inverse.device());
}

void apply_inverse_cpu(at::Tensor& out, const at::Tensor& m, const at::Tensor& inverse) {
  TORCH_CHECK(m.dim() == 2 && inverse.dim() == 2 && inverse.size(0) == m.size(1) &&
                  inverse.size(1) == m.size(1) && out.sizes() == m.sizes(),
              "mbf_kernels: apply_inverse_ takes (n, d) out and rows and a (d, d) inverse, got ",
              out.sizes(), ", ", m.sizes(), ", ", inverse.sizes());
  check_like(out, m, "out");
  check_inverse(inverse, m);
  if (bf16_apply(m, inverse)) {
    // torch's mm: oneDNN's bfloat16 matmul where torch finds the CPU able (AVX-512 or
    // AVX-NE-CONVERT), its own bfloat16 GEMM elsewhere (float32 sums either way); calling
    // mkldnn::_linear_pointwise directly, 5% faster here, would fail on an AVX2-only CPU.
    out.copy_(at::mm(m.to(at::kBFloat16), inverse));
    return;
  }
  const double flops = 2.0 * double(m.size(0)) * double(m.size(1)) * double(m.size(1));
  // linear(m, W) = m W^T: W = inverse read row-major (inverse symmetric), or inverse^T where
  // that is the row-major view (exact for any inverse). oneDNN reads a column-major W through a
  // reorder: 50x slower.
  const at::Tensor weight = inverse.is_contiguous() ? inverse : inverse.mT();
  const c10::OperatorHandle* op = onednn_linear();
  if (op != nullptr && flops >= onednn_gemm_min_flops(at::in_parallel_region()) &&
      m.scalar_type() == at::kFloat &&
      m.is_contiguous() && weight.is_contiguous()) {
    torch::jit::Stack stack{m, weight, c10::IValue(), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    op->callBoxed(&stack);
    out.copy_(stack.back().toTensor());
    return;
  }
  at::mm_out(out, m, inverse);
}

// sum_j x_j^2 in eight independent partial sums, which the compiler keeps in vector registers
// (this file is built for baseline x86-64): one running sum made U's row norms a chain of
// dependent adds, 14% of the autoencoder's grafted step on one Zen 3 thread.
template <typename T>
T sum_of_squares(const T* x, int64_t n) {
  constexpr int kParts = 8;
  T part[kParts] = {};
  int64_t j = 0;
  for (; j + kParts <= n; j += kParts)
    for (int l = 0; l < kParts; ++l) part[l] += x[j + l] * x[j + l];
  for (; j < n; ++j) part[0] += x[j] * x[j];
  T sum = T(0);
  for (int l = 0; l < kParts; ++l) sum += part[l];
  return sum;
}

// Runs fn(i) for each block i of `which` inside one parallel region, each block on one thread
// (the libraries it calls then run sequentially), the largest `cost` first to the thread with
// the least work so far.
template <typename Fn>
void run_side_by_side(const std::vector<int64_t>& cost, const std::vector<size_t>& which,
                      Fn&& fn) {
  const int64_t threads = at::get_num_threads();
  std::vector<size_t> order(which);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return cost[a] > cost[b]; });
  std::vector<int64_t> load(threads, 0), owner(cost.size(), -1);
  for (size_t i : order) {
    const auto t = std::min_element(load.begin(), load.end()) - load.begin();
    owner[i] = t;
    load[t] += cost[i];
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (size_t i : which)
      if (owner[i] >= t0 && owner[i] < t1) fn(i);
  });
}

// The same for every block.
template <typename Fn>
void run_side_by_side(const std::vector<int64_t>& cost, Fn&& fn) {
  std::vector<size_t> all(cost.size());
  std::iota(all.begin(), all.end(), size_t(0));
  run_side_by_side(cost, all, fn);
}

// Runs fn(i) for every block i of `elems[i]` elements. A block large enough to split runs its
// own rows in parallel (row_grain), so those go one after another; when every block is smaller
// than that (a small MLP's: each would run on one thread, the others idle), the blocks
// themselves are shared among the threads (run_side_by_side: taken in order, the ReLU
// autoencoder's seven GEMMs had put 239 us on one thread and 211 on the other, its seven
// factorisations twice the work on one thread as on the other).
// `grain`: the size from which a block splits (row_grain's elements, or another measure of
// work in the same units as `elems`).
template <typename Fn>
void for_each_block(const std::vector<int64_t>& elems, Fn&& fn, int64_t grain = row_grain(1)) {
  const int64_t total = std::accumulate(elems.begin(), elems.end(), int64_t(0));
  const bool split = std::any_of(elems.begin(), elems.end(),
                                 [&](int64_t e) { return e > grain; });
  if (at::get_num_threads() == 1 || elems.size() < 2 || split || total == 0) {
    for (size_t i = 0; i < elems.size(); ++i) fn(i);
    return;
  }
  run_side_by_side(elems, fn);
}

// A GEMM of up to this many flops runs on one thread where a step's GEMMs are shared among the
// threads (for_each_gemm_block). The ReLU autoencoder's seven shared blocks (0.1 to 17 MFLOP
// each, 39 in all, AMD Zen 3, 2 threads): 365-405 us one after another on both threads,
// 550-615 us on one thread; split between the two threads the cached grafted step went from
// 0.64-0.81 to 0.59-0.67 ms (medians of alternating runs).
constexpr int64_t kGemmGrain = int64_t(1) << 26;

// The work of a step over blocks i, each a GEMM of 2 n d^2 flops over its (n, d) `rows` between
// element-wise passes over its `elems[i]` elements (`before`, `gemm`, `after`: fn(i) each).
// Where the GEMMs can be shared evenly (none more than a thread's share of the total flops,
// none above kGemmGrain), each block's three run one after another on one thread, the blocks
// side by side (run_side_by_side, by flops): its rows stay in that core's cache, and no
// barrier separates the passes (the passes shared by elements and the GEMMs by flops had put
// a block's rows on one core and its GEMM on the other: the ReLU autoencoder's grafted step
// 636 us against 379 while the VM's second core ran slow). Otherwise each pass runs over all
// blocks (for_each_block), the GEMMs one after another, each on all threads (a layer far wider
// than the others would run on one thread).
template <typename Before, typename Gemm, typename After>
void for_each_gemm_block(const std::vector<int64_t>& flops, const std::vector<int64_t>& elems,
                         Before&& before, Gemm&& gemm, After&& after) {
  const size_t n = flops.size();
  const int64_t total = std::accumulate(flops.begin(), flops.end(), int64_t(0));
  const int64_t largest = flops.empty() ? 0 : *std::max_element(flops.begin(), flops.end());
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && n > 1 && largest <= kGemmGrain && largest * threads <= total) {
    run_side_by_side(flops, [&](size_t i) {
      before(i);
      gemm(i);
      after(i);
    });
    return;
  }
  for_each_block(elems, before);
  for (size_t i = 0; i < n; ++i) gemm(i);
  for_each_block(elems, after);
}

// 2 n d^2: the flops of a block's (n, d) rows times a (d, d) matrix.
int64_t gemm_flops(const at::Tensor& rows) { return 2 * rows.numel() * rows.size(1); }

std::vector<int64_t> gemm_flops(at::TensorList rows) {
  std::vector<int64_t> flops(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) flops[i] = gemm_flops(rows[i]);
  return flops;
}

// Each block's first entry (its weight; its bias follows) in a list of `total` entries laid out
// by params_per_block (1 or 2 each: a weight and at most a bias), checked; `op` and `what` (the
// list's entries, "parameters" or "gradients") name what is wrong.
std::vector<size_t> block_offsets(at::IntArrayRef params_per_block, size_t total, const char* op,
                                  const char* what) {
  std::vector<size_t> first(params_per_block.size());
  size_t next = 0;
  for (size_t i = 0; i < first.size(); ++i) {
    const int64_t count = params_per_block[i];
    TORCH_CHECK((count == 1 || count == 2) && next + count <= total, "mbf_kernels: ", op,
                ": a block has a weight and at most a bias, one of the ", what, " each");
    first[i] = next;
    next += count;
  }
  TORCH_CHECK(next == total, "mbf_kernels: ", op, ": ", total, " ", what,
              " for blocks that have ", next);
  return first;
}

// One grafted step of shared blocks (registration.cpp), exact or kept at a rank. Per exact
// block: the row pass (m, v, Adam's row norms), U = M (F + damping I)^{-1} into the work rows,
// U's row norms, the block's coefficient -lr |a| / |u| (rows whose u or a is not finite count
// as 0; `lagged`: -lr times the block's entry of `ratios`, which then receives |a| / |u| either
// way), and p = decay p + coef U. Per block at a rank (bases[i]: V^T, (k, d); apply_weights[i]:
// w): the row pass with T = M V, |u_j|^2 from |m_j|^2 and T (LowRankCurvature.row_squares), and
// p = decay p + coef (M - T diag(w) V^T), in the row pass itself where `lagged`. On a small MLP
// the same in torch calls from Python cost more than the GEMMs themselves (about 10 calls per
// block; on VGG16-w512's 512-wide head, two blocks at rank 16 and one exact, 1 ms of Python).
// Every block is checked before any is touched; each block's row pass, GEMM and update by
// for_each_gemm_block.
void shared_graft_step_cpu(at::TensorList momenta, at::TensorList second_moments,
                           at::TensorList work, at::TensorList inverses, at::TensorList bases,
                           at::TensorList apply_weights, at::TensorList params,
                           const c10::List<c10::optional<at::Tensor>>& grads,
                           at::IntArrayRef params_per_block, at::ArrayRef<double> adam_scale,
                           at::ArrayRef<double> adam_eps, double momentum, double beta2,
                           double lr, double decay, at::Tensor& ratios, bool lagged) {
  const size_t n_blocks = momenta.size();
  TORCH_CHECK(second_moments.size() == n_blocks && work.size() == n_blocks &&
                  inverses.size() == n_blocks && params_per_block.size() == n_blocks &&
                  adam_scale.size() == n_blocks && adam_eps.size() == n_blocks &&
                  grads.size() == params.size(),
              "mbf_kernels: shared_graft_step_ takes one m, v, work, inverse, parameter count, "
              "scale and eps per block and one gradient per parameter");
  TORCH_CHECK((bases.empty() && apply_weights.empty()) ||
                  (bases.size() == n_blocks && apply_weights.size() == n_blocks),
              "mbf_kernels: shared_graft_step_ takes no bases and apply_weights (every block "
              "exact) or one of each per block (empty for an exact block)");
  const std::vector<size_t> first =
      block_offsets(params_per_block, params.size(), "shared_graft_step_", "parameters");
  TORCH_CHECK(ratios.dim() == 1 && ratios.numel() == static_cast<int64_t>(n_blocks) &&
                  ratios.is_contiguous() && ratios.device().is_cpu() &&
                  (n_blocks == 0 || ratios.scalar_type() == momenta[0].scalar_type()),
              "mbf_kernels: shared_graft_step_: ratios must be a contiguous CPU tensor of one "
              "value per block in the rows' dtype, got ", ratios.sizes());
  const auto ranked = [&](size_t i) { return !bases.empty() && bases[i].numel() > 0; };
  std::vector<int64_t> elems(n_blocks), flops(n_blocks);
  for (size_t i = 0; i < n_blocks; ++i) {
    const at::Tensor& m = momenta[i];
    const int64_t count = params_per_block[i];
    const size_t weight_at = first[i];
    TORCH_CHECK(m.dim() == 2 && m.is_contiguous() && work[i].sizes() == m.sizes() &&
                    work[i].is_contiguous(),
                "mbf_kernels: shared_graft_step_: block ", i, " needs contiguous (n, d) m and "
                "work rows, got ", m.sizes(), ", ", work[i].sizes());
    check_like(work[i], m, "work");
    const int64_t n = m.size(0), d = m.size(1), width = count == 2 ? d - 1 : d;
    if (ranked(i)) {
      const at::Tensor& vt = bases[i];
      TORCH_CHECK(vt.dim() == 2 && vt.size(1) == d && vt.is_contiguous() &&
                      apply_weights[i].numel() == vt.size(0) && apply_weights[i].is_contiguous(),
                  "mbf_kernels: shared_graft_step_: block ", i, " at a rank needs a contiguous "
                  "(k, ", d, ") V^T and k weights, got ", vt.sizes(), " and ",
                  apply_weights[i].sizes());
      check_like(vt, m, "basis");
      check_like(apply_weights[i], m, "apply_weight");
      flops[i] = 4 * n * d * vt.size(0);
    } else {
      TORCH_CHECK(inverses[i].dim() == 2 && inverses[i].size(0) == d && inverses[i].size(1) == d,
                  "mbf_kernels: shared_graft_step_: exact block ", i, " needs a (d, d) inverse "
                  "for its ", m.sizes(), " rows, got ", inverses[i].sizes());
      check_inverse(inverses[i], m);
      flops[i] = gemm_flops(m);
    }
    const at::Tensor& weight = params[weight_at];
    TORCH_CHECK(weight.is_contiguous() && weight.numel() == n * width &&
                    (count == 1 || (params[weight_at + 1].is_contiguous() &&
                                    params[weight_at + 1].numel() == n)),
                "mbf_kernels: shared_graft_step_: block ", i, "'s parameters must be contiguous ",
                n, " x ", width, (count == 2 ? " and " : ""), (count == 2 ? std::to_string(n) : ""));
    check_like(weight, m, "weight");
    if (count == 2) check_like(params[weight_at + 1], m, "bias");
    elems[i] = n * d;
  }
  // the row passes, as graft_rows_ (at a rank: with T = M V; lagged, with the update)
  std::vector<at::Tensor> rows(n_blocks), projections(n_blocks);
  const auto row_pass = [&](size_t i) {
    const bool bias = params_per_block[i] == 2;
    at::Tensor m = momenta[i], v = second_moments[i];
    const auto grad_bias = bias ? grads.get(first[i] + 1) : c10::nullopt;
    if (!ranked(i)) {
      rows[i] = std::get<0>(graft_rows_cpu(m, v, grads.get(first[i]), grad_bias, momentum, beta2,
                                           adam_eps[i], c10::nullopt, c10::nullopt,
                                           c10::nullopt, c10::nullopt, 1.0, c10::nullopt));
      return;
    }
    const at::Tensor basis = bases[i].t();  // V, (d, k): graft_rows_ reads V^T, no copy
    c10::optional<at::Tensor> weight, bias_p, aw, coef;
    if (lagged) {  // at the ratio stored before (read here, before this block's update sets it)
      weight = params[first[i]];
      if (bias) bias_p = params[first[i] + 1];
      aw = apply_weights[i];
      coef = ratios.narrow(0, static_cast<int64_t>(i), 1).mul(-lr);
    }
    std::tie(rows[i], projections[i]) =
        graft_rows_cpu(m, v, grads.get(first[i]), grad_bias, momentum, beta2, adam_eps[i],
                       basis, weight, bias_p, aw, decay, coef);
  };
  const auto gemm = [&](size_t i) {
    if (!ranked(i)) apply_inverse_cpu(const_cast<at::Tensor&>(work[i]), momenta[i], inverses[i]);
  };
  const auto update = [&](size_t i) {
    const int64_t n = momenta[i].size(0), d = momenta[i].size(1);
    const bool has_bias = params_per_block[i] == 2;
    const int64_t width = has_bias ? d - 1 : d;
    AT_DISPATCH_FLOATING_TYPES(momenta[i].scalar_type(), "mbf_shared_graft_step_cpu", [&] {
      const scalar_t* sq = rows[i].const_data_ptr<scalar_t>();
      const int64_t k = ranked(i) ? bases[i].size(0) : 0;
      const scalar_t* tp = k > 0 ? projections[i].const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* w = k > 0 ? apply_weights[i].const_data_ptr<scalar_t>() : nullptr;
      // the direction's rows: U (exact), or M with T's rank-k term
      const scalar_t* u = (k > 0 ? momenta[i] : work[i]).const_data_ptr<scalar_t>();
      std::vector<scalar_t> u_sq(n);
      step_parallel_for(0, n, row_grain(d), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          if (k == 0) {
            u_sq[r] = sum_of_squares(u + r * d, d);
            continue;
          }
          // |u_j|^2 = (|m_j|^2 - |T_j|^2) + |T_j (1 - w)|^2 (V orthonormal: row_squares)
          scalar_t t_sq = 0, kept = 0;
          for (int64_t q = 0; q < k; ++q) {
            const scalar_t t = tp[r * k + q], tw = t * (scalar_t(1) - w[q]);
            t_sq += t * t;
            kept += tw * tw;
          }
          const scalar_t outside = sq[2 * r + 1] - t_sq;
          u_sq[r] = (outside < scalar_t(0) ? scalar_t(0) : outside) + kept;
        }
      });
      double su = 0, sa = 0;
      for (int64_t r = 0; r < n; ++r) {
        const double a_sq = static_cast<double>(sq[2 * r]) * adam_scale[i] * adam_scale[i];
        if (std::isfinite(static_cast<double>(u_sq[r])) && std::isfinite(a_sq)) {
          su += u_sq[r];
          sa += a_sq;
        }
      }
      scalar_t* ratio = ratios.mutable_data_ptr<scalar_t>() + i;
      const double measured = graft_ratio(su, sa);
      const auto coef = static_cast<scalar_t>(-lr * (lagged ? double(*ratio) : measured));
      *ratio = static_cast<scalar_t>(measured);
      if (k > 0 && lagged) return;  // (the row pass moved the parameters)
      // T's rank-k term, as update_in_place forms it: T (w (-coef))
      std::vector<scalar_t> t_scaled(n * k);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t q = 0; q < k; ++q) t_scaled[r * k + q] = tp[r * k + q] * (w[q] * -coef);
      const scalar_t* ts = k > 0 ? t_scaled.data() : nullptr;
      const scalar_t* vt = k > 0 ? bases[i].const_data_ptr<scalar_t>() : nullptr;
      const auto a = static_cast<scalar_t>(decay);
      const auto& kern = cpu::kernels().of<scalar_t>();
      scalar_t* wp = params[first[i]].mutable_data_ptr<scalar_t>();
      scalar_t* bp = has_bias ? params[first[i] + 1].mutable_data_ptr<scalar_t>() : nullptr;
      step_parallel_for(0, n, row_grain(d * (k + 1)), [&](int64_t b, int64_t e) {
        kern.scaled_add_rows(wp, width, u, d, ts, k, vt, d, width, b, e, a, coef);
        if (bp != nullptr)
          kern.scaled_add_rows(bp, 1, u + width, d, ts, k, vt == nullptr ? nullptr : vt + width,
                               d, 1, b, e, a, coef);
      });
    });
  };
  for_each_gemm_block(flops, elems, row_pass, gemm, update);
}

// The curvature refresh of exact shared blocks in one call (registration.cpp): per block, its
// gradient [weight, bias] (None: zero) copied into the work rows G (n, d), and where G is
// finite F = beta F + (1 - beta) G^T G / rows (G^T G / rows where `first`: F's old values,
// NaN included, are not read); a block whose G is not finite keeps F and counts in its
// stats[0]. In torch calls from Python (shared.py) that was about ten calls per block, more
// than the GEMM itself on the ReLU autoencoder's seven blocks. Every block is checked before any
// is touched; each block's copy and GEMM by for_each_gemm_block.
void shared_refresh_cpu(at::TensorList curvatures, at::TensorList work, at::TensorList stats,
                        const c10::List<c10::optional<at::Tensor>>& grads,
                        at::IntArrayRef params_per_block, at::IntArrayRef rows,
                        const c10::List<bool>& first, double beta) {
  const size_t n_blocks = curvatures.size();
  TORCH_CHECK(work.size() == n_blocks && stats.size() == n_blocks &&
                  params_per_block.size() == n_blocks && rows.size() == n_blocks &&
                  first.size() == n_blocks,
              "mbf_kernels: shared_refresh_ takes one curvature, work, stats, parameter count, "
              "row count and first flag per block");
  const std::vector<size_t> grad_index =
      block_offsets(params_per_block, grads.size(), "shared_refresh_", "gradients (or None)");
  std::vector<int64_t> elems(n_blocks);
  for (size_t i = 0; i < n_blocks; ++i) {
    const at::Tensor& G = work[i];
    const int64_t count = params_per_block[i];
    const size_t grad_at = grad_index[i];
    TORCH_CHECK(G.dim() == 2 && G.is_contiguous() && curvatures[i].dim() == 2 &&
                    curvatures[i].size(0) == G.size(1) && curvatures[i].size(1) == G.size(1),
                "mbf_kernels: shared_refresh_: block ", i, " needs contiguous (n, d) work rows "
                "and a (d, d) curvature, got ", G.sizes(), ", ", curvatures[i].sizes());
    check_like(curvatures[i], G, "curvature");
    check_stats(stats[i], G.device());
    const int64_t n = G.size(0), d = G.size(1), width = count == 2 ? d - 1 : d;
    const c10::optional<at::Tensor> gw = grads.get(grad_at);
    const c10::optional<at::Tensor> gb = count == 2 ? grads.get(grad_at + 1) : c10::nullopt;
    TORCH_CHECK((!gw.has_value() || (gw->is_contiguous() && gw->numel() == n * width)) &&
                    (!gb.has_value() || (gb->is_contiguous() && gb->numel() == n)),
                "mbf_kernels: shared_refresh_: block ", i, "'s gradients must be contiguous ",
                n, " x ", width, (count == 2 ? " and " : ""),
                (count == 2 ? std::to_string(n) : ""));
    if (gw.has_value()) check_like(*gw, G, "grad_weight");
    if (gb.has_value()) check_like(*gb, G, "grad_bias");
    elems[i] = n * d;
  }
  std::vector<char> finite(n_blocks);
  const auto copy = [&](size_t i) {
    const bool bias = params_per_block[i] == 2;
    const c10::optional<at::Tensor> gw = grads.get(grad_index[i]);
    const c10::optional<at::Tensor> gb = bias ? grads.get(grad_index[i] + 1) : c10::nullopt;
    AT_DISPATCH_FLOATING_TYPES(work[i].scalar_type(), "mbf_shared_refresh_cpu", [&] {
      scalar_t* G = work[i].mutable_data_ptr<scalar_t>();
      const int64_t n = work[i].size(0), d = work[i].size(1), width = bias ? d - 1 : d;
      const scalar_t* w = gw.has_value() ? gw->const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* b = gb.has_value() ? gb->const_data_ptr<scalar_t>() : nullptr;
      for (int64_t r = 0; r < n; ++r) {
        if (w != nullptr) std::memcpy(G + r * d, w + r * width, width * sizeof(scalar_t));
        else std::fill_n(G + r * d, width, scalar_t(0));
        if (bias) G[r * d + width] = b != nullptr ? b[r] : scalar_t(0);
      }
      const scalar_t sq = sum_of_squares(G, n * d);
      finite[i] = sq - sq == scalar_t(0);
    });
  };
  const auto gemm = [&](size_t i) {
    if (!finite[i]) {
      stats[i].mutable_data_ptr<int64_t>()[0] += 1;
      return;
    }
    const bool from_scratch = first.get(i);
    const double scale =
        (from_scratch ? 1.0 : 1.0 - beta) / double(std::max<int64_t>(rows[i], 1));
    at::Tensor F = curvatures[i];
    F.addmm_(work[i].t(), work[i], from_scratch ? 0.0 : beta, scale);
  };
  for_each_gemm_block(gemm_flops(work), elems, copy, gemm, [](size_t) {});
}

// A factorisation of up to this many d^3 runs on one thread, the blocks shared among the
// threads (a small MLP's blocks factor side by side: the ReLU autoencoder's seven, d = 65 to
// 257, whose LAPACK calls took 3.9 ms one after another); larger ones one after another, each
// on all threads.
constexpr int64_t kRefactorGrain = int64_t(1) << 30;  // d = 1024

// The refactor of exact shared blocks in one call (registration.cpp): per block the Cholesky
// factor of F + damping I (relative: damping times F's mean diagonal entry plus `floor`, as
// reference.relative_damping), stored with its diagonal inverted as the bucket factors are;
// where it fails, the diagonal fallback of MBF_SPEC section 4 (reference.diagonal_fallback),
// counted in stats[1]. In torch calls from Python that cost about ten calls per block, half of
// a refactor of the ReLU autoencoder. The inverse (F + damping I)^{-1} is not derived here: the
// caller derives it from the stored factor as a load does (shared_inverse_), so that a resumed
// run continues bit for bit.
void shared_refactor_cpu(at::TensorList curvatures, at::TensorList factors, at::TensorList stats,
                         double damping, bool relative, double floor) {
  const size_t n_blocks = curvatures.size();
  TORCH_CHECK(factors.size() == n_blocks && stats.size() == n_blocks,
              "mbf_kernels: shared_refactor_ takes one curvature, factor and stats per block");
  std::vector<int64_t> cost(n_blocks);  // d^3 per block
  for (size_t i = 0; i < n_blocks; ++i) {
    const at::Tensor& F = curvatures[i];
    TORCH_CHECK(F.dim() == 2 && F.size(0) == F.size(1) && factors[i].sizes() == F.sizes(),
                "mbf_kernels: shared_refactor_: block ", i, " needs (d, d) curvature and "
                "factor, got ", F.sizes(), ", ", factors[i].sizes());
    TORCH_CHECK(F.scalar_type() == at::kFloat || F.scalar_type() == at::kDouble,
                "mbf_kernels: shared_refactor_: curvatures must be float32 or float64, got ",
                F.scalar_type());
    check_like(factors[i], F, "factor");
    check_stats(stats[i], F.device());
    cost[i] = F.size(0) * F.size(0) * F.size(0);
  }
  for_each_block(cost, [&](size_t i) {
    const at::Tensor& F = curvatures[i];
    const int64_t d = F.size(0);
    double lambda = damping;
    if (relative) lambda = damping * F.diagonal().sum().item<double>() / double(d) + floor;
    auto [L, info] = at::linalg_cholesky_ex(
        F + at::eye(d, F.options()).mul_(lambda), /*upper=*/false, /*check_errors=*/false);
    at::Tensor factor = factors[i];
    if (info.item<int>() == 0) {
      L.diagonal().reciprocal_();
      factor.copy_(L);
    } else {
      // 1 / sqrt(F_ii + damping) where that is finite and positive, else 1 / sqrt(damping),
      // else 1
      const at::Tensor s = F.diagonal() + lambda;
      const double fill = lambda > 0 ? 1.0 / std::sqrt(lambda) : 1.0;
      const at::Tensor ok = at::isfinite(s).logical_and_(s > 0);
      factor.zero_();
      factor.diagonal().copy_(
          at::where(ok, s.clamp_min(F.scalar_type() == at::kDouble
                                        ? std::numeric_limits<double>::min()
                                        : double(std::numeric_limits<float>::min()))
                            .rsqrt(),
                    at::full({}, fill, s.options())));
      stats[i].mutable_data_ptr<int64_t>()[1] += 1;
    }
  }, kRefactorGrain);
}

// (F + damping I)^{-1} of exact shared blocks from their stored factors (registration.cpp):
// the Cholesky factor with 1 / L_ii on its diagonal, inverted by LAPACK (cholesky_inverse).
// A block of d <= 1024 is inverted on one thread inside a parallel region, the blocks side by
// side (run_side_by_side), even one alone, so that its rounding does not depend on which blocks
// share the call: a refactor (all blocks at once) and a load (one block at a time) give the
// same bits (LAPACK's rounding still depends on the thread count set). LAPACK's potri on all
// threads had taken a d = 257 block in 0.9 ms against 0.49 on one (AMD Zen 4, 2 threads): the
// ReLU autoencoder's seven inverses were 2.9 ms of a 3.7-ms refactor step. Larger blocks run
// one after another, each on all threads.
void shared_inverse_cpu(at::TensorList inverses, at::TensorList factors) {
  const size_t n_blocks = inverses.size();
  TORCH_CHECK(factors.size() == n_blocks,
              "mbf_kernels: shared_inverse_ takes one inverse and one factor per block, got ",
              n_blocks, " and ", factors.size());
  std::vector<int64_t> cost(n_blocks);  // d^3 per block
  std::vector<size_t> small, large;
  for (size_t i = 0; i < n_blocks; ++i) {
    const at::Tensor& L = factors[i];
    TORCH_CHECK(L.dim() == 2 && L.size(0) == L.size(1) && inverses[i].sizes() == L.sizes(),
                "mbf_kernels: shared_inverse_: block ", i, " needs (d, d) inverse and factor, "
                "got ", inverses[i].sizes(), ", ", L.sizes());
    TORCH_CHECK(L.scalar_type() == at::kFloat || L.scalar_type() == at::kDouble,
                "mbf_kernels: shared_inverse_: factors must be float32 or float64, got ",
                L.scalar_type());
    check_like(inverses[i], L, "inverse");
    cost[i] = L.size(0) * L.size(0) * L.size(0);
    (cost[i] <= kRefactorGrain ? small : large).push_back(i);
  }
  const auto invert = [&](size_t i) {
    at::Tensor L = factors[i].clone();
    L.diagonal().reciprocal_();
    const_cast<at::Tensor&>(inverses[i]).copy_(at::cholesky_inverse(L));
  };
  run_side_by_side(cost, small, invert);  // (on one thread: inline)
  for (size_t i : large) invert(i);
}

// lu[l] += u[l], la[l] += a[l] over a tile's lanes (L of them; L = 0: `lanes`, at run time),
// in double, leaving out a lane where either is not finite (one bad block stays out of its
// unit). Finiteness is tested on the exponent's bits and the value masked by its bits: with a
// float compare or a select, GCC keeps a branch per lane (trapping math) and does not
// vectorise the loop.
template <int L, typename S>
inline void add_finite_lanes(const S* __restrict pu, const S* __restrict pa,
                             double* __restrict lu, double* __restrict la, int64_t lanes) {
  using U = std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>;
  constexpr U exponent = sizeof(S) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  auto masked = [](double x, uint64_t keep) {
    uint64_t b;
    std::memcpy(&b, &x, sizeof b);
    b &= keep;
    std::memcpy(&x, &b, sizeof b);
    return x;
  };
  for (int64_t l = 0; l < (L > 0 ? L : lanes); ++l) {
    U bu, ba;
    std::memcpy(&bu, pu + l, sizeof(S));
    std::memcpy(&ba, pa + l, sizeof(S));
    const uint64_t keep =
        uint64_t(0) - uint64_t(((bu & exponent) != exponent) & ((ba & exponent) != exponent));
    lu[l] += masked(double(pu[l]), keep);
    la[l] += masked(double(pa[l]), keep);
  }
}

// [sum u, sum a] over `n` consecutive tiles of (2, lanes) values at p (L lanes; L = 0:
// `lanes`, at run time), as add_finite_lanes adds them. The running sums stay in local arrays
// (registers) across the tiles: summed into memory per tile, each tile waited for the previous
// one's store (about 10 cycles a tile). With one lane per tile (the CPU step's sums), R tiles
// at a time into R sums, so that the adds do not form one chain.
template <int L, typename S>
void sum_finite_tiles(const S* p, int64_t n, int64_t lanes, double* out) {
  constexpr int R = L == 1 ? 4 : 1;
  constexpr int K = L > 0 ? L * R : 1;
  double lu[K] = {}, la[K] = {};
  if constexpr (L == 0) {
    std::vector<double> vu(lanes, 0.0), va(lanes, 0.0);
    for (int64_t t = 0; t < n; ++t)
      add_finite_lanes<0>(p + 2 * t * lanes, p + (2 * t + 1) * lanes, vu.data(), va.data(), lanes);
    for (int64_t l = 0; l < lanes; ++l) lu[0] += vu[l], la[0] += va[l];
  } else {
    int64_t t = 0;
    for (; t + R <= n; t += R)
      for (int r = 0; r < R; ++r)
        add_finite_lanes<L>(p + 2 * (t + r) * L, p + (2 * (t + r) + 1) * L, lu + r * L,
                            la + r * L, L);
    for (; t < n; ++t) add_finite_lanes<L>(p + 2 * t * L, p + (2 * t + 1) * L, lu, la, L);
  }
  out[0] = out[1] = 0.0;
  for (int k = 0; k < K; ++k) out[0] += lu[k], out[1] += la[k];
}

// sqrt(sum a^2 / sum u^2) per unit from per-block pairs (|u|^2, |a|^2) (registration.cpp):
// the grafted step's rescaling, one call for all buckets instead of about ten torch calls.
at::Tensor unit_ratios_cpu(at::TensorList norms, at::TensorList entry_tiles,
                           at::TensorList entry_units, int64_t units) {
  TORCH_CHECK(norms.size() == entry_tiles.size() && norms.size() == entry_units.size() &&
                  !norms.empty(),
              "mbf_kernels: unit_ratios takes one entry_tiles and entry_units per norms tensor, "
              "and at least one");
  const at::Tensor& first = norms[0];
  std::vector<double> su(units, 0.0), sa(units, 0.0);
  for (size_t i = 0; i < norms.size(); ++i) {
    const at::Tensor& x = norms[i];
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 2 && x.is_contiguous(),
                "mbf_kernels: unit_ratios: norms must be contiguous (T, 2, L), got ", x.sizes());
    check_like(x, first, "norms");
    const int64_t tiles = x.size(0), lanes = x.size(2), n_entries = entry_tiles[i].numel();
    TORCH_CHECK(entry_tiles[i].dim() == 1 && entry_units[i].sizes() == entry_tiles[i].sizes() &&
                    entry_tiles[i].scalar_type() == at::kLong &&
                    entry_units[i].scalar_type() == at::kLong,
                "mbf_kernels: unit_ratios: entry_tiles and entry_units must be int64 (E,) alike, "
                "got ", entry_tiles[i].sizes(), " and ", entry_units[i].sizes());
    const auto counts = entry_tiles[i].contiguous(), owners = entry_units[i].contiguous();
    std::vector<int64_t> start(n_entries + 1, 0);
    for (int64_t e = 0; e < n_entries; ++e) {
      const int64_t k = owners.const_data_ptr<int64_t>()[e];
      TORCH_CHECK(k >= 0 && k < units, "mbf_kernels: unit_ratios: unit ", k, " outside [0, ",
                  units, ")");
      start[e + 1] = start[e] + counts.const_data_ptr<int64_t>()[e];
    }
    TORCH_CHECK(start[n_entries] == tiles, "mbf_kernels: unit_ratios: entry_tiles sum to ",
                start[n_entries], ", norms have ", tiles, " tiles");
    const int64_t* unit = owners.const_data_ptr<int64_t>();
    // A bucket has up to millions of blocks in a few thousand entries (its segments, which own
    // consecutive tiles): chunks of tiles are summed per entry in parallel. An entry's sums come
    // from the chunk holding its first tile, plus the "head" of every later chunk it reaches
    // into (a chunk's first entry may continue the previous chunk's), added up after; then the
    // entries are added up per unit (a chunk's sums per unit, added after, had cost VGG16's
    // 4k units more than its tiles). Below kSerialValues one chunk, on this thread: on small
    // models the parallel region's wake-up was most of the call (1-D CNN: 23 us under the
    // profiler, of a 200-us step). VGG16's 100k tiles of sums: 0.24 -> 0.14 ms (Intel Xeon).
    constexpr int64_t kSerialValues = int64_t(1) << 15;
    const int64_t chunks =
        tiles * lanes < kSerialValues ? 1 : std::min<int64_t>(tiles, 4 * at::get_num_threads());
    std::vector<double> entry_sums(2 * n_entries, 0.0), head(2 * chunks, 0.0);
    std::vector<int64_t> head_entry(chunks, -1);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mbf_unit_ratios_cpu", [&] {
      const scalar_t* p = x.const_data_ptr<scalar_t>();
      step_parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t t0 = tiles * c / chunks, t1 = tiles * (c + 1) / chunks;
          if (t0 == t1) continue;
          int64_t e = std::upper_bound(start.begin(), start.end(), t0) - start.begin() - 1;
          for (bool first = true; e < n_entries && start[e] < t1; ++e) {
            const int64_t a = std::max(t0, start[e]), b = std::min(t1, start[e + 1]);
            if (a >= b) continue;  // (an entry without tiles)
            double* to = first ? &head[2 * c] : &entry_sums[2 * e];
            const scalar_t* at = p + 2 * a * lanes;
            if (lanes == kCompactTile) sum_finite_tiles<kCompactTile>(at, b - a, lanes, to);
            else if (lanes == 1) sum_finite_tiles<1>(at, b - a, lanes, to);  // (the CPU step's)
            else sum_finite_tiles<0>(at, b - a, lanes, to);
            if (first) head_entry[c] = e;
            first = false;
          }
        }
      });
    });
    for (int64_t c = 0; c < chunks; ++c) {
      if (head_entry[c] < 0) continue;
      entry_sums[2 * head_entry[c]] += head[2 * c];
      entry_sums[2 * head_entry[c] + 1] += head[2 * c + 1];
    }
    for (int64_t e = 0; e < n_entries; ++e) {
      su[unit[e]] += entry_sums[2 * e];
      sa[unit[e]] += entry_sums[2 * e + 1];
    }
  }
  auto out = at::empty({units}, first.options());
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "mbf_unit_ratios_out", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < units; ++k)
      o[k] = static_cast<scalar_t>(graft_ratio(su[k], sa[k]));
  });
  return out;
}

// A param group's buckets bound once, for the common case of a step in one call
// (mbf_kernels.optim.buckets.BoundBuckets binds them): every unit steps with the same flags and
// step count, and every gradient is dense, contiguous and of its parameter's dtype and shape.
// On a small model the step's cost was its Python and the op calls' argument lists (about
// 0.1 us per tensor, four lists per bucket and pass: 0.3 of a ResNet-32's 0.7 ms step); bound,
// a step converts one list, the gradients, and runs the same passes (bucket_pass,
// unit_ratios_cpu) as the ops it replaces, in the same order, under the same profiler names.
class BoundBuckets : public torch::CustomClassHolder {
 public:
  // params / momenta / second_moments: the buckets' distinct tensors, which the segments
  // index (second_moments empty: the plan has no grafted state); per bucket b: its state, and
  // graft[kGraftTensors * b ...] its tile_norms, tile_scale, tile_unit, entry_tiles,
  // entry_unit (registration.cpp's mbf_bucket_step_ and unit_ratios) and block_second_moment
  // (Adam's v per block, which serves where second_moments is empty); graft empty without
  // grafted state, tile_dampings[b] (empty: no relative damping); segments: the first seven
  // fields of mbf_bucket_step_'s segments, bucket_segments[b] of them for bucket b; units: the
  // group's units + 1 (the padding slot); others: the group's other parameters (the shared
  // blocks'), whose gradients bind() checks.
  BoundBuckets(std::vector<at::Tensor> params, std::vector<at::Tensor> momenta,
               std::vector<at::Tensor> second_moments, std::vector<at::Tensor> curvatures,
               std::vector<at::Tensor> factors, std::vector<at::Tensor> stats,
               std::vector<at::Tensor> graft, std::vector<at::Tensor> tile_dampings,
               std::vector<int64_t> segments, std::vector<int64_t> bucket_segments,
               int64_t units, std::vector<at::Tensor> others)
      : params_(std::move(params)), others_(std::move(others)), momenta_(std::move(momenta)),
        second_moments_(std::move(second_moments)), curvatures_(std::move(curvatures)),
        factors_(std::move(factors)), stats_(std::move(stats)), graft_(std::move(graft)),
        tile_dampings_(std::move(tile_dampings)), segments_(std::move(segments)),
        bucket_segments_(std::move(bucket_segments)), units_(units) {
    const size_t n = curvatures_.size();
    TORCH_CHECK(n > 0 && factors_.size() == n && stats_.size() == n &&
                    bucket_segments_.size() == n &&
                    (graft_.empty() || graft_.size() == kGraftTensors * n) &&
                    (tile_dampings_.empty() || tile_dampings_.size() == n),
                "mbf_kernels: BoundBuckets takes at least one bucket, and one tensor of each ",
                "kind per bucket");
    TORCH_CHECK(momenta_.size() == params_.size() &&
                    (second_moments_.empty() || second_moments_.size() == params_.size()),
                "mbf_kernels: BoundBuckets needs a momentum (and a second moment, or none) per "
                "param");
    TORCH_CHECK(static_cast<int64_t>(segments_.size()) ==
                    kStaticFields * std::accumulate(bucket_segments_.begin(),
                                                    bucket_segments_.end(), int64_t{0}),
                "mbf_kernels: BoundBuckets: ", kStaticFields, " segment fields per segment");
    for (const auto& p : params_) sizes_.push_back(p.sizes().vec());
  }

  // Keeps the parameters' gradients (read here, from the parameters: passing them from Python,
  // and checking the others' there, had cost a tenth of a small MLP's step) for step() when
  // each is a dense contiguous tensor of its parameter's dtype, device and shape, every
  // parameter is still contiguous in the shape it was bound with, and each of the others'
  // gradients (which step() does not read) is present, dense and real; otherwise (a gradient
  // None, say) keeps nothing and returns false: the caller takes the general path, which names
  // what is wrong, if anything is.
  bool bind() {
    grads_.clear();
    for (const auto& p : others_) {
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.layout() != at::kStrided || g.is_complex()) return false;
    }
    std::vector<at::Tensor> grads;
    grads.reserve(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      const at::Tensor& g = p.grad();
      if (!g.defined() || g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() ||
          g.device() != p.device() || !g.is_contiguous() || !p.is_contiguous() ||
          p.sizes() != at::IntArrayRef(sizes_[i]) || g.sizes() != p.sizes())
        return false;
      grads.push_back(g);
    }
    grads_ = std::move(grads);
    return true;
  }

  // The step of every bucket from the bound gradients (mbf_kernels.optim.buckets step_buckets,
  // in one call), with `flags` (refresh / first / refactor; the refactor with tile_dampings
  // when `relative`). `graft`: a measuring pass per bucket, the units' ratios into the
  // tile_scales, then the writing pass per bucket; with `lagged` too, one pass per bucket at
  // the tile_scales of the previous step, then this step's ratios into them; otherwise the
  // paper's pass per bucket. `directions`: each bucket's scratch for the two passes' u (none
  // otherwise: the caller keeps it only while a two-pass step needs it).
  void step(int64_t flags, int64_t step, double lr, double momentum_coef, double beta,
            double damping, double weight_decay, bool decoupled_weight_decay, double beta2,
            double eps, bool relative, bool graft, bool lagged,
            const std::vector<at::Tensor>& directions) {
    TORCH_CHECK(!grads_.empty(), "mbf_kernels: BoundBuckets.step without bound gradients");
    TORCH_CHECK(!graft || !graft_.empty(),
                "mbf_kernels: BoundBuckets bound without the grafted step's state");
    TORCH_CHECK(!graft || lagged || directions.size() == curvatures_.size(),
                "mbf_kernels: BoundBuckets.step: a two-pass grafted step needs one directions "
                "tensor per bucket, got ", directions.size());
    TORCH_CHECK(!relative || !tile_dampings_.empty(),
                "mbf_kernels: BoundBuckets bound without per-tile damping");
    const std::vector<at::Tensor> grads = std::move(grads_);
    grads_.clear();
    const cpu::StepConfig cfg{lr, momentum_coef, beta, damping, weight_decay,
                              decoupled_weight_decay, beta2, eps};
    const auto tile = [&](size_t b, int k) -> c10::optional<at::Tensor> {
      if (!graft) return c10::nullopt;
      return graft_[kGraftTensors * b + k];
    };
    std::vector<int64_t> dims;  // each bucket's d, its tensors checked once for both passes
    for (size_t b = 0; b < curvatures_.size(); ++b)
      dims.push_back(check_bucket(params_, grads, momenta_, curvatures_[b], factors_[b],
                                  stats_[b], FactorReaders::kCpu));
    const std::vector<int64_t> modes =
        !graft   ? std::vector<int64_t>{kModeWrite}
        : lagged ? std::vector<int64_t>{kModeGraft | kModeWrite | kModeLagged}
                 : std::vector<int64_t>{kModeGraft, kModeGraft | kModeWrite};
    for (const int64_t mode : modes) {
      const bool refreshes = mode != (kModeGraft | kModeWrite);  // the first pass
      const int64_t* fields = segments_.data();
      for (size_t b = 0; b < curvatures_.size(); ++b) {
        std::vector<int64_t> segs;
        segs.reserve(bucket_segments_[b] * kSegmentFields);
        for (int64_t s = 0; s < bucket_segments_[b]; ++s, fields += kStaticFields) {
          segs.insert(segs.end(), fields, fields + kStaticFields);
          segs.push_back(refreshes ? flags : 0);
          segs.push_back(step);
        }
        RECORD_FUNCTION("mbf_kernels::mbf_bucket_step_", std::vector<c10::IValue>());
        bucket_pass(params_, grads, momenta_, curvatures_[b], factors_[b], stats_[b], segs,
                    dims[b], cfg, second_moments_,
                    relative ? c10::optional<at::Tensor>(tile_dampings_[b]) : c10::nullopt,
                    tile(b, kScale), tile(b, kNorms),
                    graft && !lagged ? c10::optional<at::Tensor>(directions[b]) : c10::nullopt,
                    second_moments_.empty() ? tile(b, kBlockMoments) : c10::nullopt, mode);
      }
      if (mode != kModeWrite && mode != (kModeGraft | kModeWrite)) {  // it measured
        RECORD_FUNCTION("mbf_kernels::unit_ratios", std::vector<c10::IValue>());
        std::vector<at::Tensor> norms, entry_tiles, entry_units;
        for (size_t b = 0; b < curvatures_.size(); ++b) {
          norms.push_back(graft_[kGraftTensors * b + kNorms]);
          entry_tiles.push_back(graft_[kGraftTensors * b + kEntryTiles]);
          entry_units.push_back(graft_[kGraftTensors * b + kEntryUnits]);
        }
        const at::Tensor ratios = unit_ratios_cpu(norms, entry_tiles, entry_units, units_);
        for (size_t b = 0; b < curvatures_.size(); ++b) {
          at::Tensor scale = graft_[kGraftTensors * b + kScale];
          at::index_select_out(scale, ratios, 0, graft_[kGraftTensors * b + kTileUnits]);
        }
      }
    }
  }

 private:
  static constexpr int64_t kStaticFields = kSegmentFields - 2;  // without flags and step
  // graft_'s tensors per bucket, in order
  enum { kNorms, kScale, kTileUnits, kEntryTiles, kEntryUnits, kBlockMoments, kGraftTensors };
  std::vector<at::Tensor> params_, others_, momenta_, second_moments_, curvatures_, factors_,
      stats_, graft_, tile_dampings_, grads_;
  std::vector<int64_t> segments_, bucket_segments_;
  int64_t units_;
  std::vector<std::vector<int64_t>> sizes_;
};

// A param group's shared blocks bound once (mbf_kernels.optim.shared.SharedSet binds them), for
// their grafted step in one call: shared_graft_step_ with the tensors kept here and the
// gradients read from the parameters (on the ReLU autoencoder the op's argument lists and
// their checks in Python had cost 30 us of a 460-us step). momenta, second_moments, work,
// inverses, bases, apply_weights: per block (bases and apply_weights empty for an exact block,
// or both lists empty); params: each block's weight, then its bias where params_per_block says
// 2. A block at a rank is bound to its V^T and w tensors, which its refactor rewrites in place.
class BoundShared : public torch::CustomClassHolder {
 public:
  BoundShared(std::vector<at::Tensor> momenta, std::vector<at::Tensor> second_moments,
              std::vector<at::Tensor> work, std::vector<at::Tensor> inverses,
              std::vector<at::Tensor> bases, std::vector<at::Tensor> apply_weights,
              std::vector<at::Tensor> params, std::vector<int64_t> params_per_block)
      : momenta_(std::move(momenta)), second_moments_(std::move(second_moments)),
        work_(std::move(work)), inverses_(std::move(inverses)), bases_(std::move(bases)),
        apply_weights_(std::move(apply_weights)), params_(std::move(params)),
        params_per_block_(std::move(params_per_block)) {
    TORCH_CHECK(!momenta_.empty(), "mbf_kernels: BoundShared takes at least one block");
    block_offsets(params_per_block_, params_.size(), "BoundShared", "parameters");
  }

  // The grafted step (shared_graft_step_, which checks the bound tensors) where every
  // parameter is contiguous in the rows' dtype and every gradient is absent (a zero) or a
  // dense contiguous tensor of its parameter's dtype and size; otherwise nothing is touched and
  // the result is false: the caller takes the general path, which names what is wrong, if
  // anything is.
  bool step(std::vector<double> adam_scale, std::vector<double> adam_eps, double momentum,
            double beta2, double lr, double decay, at::Tensor ratios, bool lagged) {
    const auto dtype = momenta_[0].scalar_type();
    c10::List<c10::optional<at::Tensor>> grads;
    grads.reserve(params_.size());
    for (const at::Tensor& p : params_) {
      if (p.scalar_type() != dtype || !p.is_contiguous()) return false;
      const at::Tensor& g = p.grad();
      if (!g.defined()) {
        grads.push_back(c10::nullopt);
        continue;
      }
      if (g.layout() != at::kStrided || g.scalar_type() != dtype || !g.is_contiguous() ||
          g.device() != p.device() || g.numel() != p.numel())
        return false;
      grads.push_back(g);
    }
    shared_graft_step_cpu(momenta_, second_moments_, work_, inverses_, bases_, apply_weights_,
                          params_, grads, params_per_block_, adam_scale, adam_eps, momentum,
                          beta2, lr, decay, ratios, lagged);
    return true;
  }

 private:
  std::vector<at::Tensor> momenta_, second_moments_, work_, inverses_, bases_, apply_weights_,
      params_;
  std::vector<int64_t> params_per_block_;
};

}  // namespace

double onednn_gemm_min_flops(bool side_by_side) {
  const double set = g_onednn_gemm_min_flops.load(std::memory_order_relaxed);
  static const double all_threads = default_onednn_gemm_min_flops(false);
  static const double one_thread = default_onednn_gemm_min_flops(true);
  return set >= 0 ? set : side_by_side ? one_thread : all_threads;
}

void set_onednn_gemm_min_flops(double flops) {
  g_onednn_gemm_min_flops.store(std::isnan(flops) ? -1.0 : flops, std::memory_order_relaxed);
}

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
  m.impl("graft_rows_", &graft_rows_cpu);
  m.impl("scaled_add_", &scaled_add_cpu);
  m.impl("sketch_rows", &sketch_rows_cpu);
  m.impl("shared_graft_step_", &shared_graft_step_cpu);
  m.impl("shared_refresh_", &shared_refresh_cpu);
  m.impl("shared_refactor_", &shared_refactor_cpu);
  m.impl("shared_inverse_", &shared_inverse_cpu);
  m.impl("apply_inverse_", &apply_inverse_cpu);
  m.impl("unit_ratios", &unit_ratios_cpu);
}

TORCH_LIBRARY_FRAGMENT(mbf_kernels, m) {
  using Tensors = std::vector<at::Tensor>;
  m.class_<BoundBuckets>("BoundBuckets")
      .def(torch::init<Tensors, Tensors, Tensors, Tensors, Tensors, Tensors, Tensors, Tensors,
                       std::vector<int64_t>, std::vector<int64_t>, int64_t, Tensors>())
      .def("bind", &BoundBuckets::bind)
      .def("step", &BoundBuckets::step);
  m.class_<BoundShared>("BoundShared")
      .def(torch::init<Tensors, Tensors, Tensors, Tensors, Tensors, Tensors, Tensors,
                       std::vector<int64_t>>())
      .def("step", &BoundShared::step);
}

}  // namespace ops
}  // namespace mbf
