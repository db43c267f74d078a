// Input checks shared by the CPU and CUDA op implementations. The Python
// layer (mbf_kernels/linalg.py) validates with friendlier messages and
// flattens batches; these checks guard direct calls through
// torch.ops.mbf_kernels.*. Any strides are accepted: inputs are made
// contiguous (a no-op when they already are), and an in-place output that is
// not contiguous is computed in a contiguous copy and written back.
#pragma once

#include <ATen/ATen.h>

namespace mbf {
namespace ops {

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

}  // namespace ops
}  // namespace mbf
