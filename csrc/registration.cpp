// The one place where the mbf_kernels op schemas are declared; each backend
// registers implementations in its own file (csrc/cpu/ops.cpp,
// csrc/cuda/ops.cu). Also the Python module `mbf_kernels._C`, whose import
// runs the registrations and which exposes build facts for `mbf info`.
#include <torch/extension.h>

#include <string>

#include "cpu/dispatch.h"
#include "mbf/compact_block.h"  // kMaxGenericDim
#include "ops_common.h"

TORCH_LIBRARY(mbf_kernels, m) {
  // All ops take flat, contiguous batches: A, L, F (N, d, d); B, X (N, d, k);
  // G (N, S, d); info (N,) int32. Broadcasting and reshaping live in Python.
  m.def("cholesky_ex(Tensor A, float damping) -> (Tensor L, Tensor info)");
  m.def("cholesky_solve(Tensor B, Tensor L) -> Tensor");
  m.def(
      "solve_spd_ex(Tensor A, Tensor B, float damping) -> (Tensor X, Tensor "
      "info)");
  m.def("inv_spd_ex(Tensor A, float damping) -> (Tensor Ainv, Tensor info)");
  m.def("outer_ema_(Tensor(a!) F, Tensor G, float beta) -> ()");
  // The fused MBF step for one bucket: param, grad, momentum (N, d); curvature and factor in
  // the compact layout (ceil(N/16), d(d+1)/2, 16) (see mbf/batched.h); stats int64 (2,)
  // accumulates [skipped curvature blocks, failed factorisations].
  m.def(
      "mbf_step_(Tensor(a!) param, Tensor grad, Tensor(b!) momentum, Tensor(c!) curvature, "
      "Tensor(d!) factor, Tensor(e!) stats, float lr, float momentum_coef, float beta, "
      "float damping, float weight_decay, bool decoupled_weight_decay, bool update_curvature, "
      "bool first_curvature, bool refactor) -> ()");
  // The fused step for a whole bucket (one call per block size per param group): the blocks
  // of many tensors, which share d (the layout in Python, with its one validation:
  // mbf_kernels/layout.py). `segments` holds 9 ints per segment, sorted by tile:
  //   [tensor, tail tensor or -1, n_blocks, offset, width, row_stride, tile_offset, flags, step]
  // block i of the segment is params[tensor].flatten()[offset + i * row_stride :][:width],
  // then params[tail][i] (a Linear bias joined to its weight's row); likewise grads/momenta
  // (and second_moments). It owns compact tiles [tile_offset, tile_offset + ceil(n_blocks /
  // 16)) of curvature and factor. flags: 1 refresh the curvature, 2 it is the first refresh,
  // 4 refactor; step: its unit's step count (Adam's bias correction when grafting).
  // Beyond the paper (MBF_SPEC 3b; mbf_kernels.reference.mbf_bucket_step_ is the definition):
  // step_mode bits 1 write, 2 graft (mbf_kernels.layout.StepMode): 1 the paper's pass (m, p);
  // 2 a grafted step's measuring pass (m, Adam's v in second_moments, each block's u to
  // directions (tiles, d, 16) and [|u|^2, |a|^2] to tile_norms (tiles, 2, 16)); 3 its writing
  // pass (p by directions, scaled by tile_scale (tiles,)). tile_damping (tiles,) replaces damping
  // at the refactor. block_second_moment (tiles, 16), on the CPU: Adam's v one per block (the
  // mean of the per-entry v; graft_second_moment="block") in place of second_moments. factor:
  // the curvature's dtype, or bfloat16 beside float32 (factor_dtype), or on the CPU an int8
  // unit factor (tiles, unit_factor_rows(d), 16) beside float32 (mbf/batched.h UnitI8).
  m.def(
      "mbf_bucket_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, "
      "Tensor(c!) curvature, Tensor(d!) factor, Tensor(e!) stats, int[] segments, float lr, "
      "float momentum_coef, float beta, float damping, float weight_decay, "
      "bool decoupled_weight_decay, Tensor(f!)[] second_moments, Tensor? tile_damping, "
      "Tensor? tile_scale, Tensor(g!)? tile_norms, Tensor(h!)? directions, float beta2, "
      "float eps, int step_mode, Tensor(i!)? block_second_moment=None) -> ()");
  // Grafting's row pass over a shared block (mbf/batched.h graft_rows): m and v its (n, d) row
  // buffers (v None: the momentum alone, the paper's update), the gradient's weight rows
  // (n, d - 1 or d) and bias (n,) (None: no gradient);
  // updates m and v, returns each row's |m / (sqrt(v) + eps)|^2 and |m|^2 (n, 2) and, with a
  // low-rank block's basis V (d, k), the new rows' projection T = m V (n, k; k = 0 without).
  // With `weight` (n, d - 1 or d; and `bias` (n,) when the rows have a bias column), the
  // block's update in the same pass, a few rows after their projection: p = decay p + coef (m
  // - T diag(apply_weight) V^T), apply_weight (k,) and coef one element (the lagged graft's
  // step, graft_norms="previous").
  m.def("graft_rows_(Tensor(a!) m, Tensor(b!)? v, Tensor? grad_weight, Tensor? grad_bias, "
        "float momentum, float beta2, float eps, Tensor? basis=None, Tensor(c!)? weight=None, "
        "Tensor(d!)? bias=None, Tensor? apply_weight=None, float decay=1.0, "
        "Tensor? coef=None) -> (Tensor, Tensor)");
  // p = decay p + coef u (+ t basis_t) in one pass: p (n,) or (n, w) contiguous, u of its shape
  // with unit stride within a row (a shared block's rows of U or M), coef a one-element tensor;
  // a low-rank block's rank-k term: t (n, k) contiguous, basis_t (k, w) (V^T's columns of p).
  m.def("scaled_add_(Tensor(a!) p, Tensor u, float decay, Tensor coef, Tensor? t=None, "
        "Tensor? basis_t=None) -> ()");
  // A low-rank shared block's refresh sketch (CPU, mbf/batched.h sketch_rows): from the
  // gradient's weight rows (n, width) and bias (n,) (None: no bias column), G = [weight, bias]
  // and omega (d, s), returns (G^T (G omega) (d, s), |G|^2) in one pass over the gradient.
  m.def("sketch_rows(Tensor grad_weight, Tensor? grad_bias, Tensor omega) -> (Tensor, Tensor)");
  // A grafted step of shared blocks in one call (CPU): per block its m, v and work rows (n, d),
  // its (d, d) inverse (exact) or V^T (k, d) and w (k,) in bases and apply_weights (kept at a
  // rank; both lists empty where every block is exact, else an empty tensor for an exact
  // block), its weight (and bias: params_per_block 1 or 2, gradients aligned with params, None
  // for none), Adam's bias corrections c1 / s2 and eps / s2; ratios (blocks,) receives each
  // block's graft ratio |a| / |u|, and with `lagged` the step is taken at the ratios it held
  // (the previous step's: graft_norms="previous").
  m.def("shared_graft_step_(Tensor(a!)[] momenta, Tensor(b!)[] second_moments, "
        "Tensor(c!)[] work, Tensor[] inverses, Tensor[] bases, Tensor[] apply_weights, "
        "Tensor(d!)[] params, Tensor?[] grads, "
        "int[] params_per_block, float[] adam_scale, float[] adam_eps, float momentum, "
        "float beta2, float lr, float decay, Tensor(e!) ratios, bool lagged) -> ()");
  // The curvature refresh of exact shared blocks in one call (CPU): per block its (d, d)
  // curvature, work rows (n, d) that receive G = [weight grad, bias grad], stats counters, its
  // parameter count (1 or 2: gradients aligned, None for none), rows to average over and
  // whether it is the first refresh: F = beta F + (1 - beta) G^T G / rows where G is finite.
  m.def("shared_refresh_(Tensor(a!)[] curvatures, Tensor(b!)[] work, Tensor(c!)[] stats, "
        "Tensor?[] grads, int[] params_per_block, int[] rows, bool[] first, float beta) -> ()");
  // The refactor of exact shared blocks in one call (CPU): per block its (d, d) curvature and
  // factor (written: the Cholesky factor of F + damping I with its diagonal inverted, or the
  // diagonal fallback, counted in stats[1]); damping relative: damping times the mean diagonal
  // entry of F, plus floor. The caller derives the inverse from the factor (shared_inverse_).
  m.def("shared_refactor_(Tensor[] curvatures, Tensor(a!)[] factors, Tensor(b!)[] stats, "
        "float damping, bool relative, float floor) -> ()");
  // Exact shared blocks' inverses (F + damping I)^{-1} from their factors as shared_refactor_
  // stores them (CPU): each block's rounding independent of the other blocks in the call, so
  // that a refactor and a load derive the same bits.
  m.def("shared_inverse_(Tensor(a!)[] inverses, Tensor[] factors) -> ()");
  // out = m inverse, a shared block's rows by its symmetric (d, d) inverse (CPU: a large GEMM on
  // oneDNN's float32 matmul, which beat MKL's by 1.8x on an AMD host; torch's mm below).
  m.def("apply_inverse_(Tensor(a!) out, Tensor m, Tensor inverse) -> ()");
  // Grafting's rescaling per unit (CPU): norms (T, 2, L) hold pairs (|u|^2, |a|^2) at [t, :, l]
  // (a bucket's tile_norms), in entries of consecutive tiles (entry_tiles (E,) of them, summing
  // to T) owned by the units entry_units (E,) in [0, units); returns (units,)
  // sqrt(sum |a|^2 / sum |u|^2), 0 where the sum of |u|^2 is 0, pairs not finite left out.
  m.def("unit_ratios(Tensor[] norms, Tensor[] entry_tiles, Tensor[] entry_units, int units) "
        "-> Tensor");
  // The step's phases alone, on the same compact layout (G, B, X: (N, d)).
  m.def("compact_outer_ema_(Tensor(a!) F, Tensor G, float beta) -> ()");
  m.def("compact_cholesky_ex(Tensor F, int n_blocks, float damping) -> (Tensor factor, Tensor info)");
  m.def("compact_solve(Tensor factor, Tensor B) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  // The CPU kernels' ISA levels: those this build knows (one library each) and those this CPU
  // runs; the active one is cpu_capability() (set at import, or by set_cpu_capability()).
  info["cpu_levels"] = mbf::cpu::known_levels();
  info["cpu_levels_supported"] = mbf::cpu::supported_levels();
#if defined(MBF_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  pybind11::list hot;  // the sizes MBF_DISPATCH_BLOCK_DIM specialises
  for (int d = 1; d <= mbf::kMaxGenericDim; ++d)
    if (mbf::is_hot_block_dim(d)) hot.append(d);
  info["hot_block_sizes"] = pybind11::tuple(hot);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mbf_kernels compiled ops (registered under torch.ops.mbf_kernels)";
  m.def("build_info", &build_info,
        "Compiler, CPU ISA levels and CUDA facts of this build of the extension.");
  m.def("use_cpu_level", &mbf::cpu::use_level, pybind11::arg("dir"), pybind11::arg("level"),
        "Load the CPU kernels of ISA level `level` ('' for the best this CPU runs) from the "
        "_cpu_<level> libraries in `dir` and make them active; returns the level.");
  m.def("cpu_level", [] { return std::string(mbf::cpu::kernels().isa); },
        "The ISA level of the active CPU kernels.");
  m.def("onednn_gemm_min_flops", &mbf::ops::onednn_gemm_min_flops,
        pybind11::arg("side_by_side") = false,
        "FLOPs from which apply_inverse_ runs a shared block's GEMM on oneDNN (else MKL's mm), "
        "on all threads or (side_by_side) on one beside other blocks' GEMMs.");
  m.def("set_onednn_gemm_min_flops", &mbf::ops::set_onednn_gemm_min_flops, pybind11::arg("flops"),
        "Override onednn_gemm_min_flops(); a negative value restores this CPU's default.");
}
