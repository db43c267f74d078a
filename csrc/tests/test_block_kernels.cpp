// Unit tests of the torch-free CPU kernels against known mathematics:
// L L^T = A + damping I, (A + damping I) x = b, A A^{-1} = I, the outer-product
// EMA against its definition in double, and failure reporting per block; and of
// the per-block code the CUDA kernels run (mbf/compact_block.h), run here on the
// host against the CPU kernels.
// Run by ctest, one case per process: `test_block_kernels <case>`.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "mbf/batched.h"
#include "mbf/compact_block.h"
#include "mbf/cpu_features.h"
#include "mbf/small_spd.h"

namespace {

int g_failures = 0;

#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      ++g_failures;                                        \
      std::fprintf(stderr, "%s:%d: expected %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                   \
      std::fprintf(stderr, "\n");                          \
    }                                                      \
  } while (0)

const int kDims[] = {1, 2, 4, 9, 10, 16, 25, 27, 33, 64};
constexpr int64_t kBlocks = 37;  // not a multiple of anything in particular

template <typename T>
T tolerance() {
  return std::is_same_v<T, float> ? T(2e-4) : T(1e-11);
}

// Well-conditioned SPD blocks M M^T / d + 0.1 I, exactly symmetric.
template <typename T>
std::vector<T> random_spd(int64_t n, int d, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> A(n * d * d);
  std::vector<double> M(d * d);
  for (int64_t b = 0; b < n; ++b) {
    for (auto& m : M) m = normal(rng);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j <= i; ++j) {
        double s = 0;
        for (int k = 0; k < d; ++k) s += M[i * d + k] * M[j * d + k];
        s = s / d + (i == j ? 0.1 : 0.0);
        A[b * d * d + i * d + j] = A[b * d * d + j * d + i] = static_cast<T>(s);
      }
  }
  return A;
}

template <typename T>
std::vector<T> random_vec(int64_t count, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  std::vector<T> v(count);
  for (auto& x : v) x = static_cast<T>(normal(rng));
  return v;
}

// Relative max-norm difference of (A + damping I) and what `product` rebuilds.
template <typename T>
void test_cholesky_reconstructs_t() {
  for (int d : kDims) {
    const T damping = T(0.25);
    auto A = random_spd<T>(kBlocks, d, 1 + d);
    std::vector<T> L(A.size());
    std::vector<int32_t> info(kBlocks, -1);
    mbf::cpu::cholesky_batched<T>(A.data(), L.data(), info.data(), 0, kBlocks, d, damping);
    for (int64_t b = 0; b < kBlocks; ++b) {
      EXPECT(info[b] == 0, "d=%d block %lld info %d", d, (long long)b, info[b]);
      const T* l = &L[b * d * d];
      const T* a = &A[b * d * d];
      double err = 0, scale = 0;
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j) {
          if (j > i) EXPECT(l[i * d + j] == T(0), "upper triangle not zero at (%d,%d)", i, j);
          double s = 0;
          for (int k = 0; k < d; ++k) s += double(l[i * d + k]) * l[j * d + k];
          const double want = a[i * d + j] + (i == j ? damping : 0);
          err = std::fmax(err, std::fabs(s - want));
          scale = std::fmax(scale, std::fabs(want));
        }
      EXPECT(err <= tolerance<T>() * scale, "d=%d L L^T error %g (scale %g)", d, err, scale);
    }
  }
}

template <typename T>
void test_solve_residual_t() {
  for (int d : kDims) {
    for (int k : {1, 3}) {
      const T damping = T(0.01);
      auto A = random_spd<T>(kBlocks, d, 7 + d);
      auto B = random_vec<T>(kBlocks * d * k, 11 + d);
      auto X = B;
      std::vector<int32_t> info(kBlocks, -1);
      mbf::cpu::solve_spd_batched<T>(A.data(), B.data(), X.data(), info.data(), 0, kBlocks, d, k,
                                     damping);
      for (int64_t b = 0; b < kBlocks; ++b) {
        EXPECT(info[b] == 0, "d=%d info %d", d, info[b]);
        const T* a = &A[b * d * d];
        double err = 0, scale = 0;
        for (int c = 0; c < k; ++c)
          for (int i = 0; i < d; ++i) {
            double s = 0;
            for (int j = 0; j < d; ++j)
              s += (double(a[i * d + j]) + (i == j ? damping : 0)) * X[b * d * k + j * k + c];
            err = std::fmax(err, std::fabs(s - B[b * d * k + i * k + c]));
            scale = std::fmax(scale, std::fabs(double(B[b * d * k + i * k + c])));
          }
        EXPECT(err <= 10 * tolerance<T>() * scale, "d=%d k=%d residual %g", d, k, err);
      }
    }
  }
}

template <typename T>
void test_inverse_identity_t() {
  for (int d : kDims) {
    const T damping = T(0.5);
    auto A = random_spd<T>(kBlocks, d, 3 + d);
    std::vector<T> Ainv(A.size());
    std::vector<int32_t> info(kBlocks, -1);
    mbf::cpu::inv_spd_batched<T>(A.data(), Ainv.data(), info.data(), 0, kBlocks, d, damping);
    for (int64_t b = 0; b < kBlocks; ++b) {
      EXPECT(info[b] == 0, "d=%d info %d", d, info[b]);
      double err = 0;
      for (int i = 0; i < d; ++i)
        for (int j = 0; j < d; ++j) {
          double s = 0;
          for (int k = 0; k < d; ++k)
            s += (double(A[b * d * d + i * d + k]) + (i == k ? damping : 0)) *
                 Ainv[b * d * d + k * d + j];
          err = std::fmax(err, std::fabs(s - (i == j ? 1.0 : 0.0)));
        }
      EXPECT(err <= 10 * tolerance<T>(), "d=%d A A^-1 - I = %g", d, err);
    }
  }
}

