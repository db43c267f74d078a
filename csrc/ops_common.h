// Input checks shared by the CPU and CUDA op implementations. The Python
// layer (mbf_kernels/linalg.py) validates with friendlier messages and
// flattens batches; these checks guard direct calls through
// torch.ops.mbf_kernels.*. Any strides are accepted: inputs are made
// contiguous (a no-op when they already are), and an in-place output that is
// not contiguous is computed in a contiguous copy and written back.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "mbf/batched.h"

namespace mbf {
namespace ops {

// A shared block's U = M inv of at least onednn_gemm_min_flops() FLOPs runs on oneDNN's float32
// matmul (apply_inverse_ in cpu/ops.cpp), smaller ones on torch's mm (MKL). Which library wins
// depends on the CPU and on whether the GEMM runs on all threads or on one beside others
// (`side_by_side`), so the size does too (cpu/ops.cpp: the defaults for this CPU and the
// measurements behind them); set_onednn_gemm_min_flops() overrides both (tests take each
// library on any host: 0 sends every GEMM to oneDNN, inf none). build_info() and Python
// (mbf_kernels._extension.onednn_gemm_min_flops, shared_block.py) read it.
double onednn_gemm_min_flops(bool side_by_side = false);
void set_onednn_gemm_min_flops(double flops);  // a negative value restores this CPU's default

inline void check_blocks(const at::Tensor& A, const char* name) {
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "mbf_kernels: ", name,
              " must have shape (N, d, d), got ", A.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble,
              "mbf_kernels: ", name, " must be float32 or float64, got ",
              A.scalar_type());
}

inline void check_like(const at::Tensor& X, const at::Tensor& A,
                       const char* name) {
  TORCH_CHECK(X.scalar_type() == A.scalar_type(), "mbf_kernels: ", name,
              " must have dtype ", A.scalar_type(), ", got ", X.scalar_type());
  TORCH_CHECK(X.device() == A.device(), "mbf_kernels: ", name,
              " must be on ", A.device(), ", got ", X.device());
}

// B: (N, d, k) right-hand sides for the blocks of A (N, d, d).
inline void check_rhs(const at::Tensor& B, const at::Tensor& A) {
  TORCH_CHECK(B.dim() == 3 && B.size(0) == A.size(0) && B.size(1) == A.size(1),
              "mbf_kernels: B must have shape (", A.size(0), ", ", A.size(1),
              ", k), got ", B.sizes());
  check_like(B, A, "B");
}

// G: (N, S, d) vectors for the blocks of F (N, d, d), S >= 1.
inline void check_vectors(const at::Tensor& G, const at::Tensor& F) {
  TORCH_CHECK(G.dim() == 3 && G.size(0) == F.size(0) && G.size(2) == F.size(1)
                  && G.size(1) >= 1,
              "mbf_kernels: G must have shape (", F.size(0), ", S, ",
              F.size(1), ") with S >= 1, got ", G.sizes());
  check_like(G, F, "G");
}


// A compact state tensor (ceil(N/16), d(d+1)/2, 16) for N blocks of size d.
inline void check_compact(const at::Tensor& C, int64_t n, int64_t d, const char* name) {
  const int64_t tiles = (n + kCompactTile - 1) / kCompactTile;
  TORCH_CHECK(C.dim() == 3 && C.size(0) == tiles && C.size(1) == d * (d + 1) / 2 &&
                  C.size(2) == kCompactTile,
              "mbf_kernels: ", name, " must have the compact shape (", tiles, ", ",
              d * (d + 1) / 2, ", ", kCompactTile, ") for ", n, " blocks of size ", d,
              ", got ", C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "mbf_kernels: ", name, " must be float32 or float64, got ", C.scalar_type());
}

// The smallest d with d(d+1)/2 >= tri: the block size of a compact tensor with tri rows.
inline int64_t tri_dim(int64_t tri) {
  int64_t d = 0;
  while (d * (d + 1) / 2 < tri) ++d;
  return d;
}

// The step's counters: int64 (2,), contiguous, on `device` (the CPU ops add to them on the
// host, the CUDA ones with device atomics).
inline void check_stats(const at::Tensor& stats, const at::Device& device) {
  TORCH_CHECK(stats.scalar_type() == at::kLong && stats.numel() == 2 && stats.is_contiguous() &&
                  stats.device() == device,
              "mbf_kernels: stats must be a contiguous int64 tensor of 2 counters on ", device,
              ", got ", stats.scalar_type(), " ", stats.sizes(), " on ", stats.device());
}

// The compact ops' arguments. Each returns the block size d.
// compact_outer_ema_: F compact (updated in place, contiguous), G (N, d).
inline int64_t check_compact_outer_ema(const at::Tensor& F, const at::Tensor& G) {
  TORCH_CHECK(G.dim() == 2, "mbf_kernels: G must have shape (N, d), got ", G.sizes());
  check_compact(F, G.size(0), G.size(1), "F");
  check_like(G, F, "G");
  TORCH_CHECK(F.is_contiguous(), "mbf_kernels: F is updated in place and must be contiguous");
  return G.size(1);
}

// compact_cholesky_ex: F compact for n blocks.
inline int64_t check_compact_cholesky(const at::Tensor& F, int64_t n) {
  TORCH_CHECK(F.dim() == 3, "mbf_kernels: F must be a compact tensor, got ", F.sizes());
  const int64_t d = tri_dim(F.size(1));
  check_compact(F, n, d, "F");
  return d;
}

// compact_solve: factor compact, B (N, d).
inline int64_t check_compact_solve(const at::Tensor& factor, const at::Tensor& B) {
  TORCH_CHECK(B.dim() == 2, "mbf_kernels: B must have shape (N, d), got ", B.sizes());
  check_compact(factor, B.size(0), B.size(1), "factor");
  check_like(B, factor, "B");
  return B.size(1);
}

// mbf_step_'s arguments: param, grad, momentum (N, d); curvature and factor compact; the
// in-place ones contiguous. Returns d.
inline int64_t check_step(const at::Tensor& param, const at::Tensor& grad,
                          const at::Tensor& momentum, const at::Tensor& curvature,
                          const at::Tensor& factor) {
  TORCH_CHECK(param.dim() == 2, "mbf_kernels: param must have shape (N, d), got ",
              param.sizes());
  const int64_t n = param.size(0), d = param.size(1);
  TORCH_CHECK(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble,
              "mbf_kernels: param must be float32 or float64, got ", param.scalar_type());
  for (const at::Tensor* t : {&grad, &momentum}) {
    TORCH_CHECK(t->sizes() == param.sizes(), "mbf_kernels: grad and momentum must have shape ",
                param.sizes(), ", got ", t->sizes());
  }
  check_compact(curvature, n, d, "curvature");
  check_compact(factor, n, d, "factor");
  check_like(grad, param, "grad");
  check_like(momentum, param, "momentum");
  check_like(curvature, param, "curvature");
  check_like(factor, param, "factor");
  for (const at::Tensor* t : {&param, &momentum, &curvature, &factor}) {
    TORCH_CHECK(t->is_contiguous(), "mbf_kernels: mbf_step_ updates its state in place, which "
                "must be contiguous");
  }
  return d;
}

// mbf_step_'s (N, d) arrays as the one segment of a bucket: contiguous rows.
template <typename T>
StepSegment<T> whole_segment(at::Tensor& param, const at::Tensor& grad, at::Tensor& momentum,
                             const StepFlags& flags) {
  const int64_t n = param.size(0), d = param.size(1);
  return {param.mutable_data_ptr<T>(), grad.const_data_ptr<T>(), momentum.mutable_data_ptr<T>(),
          nullptr, nullptr, nullptr, n, d, 0, static_cast<int>(d), flags};
}

// ints per segment in mbf_bucket_step_'s `segments` (schema in registration.cpp; the Python
// side of the layout, with its flags and mode, is mbf_kernels/layout.py).
inline constexpr int kSegmentFields = 9;

// mbf_bucket_step_'s `mode` bits (mbf_kernels.layout.StepMode).
inline constexpr int64_t kModeWrite = 1, kModeGraft = 2, kModeLagged = 4;
// The modes a pass may take: none (refresh/refactor only), write (the paper's), graft (the
// measuring pass), write | graft (the writing pass) and write | graft | lagged (one pass).
inline bool valid_mode(int64_t mode) {
  return mode >= 0 && (mode < kModeLagged || mode == (kModeWrite | kModeGraft | kModeLagged));
}

// Whose step reads the factor (factor_dtype): the CPU kernels take a float32 bucket's factor in
// bfloat16 at any block size and in int8 (a unit factor, mbf/batched.h UnitI8) from
// kUnitMinDim on; the CUDA kernels take bfloat16 at a hot block size only (they keep the factor
// in registers there and build it in place in memory otherwise), and no int8 factor.
enum class FactorReaders { kCpu, kCuda };

// mbf_bucket_step_'s tensors: curvature/factor compact and contiguous, params/grads/momenta
// alike in dtype and device, the in-place ones contiguous; the factor of the curvature's dtype,
// or bfloat16 or int8 beside a float32 curvature where `readers` take it. Returns d.
inline int64_t check_bucket(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                            const at::Tensor& curvature, const at::Tensor& factor,
                            const at::Tensor& stats, FactorReaders readers) {
  TORCH_CHECK(curvature.dim() == 3 && curvature.size(2) == kCompactTile,
              "mbf_kernels: curvature must be a compact tensor (tiles, d(d+1)/2, ", kCompactTile,
              "), got ", curvature.sizes());
  const int64_t tri = curvature.size(1);
  const int64_t d = tri_dim(tri);
  TORCH_CHECK(d >= 1 && d * (d + 1) / 2 == tri, "mbf_kernels: curvature has ", tri,
              " rows per tile, not a triangle number d(d+1)/2");
  TORCH_CHECK(curvature.scalar_type() == at::kFloat || curvature.scalar_type() == at::kDouble,
              "mbf_kernels: curvature must be float32 or float64, got ", curvature.scalar_type());
  const bool unit = factor.scalar_type() == at::kChar;
  const bool bf16 = factor.scalar_type() == at::kBFloat16 && curvature.scalar_type() == at::kFloat;
  if (unit) {
    TORCH_CHECK(readers == FactorReaders::kCpu, "mbf_kernels: the CUDA kernels take no int8 ",
                "factor (factor_dtype='int8' is the CPU kernels'); use 'bfloat16'");
    TORCH_CHECK(curvature.scalar_type() == at::kFloat && d >= kUnitMinDim,
                "mbf_kernels: an int8 factor is a float32 bucket's from d = ", kUnitMinDim,
                " on, got ", curvature.scalar_type(), " and d = ", d);
  }
  if (bf16) {
    TORCH_CHECK(readers == FactorReaders::kCpu || is_hot_block_dim(static_cast<int>(d)),
                "mbf_kernels: the CUDA kernels take a bfloat16 factor (factor_dtype) at the hot ",
                "block sizes only (build_info()['hot_block_sizes']), got d = ", d);
  }
  const std::vector<int64_t> shape =
      unit ? std::vector<int64_t>{curvature.size(0), unit_factor_rows(static_cast<int>(d)),
                                  kCompactTile}
           : curvature.sizes().vec();
  TORCH_CHECK(factor.sizes() == at::IntArrayRef(shape), "mbf_kernels: ",
              unit ? "an int8 " : "", "factor must have shape ", at::IntArrayRef(shape), ", got ",
              factor.sizes());
  if (unit || bf16) {
    TORCH_CHECK(factor.device() == curvature.device(), "mbf_kernels: factor must be on ",
                curvature.device(), ", got ", factor.device());
  } else {
    check_like(factor, curvature, "factor");
  }
  TORCH_CHECK(curvature.is_contiguous() && factor.is_contiguous(),
              "mbf_kernels: curvature and factor are updated in place and must be contiguous");
  check_stats(stats, curvature.device());
  TORCH_CHECK(grads.size() == params.size() && momenta.size() == params.size(),
              "mbf_kernels: params, grads and momenta must have the same length, got ",
              params.size(), ", ", grads.size(), ", ", momenta.size());
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
  }
  return d;
}

