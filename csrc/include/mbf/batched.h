// Batched entry points over contiguous arrays of blocks, torch-free.
//
// Each CPU function processes blocks [begin, end) of a batch so that the
// caller chooses the parallel split (at::parallel_for in the extension, a
// plain loop in the unit tests). Layouts, for N blocks of size d:
//   A, L, Ainv, F : N x d x d, row-major, contiguous
//   B (right-hand sides), X (solutions) : N x d x k; X may alias B
//   G : N x S x d (S vectors per block)
//   info : N int32, 0 on success, else the failing leading-minor order
//
// The CUDA launchers take whole batches and a stream; they are declared only
// when compiling with a CUDA-aware compiler or with MBF_WITH_CUDA defined.
#pragma once

#include <cstdint>
#include <cstring>

#include "mbf/small_spd.h"  // MBF_HD: the conversions below run in the CUDA kernels too

namespace mbf {

// A bfloat16 by its bits (the top half of a float32's), torch-free: the 16-bit storage of a
// float32 bucket's factor (option factor_dtype="bfloat16"). The factor is the step's largest
// stream (20 of the grafted step's 56 bytes per element at d = 9), and a rounded Cholesky
// factor still defines an SPD preconditioner, (L L^T)^{-1} with L perturbed.
struct Bf16 {
  uint16_t bits;
};
MBF_HD float bf16_to_float(Bf16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}
// Rounded to nearest, ties to even (as torch's float -> bfloat16); a NaN stays a quiet NaN.
MBF_HD Bf16 bf16_from_float(float f) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
#endif
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  return Bf16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// A float32 bucket's factor in 8 bits (option factor_dtype="int8"), torch-free. L = U D with U
// unit lower and D = diag(L): (L L^T)^{-1} = U^{-T} D^{-2} U^{-1}, SPD for any unit lower U and
// positive pivots, so rounding U and r = D^{-2} keeps the preconditioner SPD whatever a block's
// conditioning. U's strictly lower entries are int8 codes scaled by one float per block
// (U_ij = code * scale, the scale max |U_ij| / 127 rounded to bfloat16 so that a decoded factor
// codes to the same bytes: U's entries are O(1), a plain scale suits them); r is bfloat16 (its
// range follows the block's curvature). A tile of kCompactTile blocks holds, in
// rows of kCompactTile bytes: the codes of (i, j), i > j, at row i(i-1)/2 + j; the scales
// (kUnitScaleRows rows: one float per block); the pivots r_i (two rows each: one bfloat16 per
// block). 58 bytes per block at d = 9 where the bfloat16 factor takes 90: the step's reads go
// from 22.4 to 18.9 bytes per element. Smaller than bfloat16 from d = 4 on.
struct UnitI8 {
  int8_t code;
};
inline constexpr int kUnitScaleRows = 4;  // a float per block: 4 rows of kCompactTile bytes
inline constexpr int kUnitMinDim = 4;     // below it the bfloat16 factor is smaller
constexpr int unit_factor_rows(int d) { return d * (d - 1) / 2 + kUnitScaleRows + 2 * d; }

// ---------------------------------------------------------------------------------------
// The fused MBF optimizer step for a bucket of N same-size blocks (MBF_SPEC section 3).
//
// Compact layout of the per-block state (curvature F and factor): tiles of kCompactTile
// blocks, each tile holding tri = d(d+1)/2 rows of kCompactTile values, block index fastest:
// element (i, j), j <= i, of block b sits at
//   [(b / kCompactTile) * tri + i(i+1)/2 + j] * kCompactTile + b % kCompactTile.
// 16 = one AVX-512 register, two AVX2 ones, or a coalesced 64-byte row on a GPU. Padding
// blocks (N up to a multiple of 16) hold finite values and are never written back to p or m.
// The factor is L with its diagonal stored inverted (1 / L_ii): an exact representation
// that makes the solve multiplication-only.
inline constexpr int kCompactTile = 16;

// Hyper-parameters of one step (one param group). `write` alone is the paper's pass: the new
// momentum stored, the parameters updated. Beyond the paper (MBF_SPEC section 3b), a grafted
// step is two passes. `graft` alone measures: it stores the new momentum and Adam's second
// moment v of the step's direction (beta2, eps), each block's u = (F + damping I)^{-1} m to
// StepTiles::directions and its [|u|^2, |a|^2] (MBF's direction u, Adam's a) to
// StepTiles::norms. `graft` with `write` then moves the parameters by the stored u, scaled by
// StepTiles::scale, reading no gradient, momentum, v or factor. Neither runs only the
// refresh/refactor the segments' flags ask for.
struct StepConfig {
  double lr, momentum, beta, damping, weight_decay;
  bool decoupled_weight_decay;
  double beta2 = 0.999, eps = 1e-8;
  bool write = true, graft = false;
  // With write and graft: the grafted step in one pass (StepMode.LAGGED): measure as the
  // measuring pass (norms into StepTiles::norms, no direction stored) and move p by
  // lr * StepTiles::scale, the previous step's ratios.
  bool lagged = false;
  // CPU: the measuring pass writes the directions with non-temporal stores (a bucket larger
  // than the caches: see stream_compact in cpu/step_kernels.cpp).
  bool stream_directions = false;
};

// Whether a pass measures the graft's norms (and so reads and updates Adam's v): the measuring
// pass, or the lagged one-pass step.
inline bool measures_graft(const StepConfig& c) { return c.graft && (!c.write || c.lagged); }

// Per compact tile of a bucket (index = tile), each optional (nullptr): `damping` replaces
// StepConfig::damping at a refactor (relative damping), `scale` multiplies the update's lr
// (grafting), `norms` receives [|u_b|^2 for the tile's 16 blocks, then |a_b|^2 for them]
// (2 x 16 values per tile; zeros for padding blocks and for a block where either is not finite),
// or with `norm_sums` (CPU) the two sums over the tile's blocks (2 values per tile: the graft
// needs them per unit only, and a unit's blocks fill whole tiles),
// `directions` holds each block's u, compact like the state but with d rows per tile
// (entry e of block b at directions[((b / 16) * d + e) * 16 + b % 16]), `block_v`
// (graft_second_moment="block") Adam's second moment kept per block, one value per block at
// block_v[b] (16 per tile): v_b = beta2 v_b + (1 - beta2) mean_e(d_e^2) of the step's direction
// d, the mean over the block's entries of the per-entry v, which replaces it in Adam's direction
// a = c1 m / (s2 sqrt(v_b) + eps); the segments' per-entry v is then unused.
template <typename T>
struct StepTiles {
  const T* damping = nullptr;
  const T* scale = nullptr;
  T* norms = nullptr;
  T* directions = nullptr;
  T* block_v = nullptr;
  bool norm_sums = false;
};

// What this step does besides the update; per parameter, since each one counts its own steps.
struct StepFlags {
  bool update_curvature;  // this step refreshes F
  bool first_curvature;   // ... and it is the first refresh: F = C instead of the EMA
  bool refactor;          // this step refactors F + damping I
};

// Counters the CPU step adds to (per call, summed over the blocks of [tile_begin, tile_end)).
struct StepStats {
  int64_t skipped_curvature = 0;  // blocks whose gradient had a NaN/Inf: F left as it was
  int64_t failed_factor = 0;      // blocks whose factorisation failed: diagonal fallback
};

// A bucket is the blocks of many parameters that share d and the hyper-parameters; each
// parameter (or weight + bias pair, or column range of a weight) is one segment, whose
// blocks need not be contiguous rows: block i of a segment is the `width` values at
// p + i * row_stride (likewise g, m), followed, when the segment has a tail, by the one
// value p_tail[i] (a Linear bias joined to its weight row), so d = width + (tail ? 1 : 0).
// The segment owns compact tiles [tile_offset, tile_offset + ceil(n_blocks / 16)) of the
// bucket's F and factor; segments are sorted by tile_offset and do not overlap (tiles no
// segment owns are left alone, e.g. those of a parameter without a gradient this step).
template <typename T>
struct StepSegment {
  T* p;
  const T* g;
  T* m;
  T* p_tail;  // nullptr: no tail
  const T* g_tail;
  T* m_tail;
  int64_t n_blocks, row_stride, tile_offset;
  int width;
  StepFlags flags;
  // StepConfig::graft: Adam's second moments (laid out as p) and the bias corrections of the
  // segment's unit at this step: a = graft_c1 m / (graft_s2 sqrt(v) + eps), with
  // c1 = (1 - momentum) / (1 - momentum^t) and s2 = 1 / sqrt(1 - beta2^t).
  T* v = nullptr;
  T* v_tail = nullptr;
  T graft_c1 = T(1), graft_s2 = T(1);
};

namespace cpu {

// The shared step types under their old names.
using mbf::kCompactTile;
using mbf::StepConfig;
using mbf::StepFlags;
using mbf::StepSegment;
using mbf::StepStats;
using mbf::StepTiles;

template <typename T>
void cholesky_batched(const T* A, T* L, int32_t* info, int64_t begin,
                      int64_t end, int d, T damping);

// L's blocks row-major, or with `transposed` column-major (each block's storage is L^T row-major,
// as torch.linalg.cholesky returns them): read in place either way.
template <typename T>
void cholesky_solve_batched(const T* L, const T* B, T* X, int64_t begin,
                            int64_t end, int d, int k, bool transposed);

// Fused factor + solve of (A + damping I) X = B; blocks whose factorisation
// fails get X = 0 and a non-zero info.
template <typename T>
void solve_spd_batched(const T* A, const T* B, T* X, int32_t* info,
                       int64_t begin, int64_t end, int d, int k, T damping);

// (A + damping I)^{-1}; blocks whose factorisation fails get Ainv = 0.
template <typename T>
void inv_spd_batched(const T* A, T* Ainv, int32_t* info, int64_t begin,
                     int64_t end, int d, T damping);

template <typename T>
void outer_ema_batched(T* F, const T* G, int64_t begin, int64_t end, int d,
                       int S, T beta);

// One step for the blocks of compact tiles [tile_begin, tile_end): p, g, m are N x d
// row-major; F and factor are compact. Updates p, m (real blocks only), F (when
// update_curvature) and factor (when refactor) in one pass over memory.
template <typename T>
StepStats mbf_step_tiles(T* p, const T* g, T* m, T* F, T* factor, int64_t n_blocks, int d,
                         int64_t tile_begin, int64_t tile_end, const StepConfig& cfg,
                         const StepFlags& flags);

// The fused step over compact tiles [tile_begin, tile_end) of a bucket (see StepSegment).
// FT, the factor's storage: T, or for T = float Bf16 (computed in float, stored rounded) or
// UnitI8 (tiles of unit_factor_rows(d) rows).
template <typename T, typename FT = T>
StepStats mbf_bucket_step_tiles(const StepSegment<T>* segments, int n_segments, T* F,
                                FT* factor, int d, int64_t tile_begin, int64_t tile_end,
                                const StepConfig& cfg, const StepTiles<T>& tiles = {});

// Grafting's row pass over a shared block's rows (mbf_kernels/optim/shared.py), rows
// [row_begin, row_end) of its row buffers m and v (n x d, d = width + 1 with a bias column):
// with g the row's gradient (gw: n x width, gb: n; null: none, 0), the momentum
// m = rho m + g, Adam's v = beta2 v + (1 - beta2) g^2, and from the new m and v the row's
// squared norms sq[2 r] = sum_j (m_rj / (sqrt(v_rj) + eps))^2 (Adam's direction) and
// sq[2 r + 1] = sum_j m_rj^2 (the low-rank block's direction norm is derived from it). One pass
// instead of seven over the layer. v null: the momentum alone (sq[2 r] = 0), the paper's update.
// copy (not null): the new m also into copy's rows r - row_begin, copy_ld apart (an aligned
// copy for the low-rank block's passes that follow; see graft_rows_cpu).
template <typename T>
void graft_rows(T* m, T* v, const T* gw, const T* gb, int64_t width, int64_t d,
                int64_t row_begin, int64_t row_end, T rho, T beta2, T eps, T* sq,
                T* copy = nullptr, int64_t copy_ld = 0);

// A low-rank shared block's T = M V for rows [row_begin, row_end) of its (n, d) momentum rows
// m, from V^T (basis_t: k x d, contiguous) into projection (n x k); run on the rows graft_rows
// has just written, while they are in cache.
template <typename T>
void project_rows(const T* m, int64_t d, int64_t row_begin, int64_t row_end, const T* basis_t,
                  int64_t k, T* projection);

// A low-rank shared block's refresh sketch from the gradient itself, rows [row_begin, row_end):
// with g_r the row (gw: n x width, contiguous; gb: n or null, the last column; ld = width + 1
// with a bias, else width), t_r = g_r Omega into t (n x s) and Y^T += t_r^T g_r into y_t
// (s x ld, accumulated), Omega^T given as omega_t (s x ld); returns sum_r |g_r|^2. One pass
// over the gradient for G^T (G Omega) and |G|^2: no copy of it, no second read.
template <typename T>
T sketch_rows(const T* gw, const T* gb, int64_t width, int64_t row_begin, int64_t row_end,
              const T* omega_t, int64_t ld, int64_t s, T* t, T* y_t);

// Rows [row_begin, row_end) of p = decay p + coef u + t V^T: p and u with w columns (row
// strides p_ld, u_ld; unit stride within a row), t (n x k, contiguous) and V^T (k x w, row
// stride vt_ld); k = 0 is p = decay p + coef u. A shared block's update in one pass: the
// decay, its M (or U) term and, at a rank, the rank-k term that would otherwise be a GEMM.
template <typename T>
void scaled_add_rows(T* p, int64_t p_ld, const T* u, int64_t u_ld, const T* t, int64_t k,
                     const T* vt, int64_t vt_ld, int64_t w, int64_t row_begin, int64_t row_end,
                     T decay, T coef);

// The step's phases as standalone ops on the compact layout, for compact tiles
// [tile_begin, tile_end) of a bucket of n_blocks blocks:
//   compact_outer_ema: F = beta F + (1 - beta) g g^T, G is N x d (one vector per block);
//   compact_cholesky:  factor = chol(F + damping I), diagonal inverted; info per real block
//                      (0, or the failing leading-minor order; failed blocks are zero);
//   compact_solve:     X = (L L^T)^{-1} B for the factor, B and X N x d (X may alias B).
template <typename T>
void compact_outer_ema_tiles(T* F, const T* G, int64_t n_blocks, int d, int64_t tile_begin,
                             int64_t tile_end, T beta);
template <typename T>
void compact_cholesky_tiles(const T* F, T* factor, int32_t* info, int64_t n_blocks, int d,
                            int64_t tile_begin, int64_t tile_end, T damping);
template <typename T>
void compact_solve_tiles(const T* factor, const T* B, T* X, int64_t n_blocks, int d,
                         int64_t tile_begin, int64_t tile_end);

}  // namespace cpu

#if defined(__CUDACC__) || defined(MBF_WITH_CUDA)
namespace cuda {

// `stream` is a cudaStream_t passed as void* so that this header needs no
// CUDA include; every launcher returns the cudaError_t of its launch as int.
template <typename T>
int cholesky_batched(const T* A, T* L, int32_t* info, int64_t n, int d,
                     T damping, void* stream);
template <typename T>
int cholesky_solve_batched(const T* L, T* X, int64_t n, int d, int k,
                           void* stream);
// (L L^T)^{-1} from a factor; the fused solve/inverse ops are composed from
// these by the caller, which owns the factor buffer.
template <typename T>
int cholesky_inverse_batched(const T* L, T* Ainv, int64_t n, int d,
                             void* stream);
template <typename T>
int outer_ema_batched(T* F, const T* G, int64_t n, int d, int S, T beta,
                      void* stream);


// The compact-layout ops and the fused bucket step (csrc/cuda/step_kernels.cuh): one thread per
// block, the per-block code of mbf/compact_block.h, hot sizes as template parameters, the
// generic path up to kMaxGenericDim (compact_block.h). All pointers are device pointers.
inline constexpr int kStepThreads = 128;  // threads (blocks of the bucket) per CUDA block

// `segments` (n_segments) and `first_cta` (n_segments + 1, first_cta[0] = 0) live on the
// device: segment s is served by CUDA blocks [first_cta[s], first_cta[s + 1]), each taking
// kStepThreads of its blocks. stats[0..1] += [skipped curvature blocks, failed factors].
// FT, the factor's storage: T, or Bf16 beside float at a hot block size only (else
// cudaErrorInvalidValue).
template <typename T, typename FT = T>
int bucket_step(const StepSegment<T>* segments, const int64_t* first_cta, int n_segments,
                int64_t n_ctas, T* F, FT* factor, int d, const StepConfig& cfg,
                const StepTiles<T>& tiles, unsigned long long* stats, void* stream);
template <typename T>
int compact_outer_ema(T* F, const T* G, int64_t n_blocks, int d, T beta, void* stream);
template <typename T>
int compact_cholesky(const T* F, T* factor, int32_t* info, int64_t n_blocks, int d, T damping,
                     void* stream);
template <typename T>
int compact_solve(const T* factor, const T* B, T* X, int64_t n_blocks, int d, void* stream);

}  // namespace cuda
#endif

}  // namespace mbf