template <typename T>
void test_outer_ema_t() {
  for (int d : kDims) {
    for (int S : {1, 5}) {
      const T beta = T(0.9);
      auto F = random_spd<T>(kBlocks, d, 5 + d);
      const auto F0 = F;
      auto G = random_vec<T>(kBlocks * S * d, 13 + d);
      mbf::cpu::outer_ema_batched<T>(F.data(), G.data(), 0, kBlocks, d, S, beta);
      double err = 0;
      for (int64_t b = 0; b < kBlocks; ++b)
        for (int i = 0; i < d; ++i)
          for (int j = 0; j < d; ++j) {
            double c = 0;
            for (int s = 0; s < S; ++s)
              c += double(G[(b * S + s) * d + i]) * G[(b * S + s) * d + j];
            const double want = double(beta) * F0[b * d * d + i * d + j] + (1 - double(beta)) * c / S;
            err = std::fmax(err, std::fabs(F[b * d * d + i * d + j] - want));
            EXPECT(F[b * d * d + i * d + j] == F[b * d * d + j * d + i], "not symmetric");
          }
      EXPECT(err <= tolerance<T>() * 10, "d=%d S=%d error %g", d, S, err);
    }
  }
}

template <typename T>
void test_failures_are_isolated_t() {
  const int d = 9;
  const int64_t n = 6;
  auto A = random_spd<T>(n, d, 42);
  A[1 * d * d + 4 * d + 4] = T(-5);                 // not PD at order 5
  A[3 * d * d + 6 * d + 2] = std::numeric_limits<T>::quiet_NaN();  // row 6
  A[4 * d * d] = std::numeric_limits<T>::infinity();  // pivot 0 is +Inf
  auto X = random_vec<T>(n * d, 9);
  const auto B = X;
  std::vector<int32_t> info(n, -1);
  mbf::cpu::solve_spd_batched<T>(A.data(), B.data(), X.data(), info.data(), 0, n, d, 1, T(0));
  const int32_t want[] = {0, 5, 0, 7, 1, 0};
  for (int64_t b = 0; b < n; ++b) {
    EXPECT(info[b] == want[b], "block %lld info %d, want %d", (long long)b, info[b], want[b]);
    for (int i = 0; i < d; ++i) {
      const T x = X[b * d + i];
      EXPECT(std::isfinite(x), "block %lld has a non-finite solution", (long long)b);
      if (want[b] != 0) EXPECT(x == T(0), "failed block %lld not zeroed", (long long)b);
    }
  }
  // The good blocks equal a solve of those blocks alone.
  for (int64_t b : {0, 2, 5}) {
    std::vector<T> x1(B.begin() + b * d, B.begin() + (b + 1) * d);
    int32_t one = -1;
    // In place (B aliasing X) is allowed.
    mbf::cpu::solve_spd_batched<T>(&A[b * d * d], x1.data(), x1.data(), &one, 0, 1, d, 1, T(0));
    for (int i = 0; i < d; ++i)
      EXPECT(x1[i] == X[b * d + i], "neighbour of a bad block changed at %d", i);
  }
}

// The compile-time specialisations must compute what the generic path computes.
template <typename T>
void test_hot_sizes_match_generic_t() {
  for (int d : {1, 4, 9, 10, 16, 25, 27}) {
    auto A = random_spd<T>(1, d, 77 + d);
    std::vector<T> Lg(d * d), Lh(d * d);
    int32_t ig = mbf::cholesky_block<T, 0>(A.data(), Lg.data(), d, T(0.1));
    int32_t ih = MBF_DISPATCH_BLOCK_DIM(d, [&] {
      return mbf::cholesky_block<T, kD>(A.data(), Lh.data(), d, T(0.1));
    });
    EXPECT(ig == 0 && ih == 0, "d=%d info %d %d", d, ig, ih);
    double err = 0;
    for (int i = 0; i < d * d; ++i) err = std::fmax(err, std::fabs(double(Lg[i]) - Lh[i]));
    EXPECT(err <= tolerance<T>() * 1e-2, "d=%d hot vs generic differ by %g", d, err);
  }
}

// First step of a bucket: refresh (F = g g^T), refactor, update.
constexpr mbf::cpu::StepFlags kFullStep{true, true, true};

// The fused step on the compact layout. Step 1 refreshes F = g g^T and refactors, so the
// update is p -= lr (g g^T + lambda I)^{-1} g = lr g / (lambda + |g|^2) (Sherman-Morrison),
// for every block, whatever d. Blocks N..padding stay untouched in p and m.
template <typename T>
void test_step_first_is_sherman_morrison_t() {
  for (int d : {1, 4, 9, 10, 27, 33}) {
    const int64_t n = 37, tri = int64_t(d) * (d + 1) / 2;
    const int64_t tiles = (n + mbf::cpu::kCompactTile - 1) / mbf::cpu::kCompactTile;
    auto p = random_vec<T>(n * d, 21 + d);
    const auto p0 = p;
    const auto g = random_vec<T>(n * d, 22 + d);
    std::vector<T> m(n * d, T(0)), F(tiles * tri * mbf::cpu::kCompactTile, T(0));
    std::vector<T> L(F.size(), T(0));
    const double lr = 0.1, lambda = 0.5;
    const mbf::cpu::StepConfig cfg{lr, 0.9, 0.9, lambda, 0.0, false};
    const auto stats = mbf::cpu::mbf_step_tiles<T>(p.data(), g.data(), m.data(), F.data(),
                                                   L.data(), n, d, 0, tiles, cfg, kFullStep);
    EXPECT(stats.skipped_curvature == 0 && stats.failed_factor == 0, "d=%d stats", d);
    for (int64_t b = 0; b < n; ++b) {
      double g2 = 0;
      for (int i = 0; i < d; ++i) g2 += double(g[b * d + i]) * g[b * d + i];
      for (int i = 0; i < d; ++i) {
        const double want = p0[b * d + i] - lr * g[b * d + i] / (lambda + g2);
        EXPECT(std::fabs(p[b * d + i] - want) <= 10 * tolerance<T>() * (1 + std::fabs(want)),
               "d=%d block %lld: p %g, want %g", d, (long long)b, double(p[b * d + i]), want);
        EXPECT(m[b * d + i] == g[b * d + i], "momentum after step 1 is the gradient");
      }
    }
  }
}

