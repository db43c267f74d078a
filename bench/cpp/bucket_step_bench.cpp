// Where the CPU bucket step's time goes, without torch or Python: the shipped default step
// (grafted at the previous step's ratios, Adam's v per block, d = 9, a conv weight's contiguous
// 3x3 blocks) with a bfloat16 factor and with the int8 unit factor (factor_dtype="auto" on
// CPU), on a bucket that fits in L2 (its arithmetic alone) and on one of DRAM
// size (arithmetic and memory), beside plain passes: one over the bfloat16 step's bytes (the
// memory roof for this stream pattern: reads g, m, p, v per block and the factor, writes m, p
// and v), the same reading only, and Adam's element-wise pass (what fused AdamW moves).
// One executable per ISA level (CMake target mbf_bucket_step_bench_<level>), all threads of
// OpenMP (OMP_NUM_THREADS to change), medians (min-max) over the repetitions:
//
//   build/cmake/mbf_bucket_step_bench_avx512 [repetitions]
//
// bench/RESULTS.md ("What the bucket step's time is made of") has the numbers and reading.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "mbf/batched.h"
#include "mbf/cpu_features.h"

#ifndef MBF_CPU_ISA
#define MBF_CPU_ISA "default"
#endif

namespace {

constexpr int kD = 9, kTri = kD * (kD + 1) / 2, kUnitRows = mbf::unit_factor_rows(kD);
// Adam's element-wise pass moves p, g, m, v in and p, m, v out: 28 B per element, 16 read.
constexpr double kAdamBytes = 28, kAdamReadBytes = 16;

// 2 MB-aligned (huge-page friendly), zero-filled.
template <typename T>
std::unique_ptr<T[], decltype(&std::free)> buffer(int64_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 1 << 21, std::max<int64_t>(n, 1) * sizeof(T)) != 0) std::abort();
  std::memset(p, 0, n * sizeof(T));
  return {static_cast<T*>(p), &std::free};
}

struct Timing {
  double median, min, max;
};

template <typename F>
Timing seconds(int reps, F&& run) {
  run();  // warm: page faults, OpenMP's threads
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back()};
}

struct Bucket {
  int64_t blocks, tiles;
  std::unique_ptr<float[], decltype(&std::free)> p, g, m, v, F, block_v, norms, scale;
  std::unique_ptr<mbf::Bf16[], decltype(&std::free)> factor;
  std::unique_ptr<mbf::UnitI8[], decltype(&std::free)> unit;  // the same factor in int8
  explicit Bucket(int64_t n)
      : blocks(n), tiles((n + mbf::kCompactTile - 1) / mbf::kCompactTile), p(buffer<float>(n * kD)),
        g(buffer<float>(n * kD)), m(buffer<float>(n * kD)), v(buffer<float>(n * kD)),
        F(buffer<float>(tiles * kTri * mbf::kCompactTile)),
        block_v(buffer<float>(tiles * mbf::kCompactTile)), norms(buffer<float>(tiles * 2)),
        scale(buffer<float>(tiles)), factor(buffer<mbf::Bf16>(tiles * kTri * mbf::kCompactTile)),
        unit(buffer<mbf::UnitI8>(tiles * kUnitRows * mbf::kCompactTile)) {
    for (int64_t i = 0; i < n * kD; ++i) {
      p[i] = float(i % 13) * 0.1f;
      g[i] = float((i * 31) % 89 + 1) * 1e-3f;
      m[i] = float(i % 97) * 0.01f;
    }
    // An SPD factor: the identity (diagonal entries hold 1 / L_ii), lower entries small.
    for (int64_t t = 0; t < tiles; ++t) {
      scale[t] = 1.0f;
      for (int i = 0; i < kD; ++i)
        for (int j = 0; j <= i; ++j)
          for (int l = 0; l < mbf::kCompactTile; ++l)
            factor[((t * kTri) + i * (i + 1) / 2 + j) * mbf::kCompactTile + l] =
                mbf::bf16_from_float(i == j ? 1.0f : 0.01f);
    }
    // ... as a unit factor: codes 127 at scale 0.01 / 127 (batched.h UnitI8), pivots 1.
    for (int64_t t = 0; t < tiles; ++t) {
      int8_t* tile = reinterpret_cast<int8_t*>(unit.get()) + t * kUnitRows * mbf::kCompactTile;
      constexpr int strict = kD * (kD - 1) / 2;
      std::memset(tile, 127, strict * mbf::kCompactTile);
      float* scales = reinterpret_cast<float*>(tile + strict * mbf::kCompactTile);
      mbf::Bf16* pivots =
          reinterpret_cast<mbf::Bf16*>(tile + (strict + mbf::kUnitScaleRows) * mbf::kCompactTile);
      for (int l = 0; l < mbf::kCompactTile; ++l) scales[l] = 0.01f / 127;
      for (int k = 0; k < kD * mbf::kCompactTile; ++k) pivots[k] = mbf::bf16_from_float(1.0f);
    }
    for (int64_t i = 0; i < tiles * mbf::kCompactTile; ++i) block_v[i] = 1e-4f;
  }
  // The factor's bytes per block: 45 bfloat16, or the int8 unit factor's 58.
  static constexpr double kBf16Factor = 2.0 * kTri, kUnitFactor = kUnitRows;
  // Bytes one step moves per element: g, m (read and written), p (read and written), the
  // factor and v per block.
  static double bytes_per_element(double factor) { return 4 + 8 + 8 + factor / kD + 8.0 / kD; }
  // Of which read: g, m, p, the factor and v per block (22.4 B with the bfloat16 factor).
  static double read_bytes_per_element(double factor) {
    return 4 + 4 + 4 + factor / kD + 4.0 / kD;
  }