// The grafting / relative-damping arguments of mbf_bucket_step_ (see StepConfig, StepTiles):
// checked against the bucket, and the config completed from `mode`. Per-tile tensors are
// contiguous, of the curvature's dtype and device: damping and scale (tiles,), norms
// (tiles, 2, 16), or (tiles, 2, 1) for the sums per tile where the backend writes them
// (`tile_sums`: StepTiles::norm_sums); second moments like params, or one per block
// (block_second_moment (tiles, 16): StepTiles::block_v). Returns the tile pointers.
template <typename T>
StepTiles<T> check_graft(at::TensorList params, at::TensorList second_moments,
                         const at::Tensor& curvature, const c10::optional<at::Tensor>& damping,
                         const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& norms,
                         const c10::optional<at::Tensor>& directions,
                         const c10::optional<at::Tensor>& block_second_moment, int64_t mode,
                         StepConfig* cfg, bool tile_sums) {
  TORCH_CHECK(valid_mode(mode), "mbf_kernels: mode must be 0, 1 (write), 2 (graft), 3 (write | ",
              "graft) or 7 (write | graft | lagged), got ", mode);
  cfg->write = (mode & kModeWrite) != 0;
  cfg->graft = (mode & kModeGraft) != 0;
  cfg->lagged = (mode & kModeLagged) != 0;
  const int64_t tiles = curvature.size(0);
  auto check_tiles = [&](const c10::optional<at::Tensor>& t, const char* name,
                         std::initializer_list<int64_t> shape) -> T* {
    if (!t.has_value()) return nullptr;
    check_like(*t, curvature, name);
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape) && t->is_contiguous(), "mbf_kernels: ",
                name, " must be a contiguous tensor of shape ", at::IntArrayRef(shape), ", got ",
                t->sizes());
    return t->template mutable_data_ptr<T>();
  };
  StepTiles<T> out;
  out.damping = check_tiles(damping, "tile_damping", {tiles});
  out.scale = check_tiles(scale, "tile_scale", {tiles});
  out.norm_sums = tile_sums && norms.has_value() && norms->dim() == 3 && norms->size(2) == 1;
  out.norms = check_tiles(norms, "tile_norms", {tiles, 2, out.norm_sums ? 1 : kCompactTile});
  out.directions = check_tiles(directions, "directions", {tiles, tri_dim(curvature.size(1)),
                                                          kCompactTile});
  out.block_v = check_tiles(block_second_moment, "block_second_moment", {tiles, kCompactTile});
  // (has_value, not the pointers: an empty bucket's tensors have none)
  if (cfg->graft && !cfg->lagged) {
    TORCH_CHECK(directions.has_value() && (cfg->write ? scale.has_value() : norms.has_value()),
                "mbf_kernels: a grafted step needs directions, and tile_norms to measure (mode ",
                "2) or tile_scale to write (mode 3)");
  }
  if (cfg->lagged) {
    TORCH_CHECK(scale.has_value() && norms.has_value(), "mbf_kernels: a lagged grafted step ",
                "(mode 7) needs tile_scale to write and tile_norms to measure");
  }
  if (measures_graft(*cfg) && block_second_moment.has_value()) {
    TORCH_CHECK(second_moments.empty(), "mbf_kernels: a grafted step takes Adam's v per block ",
                "(block_second_moment) or per entry (second_moments), not both");
  } else if (measures_graft(*cfg)) {
    TORCH_CHECK(second_moments.size() == params.size(), "mbf_kernels: a grafted step needs one ",
                "second moment per params tensor (or one per block, block_second_moment), got ",
                second_moments.size(), " for ", params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      check_like(second_moments[i], curvature, "second_moments[i]");
      TORCH_CHECK(second_moments[i].sizes() == params[i].sizes() &&
                      second_moments[i].is_contiguous(),
                  "mbf_kernels: second_moments[", i, "] must be contiguous with shape ",
                  params[i].sizes(), ", got ", second_moments[i].sizes());
    }
  }
  return out;
}