// damping 0 with a zero gradient: F = 0 is singular, the block falls back to the diagonal
// (here 1 / sqrt(damping) is unavailable, so the identity) and stays finite.
template <typename T>
void test_step_failure_falls_back_t() {
  const int d = 9;
  const int64_t n = 16, tri = 45;
  std::vector<T> p(n * d, T(1)), g = random_vec<T>(n * d, 5), m(n * d, T(0));
  for (int i = 0; i < d; ++i) g[3 * d + i] = T(0);
  g[7 * d + 2] = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> F(tri * mbf::cpu::kCompactTile, T(0)), L(F.size(), T(0));
  const mbf::cpu::StepConfig cfg{0.1, 0.9, 0.9, 0.0, 0.0, false};
  const auto stats = mbf::cpu::mbf_step_tiles<T>(p.data(), g.data(), m.data(), F.data(),
                                                 L.data(), n, d, 0, 1, cfg, kFullStep);
  EXPECT(stats.skipped_curvature == 1, "one NaN gradient block, got %lld",
         (long long)stats.skipped_curvature);
  EXPECT(stats.failed_factor >= 2, "zero and NaN blocks fail, got %lld",
         (long long)stats.failed_factor);
  for (int i = 0; i < d; ++i) EXPECT(p[3 * d + i] == T(1), "zero gradient: p unchanged");
  for (int64_t b = 0; b < n; ++b)
    if (b != 7)
      for (int i = 0; i < d; ++i) EXPECT(std::isfinite(p[b * d + i]), "block %lld not finite", (long long)b);
  for (const T v : F) EXPECT(std::isfinite(v), "curvature must stay finite");
  for (const T v : L) EXPECT(std::isfinite(v), "factor must stay finite");
}

// A bucket of segments (a weight joined to its bias, a column range of a wider weight, a
// plain row-major tensor, and one left out) must give, block for block, what the contiguous
// step gives on the same blocks gathered into rows; the left-out segment's tiles and the
// columns outside a range stay untouched.
template <typename T>
void test_bucket_segments_match_rows_t() {
  using Seg = mbf::cpu::StepSegment<T>;
  const int d = 9, tile = mbf::cpu::kCompactTile;
  const int64_t tri = 45;
  // Segment A: W (20, 8) + bias (20): d = 8 + 1. Segment B: columns [3, 12) of V (5, 14).
  // Segment C: rows of R (33, 9). Segment D: rows of S (4, 9), no gradient this step.
  auto W = random_vec<T>(20 * 8, 1), b = random_vec<T>(20, 2), V = random_vec<T>(5 * 14, 3);
  auto R = random_vec<T>(33 * 9, 4), S = random_vec<T>(4 * 9, 5);
  const auto gW = random_vec<T>(20 * 8, 6), gb = random_vec<T>(20, 7);
  const auto gV = random_vec<T>(5 * 14, 8), gR = random_vec<T>(33 * 9, 9);
  std::vector<T> mW(W.size(), T(0.5)), mb(b.size(), T(-0.25)), mV(V.size(), T(0.125));
  std::vector<T> mR(R.size(), T(0)), mS(S.size(), T(0)), gS(S.size(), T(0));
  const int64_t tiles = 2 + 1 + 3 + 1;
  std::vector<T> F(tiles * tri * tile, T(0)), L(F.size(), T(0));
  // D's tiles hold a marker the step must not touch.
  for (int64_t i = 3 * tri * tile; i < 4 * tri * tile; ++i) F[i] = L[i] = T(7);
  const mbf::cpu::StepConfig cfg{0.05, 0.9, 0.9, 0.3, 0.01, false};
  const mbf::cpu::StepFlags flags = kFullStep;
  const Seg segs[] = {
      {W.data(), gW.data(), mW.data(), b.data(), gb.data(), mb.data(), 20, 8, 0, 8, flags},
      {V.data() + 3, gV.data() + 3, mV.data() + 3, nullptr, nullptr, nullptr, 5, 14, 2, 9, flags},
      {R.data(), gR.data(), mR.data(), nullptr, nullptr, nullptr, 33, 9, 4, 9, flags},
  };
  // Expected: each segment's blocks as contiguous rows through mbf_step_tiles.
  auto rows_of = [&](const Seg& s, const std::vector<T>& main, const std::vector<T>* tail,
                     int64_t offset) {
    std::vector<T> out(s.n_blocks * d);
    for (int64_t i = 0; i < s.n_blocks; ++i) {
      for (int c = 0; c < s.width; ++c) out[i * d + c] = main[offset + i * s.row_stride + c];
      if (tail) out[i * d + d - 1] = (*tail)[i];
    }
    return out;
  };
  struct Want { std::vector<T> p, m; };
  std::vector<Want> want;
  const std::vector<T>* mains[][3] = {{&W, &gW, &mW}, {&V, &gV, &mV}, {&R, &gR, &mR}};
  const std::vector<T>* tails[][3] = {{&b, &gb, &mb}, {nullptr, nullptr, nullptr},
                                      {nullptr, nullptr, nullptr}};
  const int64_t offsets[] = {0, 3, 0};
  for (int k = 0; k < 3; ++k) {
    const Seg& s = segs[k];
    auto p = rows_of(s, *mains[k][0], tails[k][0], offsets[k]);
    auto g = rows_of(s, *mains[k][1], tails[k][1], offsets[k]);
    auto m = rows_of(s, *mains[k][2], tails[k][2], offsets[k]);
    const int64_t t = (s.n_blocks + tile - 1) / tile;
    std::vector<T> Fk(t * tri * tile, T(0)), Lk(Fk.size(), T(0));
    mbf::cpu::mbf_step_tiles<T>(p.data(), g.data(), m.data(), Fk.data(), Lk.data(), s.n_blocks,
                                d, 0, t, cfg, flags);
    want.push_back({p, m});
  }
  const auto V0 = V;
  // Two calls splitting the tile range in the middle of segment C, as parallel_for may.
  mbf::cpu::mbf_bucket_step_tiles<T>(segs, 3, F.data(), L.data(), d, 0, 5, cfg);
  mbf::cpu::mbf_bucket_step_tiles<T>(segs, 3, F.data(), L.data(), d, 5, tiles, cfg);
  for (int k = 0; k < 3; ++k) {
    const Seg& s = segs[k];
    const auto p = rows_of(s, *mains[k][0], tails[k][0], offsets[k]);
    const auto m = rows_of(s, *mains[k][2], tails[k][2], offsets[k]);
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT(p[i] == want[k].p[i], "segment %d value %zu: p %g, want %g", k, i, double(p[i]),
             double(want[k].p[i]));
      EXPECT(m[i] == want[k].m[i], "segment %d value %zu: m differs", k, i);
    }
  }
  for (int r = 0; r < 5; ++r)
    for (int c : {0, 1, 2, 12, 13})
      EXPECT(V[r * 14 + c] == V0[r * 14 + c], "V column %d outside the range changed", c);
  for (int64_t i = 3 * tri * tile; i < 4 * tri * tile; ++i)
    EXPECT(F[i] == T(7) && L[i] == T(7), "a tile no segment owns changed at %lld", (long long)i);
}