  // The optimizer's default step on the CPU (MBF's lagged grafted pass; see StepConfig), with
  // the factor at `stored`.
  template <typename FT>
  void step(FT* stored) {
    mbf::StepConfig cfg{1e-3, 0.9, 0.95, 1e-2, 1e-4, true};
    cfg.graft = cfg.lagged = true;
    mbf::StepTiles<float> st;
    st.scale = scale.get();
    st.norms = norms.get();
    st.block_v = block_v.get();
    st.norm_sums = true;
    mbf::StepSegment<float> seg{p.get(), g.get(), m.get(), nullptr, nullptr, nullptr, blocks,
                                kD, 0, kD, mbf::StepFlags{false, false, false}};
    seg.graft_c1 = 0.1f;
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
      mbf::cpu::mbf_bucket_step_tiles<float, FT>(&seg, 1, F.get(), stored, kD, tiles * id / nt,
                                                 tiles * (id + 1) / nt, cfg, st);
    }
  }

  // The same bytes in one plain pass, tile by tile as the step takes them (no solve, no
  // transposes, no software prefetch): what the memory system gives this pattern of streams.
  // The factor's sum keeps its reads live. (Full tiles only: the sizes below have no tail.)
  void stream(bool write) {
    const uint16_t* f = reinterpret_cast<const uint16_t*>(factor.get());
    constexpr int64_t tile_factor = int64_t(kTri) * mbf::kCompactTile;
    constexpr int64_t tile_elems = int64_t(mbf::kCompactTile) * kD;
    const int64_t full_tiles = blocks / mbf::kCompactTile;
    uint32_t live = 0;
#pragma omp parallel for reduction(+ : live) schedule(static)
    for (int64_t t = 0; t < full_tiles; ++t) {
      uint32_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < tile_factor; ++k) s += f[t * tile_factor + k];
      float* mt = m.get() + t * tile_elems;
      float* pt = p.get() + t * tile_elems;
      const float* gt = g.get() + t * tile_elems;
      float* vt = block_v.get() + t * mbf::kCompactTile;
      if (write) {
#pragma omp simd
        for (int64_t e = 0; e < tile_elems; ++e) {
          mt[e] = 0.9f * mt[e] + gt[e];
          pt[e] -= 1e-3f * mt[e];
        }
#pragma omp simd
        for (int l = 0; l < mbf::kCompactTile; ++l) vt[l] = 0.999f * vt[l] + 1e-3f * gt[l];
      } else {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t e = 0; e < tile_elems; ++e) sum += mt[e] + gt[e] + pt[e];
#pragma omp simd reduction(+ : sum)
        for (int l = 0; l < mbf::kCompactTile; ++l) sum += vt[l];
        s += sum > 1e30f;
      }
      live += s;
    }
    if (live == 1) std::puts("");  // (never: keeps the factor's reads)
  }

  // Adam's element-wise pass over the same entries (kAdamBytes), vectorised in contiguous
  // chunks as torch's fused CPU AdamW runs: that pattern's roof, beside the step's.
  void adam_pass() {
    const int64_t n = blocks * kD;
#pragma omp parallel for simd schedule(static)
    for (int64_t e = 0; e < n; ++e) {
      m[e] = 0.9f * m[e] + 0.1f * g[e];
      v[e] = 0.999f * v[e] + 1e-3f * g[e] * g[e];
      p[e] -= 1e-3f * m[e] / (std::sqrt(v[e]) + 1e-8f);
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (!mbf::cpu::cpu_runs_level(MBF_CPU_ISA)) {
    std::fprintf(stderr, "skipped: this CPU cannot run the %s kernels\n", MBF_CPU_ISA);
    return 77;
  }
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 30;
  std::printf("level %s, %d threads, d = %d, medians of %d\n", MBF_CPU_ISA,
              omp_get_max_threads(), kD, reps);
  // 4096 blocks: 0.6 MB of state, in L2; 1.63M blocks: VGG16's conv weights (14.7M entries).
  for (const int64_t blocks : {int64_t(4096), int64_t(1632000)}) {
    Bucket b(blocks);
    const int r = blocks < 100000 ? reps * 100 : reps;
    const double elems = double(blocks) * kD;
    // One line per pass: `what` with the bytes per element it moves, and its rate at them.
    auto report = [&](const char* what, Timing s, double bytes) {
      char label[64];
      std::snprintf(label, sizeof(label), "%s (%.1f B/element)", what, bytes);
      std::printf("%8ld blocks  %-52s %8.3f ms (%.3f-%.3f)  %6.3f ns/element  %6.1f GB/s\n",
                  long(blocks), label, s.median * 1e3, s.min * 1e3, s.max * 1e3,
                  s.median * 1e9 / elems, bytes * elems / s.median / 1e9);
      return s.median;
    };
    const double step = report("bucket step, bfloat16 factor",
                               seconds(r, [&] { b.step(b.factor.get()); }),
                               Bucket::bytes_per_element(Bucket::kBf16Factor));
    const double plain = report("plain pass, the bfloat16 step's bytes",
                                seconds(r, [&] { b.stream(true); }),
                                Bucket::bytes_per_element(Bucket::kBf16Factor));
    report("its reads alone", seconds(r, [&] { b.stream(false); }),
           Bucket::read_bytes_per_element(Bucket::kBf16Factor));
    const double unit = report("bucket step, int8 factor (default)",
                               seconds(r, [&] { b.step(b.unit.get()); }),
                               Bucket::bytes_per_element(Bucket::kUnitFactor));
    const double adam = report("Adam's pass", seconds(r, [&] { b.adam_pass(); }), kAdamBytes);
    std::printf("%8ld blocks  bfloat16 factor: step / plain pass %.2fx, step / Adam's pass %.2fx "
                "(bytes read per element %.2fx Adam's); int8 factor: step / Adam's pass %.2fx "
                "(bytes read %.2fx)\n", long(blocks), step / plain, step / adam,
                Bucket::read_bytes_per_element(Bucket::kBf16Factor) / kAdamReadBytes,
                unit / adam, Bucket::read_bytes_per_element(Bucket::kUnitFactor) / kAdamReadBytes);
  }
  return 0;
}