// The segments of a bucket step, checked, with pointers into params / grads (contiguous) /
// momenta; segments without blocks are dropped. `*tiles_used` is the end of the last
// segment's tiles.
template <typename T>
std::vector<StepSegment<T>> parse_segments(at::TensorList params,
                                           const std::vector<at::Tensor>& grads,
                                           at::TensorList momenta, at::TensorList second_moments,
                                           at::IntArrayRef segments, int64_t d, int64_t tiles,
                                           const StepConfig& cfg, int64_t* tiles_used) {
  TORCH_CHECK(segments.size() % kSegmentFields == 0, "mbf_kernels: segments must hold ",
              kSegmentFields, " ints per segment, got ", segments.size());
  const int64_t n_segments = static_cast<int64_t>(segments.size()) / kSegmentFields;
  const auto n_tensors = static_cast<int64_t>(params.size());
  std::vector<StepSegment<T>> out;
  out.reserve(n_segments);
  int64_t next_free_tile = 0;
  for (int64_t s = 0; s < n_segments; ++s) {
    const int64_t* f = segments.data() + s * kSegmentFields;
    const int64_t main = f[0], tail = f[1], n = f[2], col = f[3], width = f[4], stride = f[5],
                  tile_offset = f[6], flag_bits = f[7], step = f[8];
    TORCH_CHECK(main >= 0 && main < n_tensors && tail >= -1 && tail < n_tensors,
                "mbf_kernels: segment ", s, " names tensor ", main, " / ", tail, " of ",
                n_tensors);
    TORCH_CHECK(width + (tail >= 0 ? 1 : 0) == d, "mbf_kernels: segment ", s, " has blocks of ",
                width, (tail >= 0 ? " + 1" : ""), " values, the bucket ", d);
    TORCH_CHECK(n >= 0 && col >= 0 && stride >= width, "mbf_kernels: segment ", s,
                " has a bad layout (n ", n, ", offset ", col, ", stride ", stride, ")");
    TORCH_CHECK(n == 0 || col + (n - 1) * stride + width <= params[main].numel(),
                "mbf_kernels: segment ", s, " reaches past the end of params[", main, "]");
    TORCH_CHECK(tail < 0 || params[tail].numel() >= n, "mbf_kernels: segment ", s, " needs ", n,
                " tail values, params[", tail, "] has ", tail < 0 ? 0 : params[tail].numel());
    const int64_t seg_tiles = (n + kCompactTile - 1) / kCompactTile;
    TORCH_CHECK(tile_offset >= next_free_tile && tile_offset + seg_tiles <= tiles,
                "mbf_kernels: segment ", s, " owns tiles [", tile_offset, ", ",
                tile_offset + seg_tiles, "), which overlap the previous segment's or exceed ",
                "the ", tiles, " tiles of the state");
    TORCH_CHECK(flag_bits >= 0 && flag_bits < 8 && (flag_bits & 2) <= 2 * (flag_bits & 1),
                "mbf_kernels: segment ", s, " has bad flags ", flag_bits,
                " (1: update curvature, 2: first update, which needs 1, 4: refactor)");
    TORCH_CHECK(step >= 1 || !cfg.graft, "mbf_kernels: segment ", s, " has step ", step,
                "; a grafted step needs the unit's step count >= 1");
    next_free_tile = tile_offset + seg_tiles;
    if (n == 0) continue;
    auto ptr = [](const at::Tensor& t) { return t.template mutable_data_ptr<T>(); };
    auto cptr = [](const at::Tensor& t) { return t.template const_data_ptr<T>(); };
    const bool has_tail = tail >= 0;
    out.push_back(StepSegment<T>{
        ptr(params[main]) + col, cptr(grads[main]) + col, ptr(momenta[main]) + col,
        has_tail ? ptr(params[tail]) : nullptr, has_tail ? cptr(grads[tail]) : nullptr,
        has_tail ? ptr(momenta[tail]) : nullptr, n, stride, tile_offset,
        static_cast<int>(width),
        StepFlags{(flag_bits & 1) != 0, (flag_bits & 2) != 0, (flag_bits & 4) != 0}});
    if (measures_graft(cfg)) {  // (the writing pass reads directions, not v)
      StepSegment<T>& seg = out.back();
      if (!second_moments.empty()) {  // (empty: v per block, StepTiles::block_v)
        seg.v = ptr(second_moments[main]) + col;
        seg.v_tail = has_tail ? ptr(second_moments[tail]) : nullptr;
      }
      const double t = static_cast<double>(step);
      seg.graft_c1 = static_cast<T>((1.0 - cfg.momentum) / (1.0 - std::pow(cfg.momentum, t)));
      seg.graft_s2 = static_cast<T>(1.0 / std::sqrt(1.0 - std::pow(cfg.beta2, t)));
    }
  }
  *tiles_used = next_free_tile;
  return out;
}