// Elementwise |a - b| <= tol * (1 + |b|), NaN equal to NaN.
template <typename T>
int count_mismatches(const std::vector<T>& a, const std::vector<T>& b, T tol) {
  int bad = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const bool both_nan = std::isnan(a[i]) && std::isnan(b[i]);
    if (!both_nan && !(std::fabs(a[i] - b[i]) <= tol * (1 + std::fabs(b[i])))) ++bad;
  }
  return bad;
}

// The per-block step of the CUDA kernels (compact_block.h), run on the host block by block,
// against the CPU kernels' step on the same bucket, over a schedule that takes every branch:
// first refresh + refactor, cached factor, refresh (decoupled decay), refactor with a block made
// indefinite (it fails and falls back to the diagonal), with a NaN gradient in one block; then
// the options beyond the paper: a refactor with per-tile (relative) damping, a grafted
// measuring pass (m, v, norms and directions stored, the directions streamed), grafted writes
// of the stored directions with per-tile lr scales, two lagged one-pass grafted steps (the
// norms measured, p moved by u at the per-tile scales), and a refresh-only pass; with
// `block_v`, Adam's v one per block (StepTiles::block_v, BlockExtras::v_block) in place of v per
// entry. Hot sizes and the generic path (d = 2, 33, 64).
template <typename T, bool block_v>
void test_device_step_matches_cpu_step_t() {
  struct Phase {
    mbf::StepFlags flags;
    double damping;
    bool decoupled, graft, write, tile_damping, lagged;
  };
  const Phase schedule[] = {{{true, true, true}, 0.1, false, false, true, false, false},
                            {{false, false, false}, 0.1, false, false, true, false, false},
                            {{true, false, false}, 0.1, true, false, true, false, false},
                            {{false, false, true}, 0.05, false, false, true, false, false},
                            {{true, false, true}, 0.05, false, false, true, false, false},
                            {{true, false, true}, 0.05, false, true, false, true, false},
                            {{false, false, false}, 0.05, false, true, true, false, false},
                            {{false, false, true}, 0.05, true, true, true, true, false},
                            {{false, false, false}, 0.05, false, true, true, false, true},
                            {{true, false, false}, 0.05, true, true, true, true, true},
                            {{true, false, false}, 0.05, false, false, false, false, false}};
  const int n_phases = static_cast<int>(sizeof(schedule) / sizeof(schedule[0]));
  for (int d : kDims) {
    const int64_t n = kBlocks, tri = int64_t(d) * (d + 1) / 2;
    const int64_t tiles = (n + mbf::kCompactTile - 1) / mbf::kCompactTile;
    auto p_cpu = random_vec<T>(n * d, 31 + d);
    std::vector<T> m_cpu(n * d, T(0)), v_cpu(n * d, T(0)), F_cpu(tiles * tri * mbf::kCompactTile, T(0));
    std::vector<T> L_cpu(F_cpu.size(), T(0)), norms_cpu(tiles * 2 * mbf::kCompactTile, T(0));
    auto p_dev = p_cpu, m_dev = m_cpu, v_dev = v_cpu, F_dev = F_cpu, L_dev = L_cpu;
    auto norms_dev = norms_cpu;
    std::vector<T> vb_cpu(tiles * mbf::kCompactTile, T(0)), vb_dev = vb_cpu;  // v per block
    std::vector<T> dir_dev(tiles * d * mbf::kCompactTile, T(0));
    // The CPU's directions aligned to a cache line, as torch allocates them: the measuring
    // pass streams them (non-temporal stores) only to aligned rows.
    std::vector<T> dir_buffer(dir_dev.size() + 64 / sizeof(T), T(0));
    T* dir_cpu = dir_buffer.data() + (64 - reinterpret_cast<uintptr_t>(dir_buffer.data()) % 64) %
                                         64 / sizeof(T);
    std::vector<T> tile_damping(tiles), tile_scale(tiles);
    for (int64_t t = 0; t < tiles; ++t) {
      tile_damping[t] = T(0.01) * T(1 + t);
      tile_scale[t] = T(0.5) + T(0.25) * T(t % 3);
    }
    for (int k = 0; k < n_phases; ++k) {
      const Phase& ph = schedule[k];
      auto g = random_vec<T>(n * d, 100 * d + k);
      g[5 * d + d / 2] = std::numeric_limits<T>::quiet_NaN();
      if (k == 3)  // block 7 indefinite: a failure that does not hang on rounding
        for (auto* F : {&F_cpu, &F_dev}) mbf::compact_entries<T>(F->data(), 7, d)[0] = T(-100);
      mbf::StepConfig cfg{0.05, 0.9, 0.8, ph.damping, 0.01, ph.decoupled};
      cfg.graft = ph.graft;
      cfg.write = ph.write;
      cfg.lagged = ph.lagged;
      cfg.stream_directions = k == 5;  // the measuring pass, as in a bucket above the caches
      mbf::StepTiles<T> tiles_arg;
      if (ph.tile_damping) tiles_arg.damping = tile_damping.data();
      if (ph.graft) {
        tiles_arg.scale = tile_scale.data();
        tiles_arg.norms = norms_cpu.data();
        tiles_arg.directions = dir_cpu;
        if (block_v) tiles_arg.block_v = vb_cpu.data();
      }
      const T c1 = T(0.1 / (1 - std::pow(0.9, k + 1))), s2 = T(1 / std::sqrt(1 - std::pow(0.999, k + 1)));
      mbf::StepSegment<T> seg{p_cpu.data(), g.data(), m_cpu.data(), nullptr, nullptr, nullptr,
                              n, d, 0, d, ph.flags};
      seg.v = block_v ? nullptr : v_cpu.data();
      seg.graft_c1 = c1;
      seg.graft_s2 = s2;
      const auto want = mbf::cpu::mbf_bucket_step_tiles<T>(&seg, 1, F_cpu.data(), L_cpu.data(),
                                                           d, 0, tiles, cfg, tiles_arg);
      const mbf::StepScalars<T> c = mbf::step_scalars<T>(cfg);
      int64_t skipped = 0, failed = 0;
      MBF_DISPATCH_BLOCK_DIM(d, [&] {
        for (int64_t b = 0; b < n; ++b) {
          const int64_t t = b / mbf::kCompactTile;
          const mbf::BlockExtras<T> ex{ph.tile_damping ? tile_damping[t] : c.damping,
                                       {v_dev.data() + b * d, nullptr, d}, c1, s2,
                                       tile_scale[t],
                                       norms_dev.data() + t * 2 * mbf::kCompactTile +
                                           b % mbf::kCompactTile,
                                       mbf::compact_vector<T>(dir_dev.data(), b, d),
                                       block_v ? vb_dev.data() + b : nullptr};
          const mbf::BlockCounts counts = mbf::step_block<T, kD>(
              {p_dev.data() + b * d, nullptr, d}, {g.data() + b * d, nullptr, d},
              {m_dev.data() + b * d, nullptr, d}, mbf::compact_entries<T>(F_dev.data(), b, d),
              mbf::compact_entries<T>(L_dev.data(), b, d), d, c, ph.flags.update_curvature,
              ph.flags.first_curvature, ph.flags.refactor, ex);
          skipped += counts.skipped_curvature;
          failed += counts.failed_factor;
        }
      });
      EXPECT(k != 3 || failed >= 1, "d=%d: the indefinite block must fail", d);
      EXPECT(skipped == want.skipped_curvature && failed == want.failed_factor,
             "d=%d step %d: counts %lld/%lld, cpu %lld/%lld", d, k + 1, (long long)skipped,
             (long long)failed, (long long)want.skipped_curvature,
             (long long)want.failed_factor);
      const T tol = 20 * tolerance<T>();
      EXPECT(count_mismatches(p_dev, p_cpu, tol) == 0, "d=%d step %d: parameters differ", d, k + 1);
      EXPECT(count_mismatches(m_dev, m_cpu, tol) == 0, "d=%d step %d: momenta differ", d, k + 1);
      EXPECT(count_mismatches(v_dev, v_cpu, tol) == 0, "d=%d step %d: second moments differ", d,
             k + 1);
      // v per block: the real blocks' (the CPU's padding lanes decay, the host's are untouched)
      EXPECT(count_mismatches(std::vector<T>(vb_dev.begin(), vb_dev.begin() + n),
                              std::vector<T>(vb_cpu.begin(), vb_cpu.begin() + n), tol) == 0,
             "d=%d step %d: second moments per block differ", d, k + 1);
      EXPECT(!block_v || !ph.graft || (ph.write && !ph.lagged) || vb_cpu[0] > T(0),
             "d=%d step %d: the measuring pass must write v per block", d, k + 1);
      if (ph.graft) {
        // The norms of real blocks (padding lanes are zero on the CPU, untouched on the host).
        for (int64_t b = 0; b < n; ++b)
          for (int r = 0; r < 2; ++r) {
            const int64_t at = (b / 16) * 32 + r * 16 + b % 16;
            EXPECT(count_mismatches<T>({norms_dev[at]}, {norms_cpu[at]}, 100 * tol) == 0,
                   "d=%d step %d block %lld: norm %d %g / %g", d, k + 1, (long long)b, r,
                   double(norms_dev[at]), double(norms_cpu[at]));
          }
        EXPECT(norms_cpu[(5 / 16) * 32 + 5 % 16] == T(0), "d=%d: the NaN block's norm must be 0",
               d);
      }
      if (ph.graft && !ph.lagged) {  // (the lagged pass stores no direction)
        // Each block's u, to the solve's accuracy: rounding grows with the block's condition
        // (as for the norms), relative to the block's largest entry, not to each entry.
        for (int64_t b = 0; b < n; ++b) {
          T err = T(0), size = T(0);
          for (int e = 0; e < d; ++e) {
            const int64_t at = ((b / 16) * d + e) * 16 + b % 16;
            err = std::max<T>(err, std::fabs(dir_dev[at] - dir_cpu[at]));
            size = std::max<T>(size, std::fabs(dir_cpu[at]));
          }
          EXPECT(!(err > 100 * tol * (1 + size)), "d=%d step %d block %lld: directions differ "
                 "by %g (largest entry %g)", d, k + 1, (long long)b, double(err), double(size));
        }
      }
      // Padding blocks hold whatever each implementation leaves there: compare real blocks.
      for (int64_t b = 0; b < n; ++b)
        for (int64_t e = 0; e < tri; ++e) {
          const int64_t at = (b / 16) * tri * 16 + e * 16 + b % 16;
          EXPECT(count_mismatches<T>({F_dev[at], L_dev[at]}, {F_cpu[at], L_cpu[at]}, tol) == 0,
                 "d=%d step %d block %lld entry %lld: F %g / %g, L %g / %g", d, k + 1,
                 (long long)b, (long long)e, double(F_dev[at]), double(F_cpu[at]),
                 double(L_dev[at]), double(L_cpu[at]));
        }
    }
  }
}