// One pass of mbf_bucket_step_ up to its kernels, shared by the backends: the grafting
// arguments checked (config completed from `mode`) and the segments parsed, then
// run(segments, config, tiles, tiles_used) launches the backend's step; `tile_sums`: its
// kernels can write the graft's norms as sums per tile (check_graft).
template <typename T, typename Run>
void bucket_pass_with(at::TensorList params, const std::vector<at::Tensor>& grads,
                      at::TensorList momenta, const at::Tensor& curvature,
                      at::IntArrayRef segments, int64_t d, StepConfig cfg,
                      at::TensorList second_moments, const c10::optional<at::Tensor>& tile_damping,
                      const c10::optional<at::Tensor>& tile_scale,
                      const c10::optional<at::Tensor>& tile_norms,
                      const c10::optional<at::Tensor>& directions,
                      const c10::optional<at::Tensor>& block_second_moment, int64_t mode,
                      bool tile_sums, Run&& run) {
  const StepTiles<T> tiles = check_graft<T>(params, second_moments, curvature, tile_damping,
                                            tile_scale, tile_norms, directions,
                                            block_second_moment, mode, &cfg, tile_sums);
  int64_t tiles_used = 0;
  const auto segs = parse_segments<T>(params, grads, momenta, second_moments, segments, d,
                                      curvature.size(0), cfg, &tiles_used);
  run(segs, cfg, tiles, tiles_used);
}

// run(factor's data) as the storage its dtype names: T, or beside float32 state (factor_dtype;
// check_bucket allowed it) Bf16 for a bfloat16 factor and, where `readers` take one (the CPU
// kernels: run is instantiated for UnitI8 only there), UnitI8 for an int8 unit factor.
template <typename T, FactorReaders readers, typename Run>
void with_factor(at::Tensor& factor, Run&& run) {
  if constexpr (std::is_same_v<T, float>) {
    if (factor.scalar_type() == at::kBFloat16) {
      run(reinterpret_cast<Bf16*>(factor.mutable_data_ptr<at::BFloat16>()));
      return;
    }
    if constexpr (readers == FactorReaders::kCpu) {
      if (factor.scalar_type() == at::kChar) {
        run(reinterpret_cast<UnitI8*>(factor.mutable_data_ptr<int8_t>()));
        return;
      }
    }
  }
  run(factor.mutable_data_ptr<T>());
}

// grads made contiguous (kept alive by the caller while the kernels read them).
inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace ops
}  // namespace mbf