// The compact ops' per-block code (compact_block.h) against the CPU compact ops.
template <typename T>
void test_device_compact_ops_match_cpu_t() {
  for (int d : kDims) {
    const int64_t n = kBlocks, tri = int64_t(d) * (d + 1) / 2;
    const int64_t tiles = (n + mbf::kCompactTile - 1) / mbf::kCompactTile;
    const auto A = random_spd<T>(n, d, 7 + d);
    std::vector<T> F_cpu(tiles * tri * mbf::kCompactTile, T(0));
    for (int64_t b = 0; b < n; ++b)
      for (int i = 0; i < d; ++i)
        for (int j = 0; j <= i; ++j)
          mbf::compact_entries<T>(F_cpu.data(), b, d)[mbf::packed_index(i, j)] =
              A[b * d * d + i * d + j];
    // One block indefinite at damping 0.05: info and zeros must match too.
    mbf::compact_entries<T>(F_cpu.data(), 3, d)[0] = T(-100);
    auto F_dev = F_cpu;
    const auto G = random_vec<T>(n * d, 9 + d);
    mbf::cpu::compact_outer_ema_tiles<T>(F_cpu.data(), G.data(), n, d, 0, tiles, T(0.9));
    std::vector<T> L_cpu(F_cpu.size(), T(0)), L_dev(F_cpu.size(), T(0));
    std::vector<int32_t> info_cpu(n), info_dev(n);
    mbf::cpu::compact_cholesky_tiles<T>(F_cpu.data(), L_cpu.data(), info_cpu.data(), n, d, 0,
                                        tiles, T(0.05));
    std::vector<T> X_cpu(n * d), X_dev(n * d);
    mbf::cpu::compact_solve_tiles<T>(L_cpu.data(), G.data(), X_cpu.data(), n, d, 0, tiles);
    MBF_DISPATCH_BLOCK_DIM(d, [&] {
      for (int64_t b = 0; b < n; ++b)
        mbf::compact_outer_ema_block<T, kD>(mbf::compact_entries<T>(F_dev.data(), b, d),
                                            G.data() + b * d, d, T(0.9));
      for (int64_t b = 0; b < n; ++b)
        info_dev[b] = mbf::compact_cholesky_block<T, kD>(
            mbf::compact_entries<const T>(F_dev.data(), b, d),
            mbf::compact_entries<T>(L_dev.data(), b, d), d, T(0.05));
      for (int64_t b = 0; b < n; ++b)
        mbf::compact_solve_block<T, kD>(mbf::compact_entries<const T>(L_dev.data(), b, d),
                                        G.data() + b * d, X_dev.data() + b * d, d);
    });
    const T tol = 10 * tolerance<T>();
    EXPECT(info_dev == info_cpu && info_dev[3] == 1, "d=%d: info differs", d);
    // Real blocks only: the CPU kernels also compute on the padding lanes of the last tile.
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t e = 0; e < tri; ++e) {
        const int64_t at = (b / 16) * tri * 16 + e * 16 + b % 16;
        EXPECT(count_mismatches<T>({F_dev[at]}, {F_cpu[at]}, tol) == 0,
               "d=%d block %lld: outer EMA differs", d, (long long)b);
        EXPECT(count_mismatches<T>({L_dev[at]}, {L_cpu[at]}, tol) == 0,
               "d=%d block %lld: factor differs", d, (long long)b);
      }
      if (info_dev[b] == 0)
        for (int i = 0; i < d; ++i)
          EXPECT(count_mismatches<T>({X_dev[b * d + i]}, {X_cpu[b * d + i]}, tol) == 0,
                 "d=%d block %lld: solve differs", d, (long long)b);
    }
  }
}

// The factor in bfloat16 (factor_dtype): rounded to nearest, ties to even, as torch rounds; the
// refactor stores exactly the rounded float32 factor, and every solve reads the stored values:
// from the same (rounded) factor, the bfloat16 step and the float32 step agree bit for bit.
void test_bf16_factor_step() {
  using mbf::Bf16;
  auto bits = [](float x) { return mbf::bf16_from_float(x).bits; };
  EXPECT(bits(1.0f) == 0x3F80, "1.0");
  EXPECT(bits(1.0f + 0x1p-8f) == 0x3F80, "a tie rounds to the even 1.0");
  EXPECT(bits(1.0f + 3 * 0x1p-8f) == 0x3F82, "a tie rounds to the even neighbour above");
  EXPECT(bits(1.0f + 0x1p-8f + 0x1p-20f) == 0x3F81, "above the tie rounds up");
  EXPECT(bits(-1.5f) == 0xBFC0, "-1.5");
  EXPECT(bits(std::numeric_limits<float>::infinity()) == 0x7F80, "inf");
  EXPECT(bits(std::numeric_limits<float>::max()) == 0x7F80, "FLT_MAX rounds to inf");
  const float nan = mbf::bf16_to_float(mbf::bf16_from_float(std::nanf("")));
  EXPECT(std::isnan(nan), "NaN stays NaN");
  EXPECT(mbf::bf16_to_float(Bf16{0x3F81}) == 1.0f + 0x1p-7f, "widening");
  for (int d : kDims) {
    const int64_t n = kBlocks, tri = int64_t(d) * (d + 1) / 2;
    const int64_t tiles = (n + mbf::kCompactTile - 1) / mbf::kCompactTile;
    const int64_t state = tiles * tri * mbf::kCompactTile;
    const auto g = random_vec<float>(n * d, 7 + d);
    auto p16 = random_vec<float>(n * d, 3 + d), p32 = p16;
    std::vector<float> m16(n * d, 0.5f), m32 = m16, F16(state, 0.0f), F32(state, 0.0f);
    std::vector<float> L32(state, 0.0f);
    std::vector<Bf16> L16(state, Bf16{0});
    auto step = [&](std::vector<float>& p, std::vector<float>& m, std::vector<float>& F,
                    auto* L, mbf::StepFlags flags, const mbf::StepConfig& cfg,
                    const mbf::StepTiles<float>& tiles_in = {}) {
      const mbf::StepSegment<float> seg{p.data(), g.data(), m.data(), nullptr, nullptr, nullptr,
                                        n, d, 0, d, flags};
      mbf::cpu::mbf_bucket_step_tiles(&seg, 1, F.data(), L, d, 0, tiles, cfg, tiles_in);
    };
    // The refactor (first refresh, paper's pass): the stored factor is the float32 one rounded.
    const mbf::StepConfig paper{0.05, 0.9, 0.9, 0.1, 0.01, true};
    step(p16, m16, F16, L16.data(), {true, true, true}, paper);
    step(p32, m32, F32, L32.data(), {true, true, true}, paper);
    for (int64_t i = 0; i < state; ++i)
      EXPECT(L16[i].bits == mbf::bf16_from_float(L32[i]).bits, "d=%d factor entry %lld", d,
             (long long)i);
    if (mbf::is_hot_block_dim(d)) {
      // The CUDA kernels' per-block code (compact_block.h; a bfloat16 factor at the hot sizes),
      // here on the host: the refactor's factor within one bfloat16 ulp of the CPU's (two
      // float32 factorisations round alike except next to a rounding boundary), and from the
      // CPU's stored factor the cached step to float32 rounding.
      auto pd = random_vec<float>(n * d, 3 + d);
      std::vector<float> md(n * d, 0.5f), Fd(state, 0.0f);
      std::vector<Bf16> Ld(state, Bf16{0});
      std::vector<float> scratch(16 * d + 64, 0.0f);
      auto device_step = [&](mbf::StepFlags flags) {
        const mbf::StepScalars<float> c = mbf::step_scalars<float>(paper);
        MBF_DISPATCH_BLOCK_DIM(d, [&] {
          if constexpr (kD > 0) {
            for (int64_t b = 0; b < n; ++b) {
              // (the paper's pass reads no v, norms or direction; real buffers all the same)
              const mbf::BlockExtras<float> ex{
                  c.damping, {scratch.data(), nullptr, d}, 1.0f, 1.0f, 1.0f, scratch.data(),
                  mbf::compact_vector<float>(scratch.data(), 0, d)};
              mbf::step_block<float, kD, Bf16>(
                  {pd.data() + b * d, nullptr, d}, {g.data() + b * d, nullptr, d},
                  {md.data() + b * d, nullptr, d}, mbf::compact_entries<float>(Fd.data(), b, d),
                  mbf::compact_entries<Bf16>(Ld.data(), b, d), d, c, flags.update_curvature,
                  flags.first_curvature, flags.refactor, ex);
            }
          }
        });
      };
      device_step({true, true, true});
      for (int64_t b = 0; b < n; ++b)
        for (int64_t e = 0; e < tri; ++e) {
          const int64_t at = (b / 16) * tri * 16 + e * 16 + b % 16;
          const float dev = mbf::bf16_to_float(Ld[at]), cpu = mbf::bf16_to_float(L16[at]);
          EXPECT(std::fabs(dev - cpu) <= 0x1p-7f * std::fabs(cpu), "d=%d block %lld entry %lld: "
                 "factor %g on the device, %g on the CPU", d, (long long)b, (long long)e,
                 double(dev), double(cpu));
        }
      Ld = L16;
      pd = p16;
      md = m16;
      device_step({false, false, false});
      auto pc = p16, mc = m16;
      auto Fc = F16;
      auto Lc = L16;
      step(pc, mc, Fc, Lc.data(), {false, false, false}, paper);
      EXPECT(count_mismatches(pd, pc, 20 * tolerance<float>()) == 0 &&
                 count_mismatches(md, mc, 20 * tolerance<float>()) == 0,
             "d=%d: the device's cached step differs from the CPU's", d);
    }
    // From the same stored factor: the paper's pass, then a grafted measuring pass.
    for (int64_t i = 0; i < state; ++i) L32[i] = mbf::bf16_to_float(L16[i]);
    p32 = p16;
    m32 = m16;
    step(p16, m16, F16, L16.data(), {false, false, false}, paper);
    step(p32, m32, F32, L32.data(), {false, false, false}, paper);
    EXPECT(p16 == p32 && m16 == m32, "d=%d: the cached step differs", d);
    mbf::StepConfig measure = paper;
    measure.write = false;
    measure.graft = true;
    std::vector<float> v16(n * d, 0.25f), v32 = v16, norms16(tiles * 2 * mbf::kCompactTile);
    std::vector<float> norms32 = norms16, dir16(tiles * d * mbf::kCompactTile), dir32 = dir16;
    auto measured = [&](std::vector<float>& p, std::vector<float>& m, std::vector<float>& v,
                        std::vector<float>& F, auto* L, std::vector<float>& norms,
                        std::vector<float>& dir) {
      mbf::StepSegment<float> seg{p.data(), g.data(), m.data(), nullptr, nullptr, nullptr,
                                  n, d, 0, d, {false, false, false}};
      seg.v = v.data();
      mbf::StepTiles<float> out;
      out.norms = norms.data();
      out.directions = dir.data();
      mbf::cpu::mbf_bucket_step_tiles(&seg, 1, F.data(), L, d, 0, tiles, measure, out);
    };
    measured(p16, m16, v16, F16, L16.data(), norms16, dir16);
    measured(p32, m32, v32, F32, L32.data(), norms32, dir32);
    EXPECT(m16 == m32 && v16 == v32 && norms16 == norms32 && dir16 == dir32,
           "d=%d: the grafted measuring pass differs", d);
  }
}

// factor_dtype="int8" (mbf/batched.h UnitI8) at this level: the refactor codes U = L D^{-1}
// within half a code step (the block's scale / 2) of the float32 factor's and r = 1 / L_ii^2
// within half a bfloat16 ulp; from the coded factor the cached step matches the float32 step
// from the same factor decoded (L_ij = code_ij scale / sqrt(r_j), 1 / L_ii = sqrt(r_i)) to
// float32 rounding.
void test_unit_factor_step() {
  for (int d : kDims) {
    if (d < mbf::kUnitMinDim) continue;
    const int64_t n = kBlocks, tri = int64_t(d) * (d + 1) / 2, strict = tri - d;
    const int64_t tiles = (n + mbf::kCompactTile - 1) / mbf::kCompactTile;
    const int64_t state = tiles * tri * mbf::kCompactTile;
    const int64_t rows = mbf::unit_factor_rows(d);
    const auto g = random_vec<float>(n * d, 7 + d);
    auto p8 = random_vec<float>(n * d, 3 + d), p32 = p8;
    std::vector<float> m8(n * d, 0.5f), m32 = m8, F8(state, 0.0f), F32(state, 0.0f);
    std::vector<float> L32(state, 0.0f);
    std::vector<mbf::UnitI8> Q(tiles * rows * mbf::kCompactTile, mbf::UnitI8{0});
    auto step = [&](std::vector<float>& p, std::vector<float>& m, std::vector<float>& F,
                    auto* L, mbf::StepFlags flags, const mbf::StepConfig& cfg) {
      const mbf::StepSegment<float> seg{p.data(), g.data(), m.data(), nullptr, nullptr, nullptr,
                                        n, d, 0, d, flags};
      mbf::cpu::mbf_bucket_step_tiles(&seg, 1, F.data(), L, d, 0, tiles, cfg);
    };
    const mbf::StepConfig paper{0.05, 0.9, 0.9, 0.1, 0.01, true};
    step(p8, m8, F8, Q.data(), {true, true, true}, paper);
    step(p32, m32, F32, L32.data(), {true, true, true}, paper);
    auto at = [&](int64_t b, int64_t row) { return ((b / 16) * rows + row) * 16 + b % 16; };
    auto entry = [&](int64_t b, int64_t e) { return ((b / 16) * tri + e) * 16 + b % 16; };
    std::vector<float> decoded(state, 0.0f);
    for (int64_t b = 0; b < n; ++b) {
      float scale;
      std::memcpy(&scale, &Q[at(b, strict)] - b % 16 + 4 * (b % 16), sizeof(scale));
      const auto* pivots = reinterpret_cast<const mbf::Bf16*>(&Q[at(b, strict + 4)] - b % 16);
      for (int i = 0; i < d; ++i) {
        const double inv_i = L32[entry(b, i * (i + 1) / 2 + i)];
        const float r = mbf::bf16_to_float(pivots[i * 16 + b % 16]);
        EXPECT(std::fabs(r - inv_i * inv_i) <= 0x1p-8 * inv_i * inv_i, "d=%d block %lld r_%d",
               d, (long long)b, i);
        decoded[entry(b, i * (i + 1) / 2 + i)] = std::sqrt(r);
        for (int j = 0; j < i; ++j) {
          const double u = double(L32[entry(b, i * (i + 1) / 2 + j)]) *
                           L32[entry(b, j * (j + 1) / 2 + j)];
          const float coded = Q[at(b, i * (i - 1) / 2 + j)].code * scale;
          EXPECT(std::fabs(coded - u) <= 0.5 * scale * (1 + 0x1p-7), "d=%d block %lld U_%d%d: "
                 "%g coded, %g", d, (long long)b, i, j, double(coded), u);
          const double r_j = mbf::bf16_to_float(pivots[j * 16 + b % 16]);
          decoded[entry(b, i * (i + 1) / 2 + j)] = float(coded / std::sqrt(r_j));
        }
      }
    }
    // From the same factor, coded and decoded: the cached paper's pass.
    p32 = p8;
    m32 = m8;
    step(p8, m8, F8, Q.data(), {false, false, false}, paper);
    step(p32, m32, F32, decoded.data(), {false, false, false}, paper);
    EXPECT(count_mismatches(p8, p32, 20 * tolerance<float>()) == 0 &&
               count_mismatches(m8, m32, 20 * tolerance<float>()) == 0,
           "d=%d: the cached step from the unit factor differs", d);
  }
}

template <void (*F32)(), void (*F64)()>
void both() {
  F32();
  F64();
}

#ifndef MBF_CPU_ISA
#define MBF_CPU_ISA "default"
#endif

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> cases = {
      {"cholesky_reconstructs", both<test_cholesky_reconstructs_t<float>, test_cholesky_reconstructs_t<double>>},
      {"solve_residual", both<test_solve_residual_t<float>, test_solve_residual_t<double>>},
      {"inverse_identity", both<test_inverse_identity_t<float>, test_inverse_identity_t<double>>},
      {"outer_ema", both<test_outer_ema_t<float>, test_outer_ema_t<double>>},
      {"failures_are_isolated", both<test_failures_are_isolated_t<float>, test_failures_are_isolated_t<double>>},
      {"hot_sizes_match_generic", both<test_hot_sizes_match_generic_t<float>, test_hot_sizes_match_generic_t<double>>},
      {"step_first_is_sherman_morrison", both<test_step_first_is_sherman_morrison_t<float>, test_step_first_is_sherman_morrison_t<double>>},
      {"step_failure_falls_back", both<test_step_failure_falls_back_t<float>, test_step_failure_falls_back_t<double>>},
      {"bucket_segments_match_rows", both<test_bucket_segments_match_rows_t<float>, test_bucket_segments_match_rows_t<double>>},
      {"device_step_matches_cpu_step", both<test_device_step_matches_cpu_step_t<float, false>, test_device_step_matches_cpu_step_t<double, false>>},
      {"device_step_matches_cpu_step_v_per_block", both<test_device_step_matches_cpu_step_t<float, true>, test_device_step_matches_cpu_step_t<double, true>>},
      {"device_compact_ops_match_cpu", both<test_device_compact_ops_match_cpu_t<float>, test_device_compact_ops_match_cpu_t<double>>},
      {"bf16_factor_step", test_bf16_factor_step},
      {"unit_factor_step", test_unit_factor_step},
  };
  if (!mbf::cpu::cpu_runs_level(MBF_CPU_ISA)) {
    std::fprintf(stderr, "skipped: this CPU cannot run the %s kernels\n", MBF_CPU_ISA);
    return 77;  // ctest: SKIP_RETURN_CODE
  }
  if (argc != 2 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: %s <case>; cases:", argv[0]);
    for (const auto& kv : cases) std::fprintf(stderr, " %s", kv.first.c_str());
    std::fprintf(stderr, "\n");
    return 2;
  }
  cases.at(argv[1])();
  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  return g_failures ? 1 : 0;
}
