// Gaussian-weighted axial attention (MT-UNet GaussianTrans), fused C++ CPU kernels.
//
// Math (θ = shift; bias cancels in both softmaxes and never reaches this file), for batch b and
// pixel (r, c) of an H×W grid with D features:
//
//   row part:    px[j] = softmax_j(Sx[r, c, j] − θ (j − c)²),  j < W,   o_row[r, c] = Σ_j px[j] v[r, j]
//   column part: py[i] = softmax_i(Sy[c, r, i] − θ (i − r)²),  i < H,   o_col[r, c] = Σ_i py[i] v[i, c]
//   out = o_row + o_col
//
// with the scores either given (Sx = atten_x (B,H,W,W), Sy = atten_y (B,W,H,H): GaussianTrans's own
// interface) or computed here from q, k (Sx[r,c,j] = q[r,c]·k[r,j], Sy[c,r,i] = q[r,c]·k[i,c]).
//
// Both halves are the same computation on a "line" of L pixels — a row (b, r), L = W, or a
// column (b, c), L = H: a small L×L attention with a Gaussian distance penalty. Each kernel runs
// two passes, rows then columns, each an at::parallel_for over its lines. A line owns every
// output it touches within its pass (outputs, gradients of its q/k/v pixels, its block of the score
// gradients), so the passes need no atomics and the results do not depend on the thread count.
// The row pass writes its part in the accumulation type (float, or double for float64 inputs);
// the column pass adds its part and writes the final value in the input dtype.
//
// From q, k, v the L×L scores of one line are computed on the fly and only the per-pixel softmax
// statistics (log-sum-exp of each pixel's row and column softmax, float/double) are saved for the
// backward pass, which recomputes the probabilities (as flash attention does). The full W×W and
// H×H score maps are never materialised.
//
// Inputs of any strides are read through their strides. A line operand whose dtype already is the
// accumulation type and whose feature dim is unit-stride is used in place; otherwise the line (L×D)
// is converted into a small per-thread buffer, which then stays in cache for the L×L×D work.
//
// Vectorisation: the inner loops over D are plain loops marked `omp simd`, compiled three times
// (AVX-512, AVX2+FMA, baseline) via GCC target attributes and chosen at run time from ATen's CPU
// capability (which honours ATEN_CPU_CAPABILITY), so the JIT-built extension needs no -march flag.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "vec_math.h"

namespace medattn {
namespace gaussian_axial {
namespace {

// ------------------------------------------------------------------------------------------------
// geometry
// ------------------------------------------------------------------------------------------------

// float for float32/float16/bfloat16 inputs, double for float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

enum class Axis { kRows, kCols };

// One line of a (B, H, W, X) tensor: the first pixel, the step between pixels and the step along X.
template <typename T>
struct Line {
  T* ptr;
  int64_t step;
  int64_t inner;
};

struct Strides {
  int64_t s[4];
};

Strides strides_of(const at::Tensor& t) {
  return {{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// Row line (b, idx = r) runs along W; column line (b, idx = c) runs along H.
template <typename T>
MEDATTN_INLINE Line<T> pixel_line(T* base, const Strides& st, Axis axis, int64_t b, int64_t idx) {
  if (axis == Axis::kRows) return {base + b * st.s[0] + idx * st.s[1], st.s[2], st.s[3]};
  return {base + b * st.s[0] + idx * st.s[2], st.s[1], st.s[3]};
}

// The L×L scores of line (b, idx): atten_x[b, r] for rows, atten_y[b, c] for columns. In both
// tensors the line is indexed by dim 1, the query pixel by dim 2 and the key pixel by dim 3.
template <typename T>
MEDATTN_INLINE Line<T> score_line(T* base, const Strides& st, int64_t b, int64_t idx) {
  return {base + b * st.s[0] + idx * st.s[1], st.s[2], st.s[3]};
}

// ------------------------------------------------------------------------------------------------
// line operands and stores
// ------------------------------------------------------------------------------------------------

// An L×D operand with unit stride along D and leading dimension `ld`.
template <typename acc_t>
struct Panel {
  const acc_t* ptr;
  int64_t ld;
};

// Use the line in place when it already is a unit-stride acc_t panel; else convert it into `buf`.
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE Panel<acc_t> load_panel(Line<const scalar_t> line, int64_t L, int64_t D, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (line.inner == 1) return {line.ptr, line.step};
  }
  for (int64_t l = 0; l < L; ++l) {
    const scalar_t* src = line.ptr + l * line.step;
    acc_t* dst = buf + l * D;
    if (line.inner == 1) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * line.inner]);
    }
  }
  return {buf, D};
}

// Write an L×D acc_t panel into a line of an output tensor (unit stride along D, ours).
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void store_panel(const acc_t* src, int64_t ld_src, Line<scalar_t> line, int64_t L, int64_t D) {
  for (int64_t l = 0; l < L; ++l) {
    const acc_t* s = src + l * ld_src;
    scalar_t* dst = line.ptr + l * line.step;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(s[d]);
  }
}

// ------------------------------------------------------------------------------------------------
// small dense kernels on a line (L ≤ a few hundred, D up to thousands)
// ------------------------------------------------------------------------------------------------

// Width of the D blocks of gemm_nn (64 floats / 32 doubles: one block of X rows stays in L1), and
// the size of gemm_nn_block's stack accumulators, which hold at most one block.
template <typename acc_t>
constexpr int kFeatureBlock = 256 / static_cast<int>(sizeof(acc_t));

// Y[m, :] (+)= Σ_n A(m, n) X[n, :] for m < M, n < N, over `width` columns starting at column 0 of
// the panels. A(m, n) = A[m * a_rs + n * a_cs] (so a transposed A is a stride swap). Two output rows
// share every load of X; `kWidth` > 0 fixes the width at compile time so the accumulators live in
// registers (kWidth = 0: the run-time `width` tail).
template <typename acc_t, bool kAccumulate, int kWidth>
MEDATTN_INLINE void gemm_nn_block(int64_t M, int64_t N, int64_t width, const acc_t* A, int64_t a_rs, int64_t a_cs,
                                  const acc_t* X, int64_t ldx, acc_t* Y, int64_t ldy) {
  constexpr int kMax = kWidth > 0 ? kWidth : kFeatureBlock<acc_t>;
  const int64_t w = kWidth > 0 ? kWidth : width;
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    acc_t y0[kMax], y1[kMax];
    acc_t* out0 = Y + m * ldy;
    acc_t* out1 = out0 + ldy;
#pragma omp simd
    for (int64_t d = 0; d < w; ++d) {
      y0[d] = kAccumulate ? out0[d] : acc_t(0);
      y1[d] = kAccumulate ? out1[d] : acc_t(0);
    }
    const acc_t* a0 = A + m * a_rs;
    const acc_t* a1 = a0 + a_rs;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t p0 = a0[n * a_cs];
      const acc_t p1 = a1[n * a_cs];
      const acc_t* x = X + n * ldx;
#pragma omp simd
      for (int64_t d = 0; d < w; ++d) {
        y0[d] += p0 * x[d];
        y1[d] += p1 * x[d];
      }
    }
#pragma omp simd
    for (int64_t d = 0; d < w; ++d) {
      out0[d] = y0[d];
      out1[d] = y1[d];
    }
  }
  if (m < M) {
    acc_t y0[kMax];
    acc_t* out0 = Y + m * ldy;
#pragma omp simd
    for (int64_t d = 0; d < w; ++d) y0[d] = kAccumulate ? out0[d] : acc_t(0);
    const acc_t* a0 = A + m * a_rs;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t p0 = a0[n * a_cs];
      const acc_t* x = X + n * ldx;
#pragma omp simd
      for (int64_t d = 0; d < w; ++d) y0[d] += p0 * x[d];
    }
#pragma omp simd
    for (int64_t d = 0; d < w; ++d) out0[d] = y0[d];
  }
}

// Y (+)= A X over all D columns, blocked over D so a block of X stays in L1 across the M rows.
template <typename acc_t, bool kAccumulate>
MEDATTN_INLINE void gemm_nn(int64_t M, int64_t N, int64_t D, const acc_t* A, int64_t a_rs, int64_t a_cs,
                            const acc_t* X, int64_t ldx, acc_t* Y, int64_t ldy) {
  constexpr int kBlock = kFeatureBlock<acc_t>;
  int64_t d0 = 0;
  for (; d0 + kBlock <= D; d0 += kBlock)
    gemm_nn_block<acc_t, kAccumulate, kBlock>(M, N, kBlock, A, a_rs, a_cs, X + d0, ldx, Y + d0, ldy);
  if (d0 < D) gemm_nn_block<acc_t, kAccumulate, 0>(M, N, D - d0, A, a_rs, a_cs, X + d0, ldx, Y + d0, ldy);
}

// C[m * ldc + n] = X[m, :] · Z[n, :] (dot products over D) for m < M, n < N; four n at a time.
template <typename acc_t>
MEDATTN_INLINE void gemm_nt(int64_t M, int64_t N, int64_t D, const acc_t* X, int64_t ldx, const acc_t* Z, int64_t ldz,
                            acc_t* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    const acc_t* x = X + m * ldx;
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
      const acc_t* z0 = Z + n * ldz;
      const acc_t* z1 = z0 + ldz;
      const acc_t* z2 = z1 + ldz;
      const acc_t* z3 = z2 + ldz;
      acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t d = 0; d < D; ++d) {
        const acc_t xd = x[d];
        s0 += xd * z0[d];
        s1 += xd * z1[d];
        s2 += xd * z2[d];
        s3 += xd * z3[d];
      }
      C[m * ldc + n] = s0;
      C[m * ldc + n + 1] = s1;
      C[m * ldc + n + 2] = s2;
      C[m * ldc + n + 3] = s3;
    }
    for (; n < N; ++n) {
      const acc_t* z = Z + n * ldz;
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += x[d] * z[d];
      C[m * ldc + n] = s;
    }
  }
}

// Gaussian-penalised softmax of each row of an L×L logit matrix, in place:
// S[m, n] ← softmax_n(S[m, n] − θ (n − m)²); `lse` (optional) receives each row's log-sum-exp.
template <typename acc_t>
MEDATTN_INLINE void gaussian_softmax_rows(acc_t* S, int64_t L, acc_t shift, acc_t* lse) {
  for (int64_t m = 0; m < L; ++m) {
    acc_t* s = S + m * L;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t n = 0; n < L; ++n) {
      const acc_t dist = static_cast<acc_t>(n - m);
      s[n] -= shift * dist * dist;
      mx = std::max(mx, s[n]);
    }
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t n = 0; n < L; ++n) {
      s[n] = exp_fast(s[n] - mx);
      sum += s[n];
    }
    const acc_t inv = acc_t(1) / sum;
#pragma omp simd
    for (int64_t n = 0; n < L; ++n) s[n] *= inv;
    if (lse) lse[m] = mx + std::log(sum);
  }
}

// Recompute the probabilities from the logits (penalty not yet applied) and each row's saved
// log-sum-exp: S[m, n] ← exp(S[m, n] − θ (n − m)² − lse[m]).
template <typename acc_t>
MEDATTN_INLINE void gaussian_probabilities_from_lse(acc_t* S, int64_t L, acc_t shift, const acc_t* lse,
                                                    int64_t lse_step) {
  for (int64_t m = 0; m < L; ++m) {
    acc_t* s = S + m * L;
    const acc_t row_lse = lse[m * lse_step];
#pragma omp simd
    for (int64_t n = 0; n < L; ++n) {
      const acc_t dist = static_cast<acc_t>(n - m);
      s[n] = exp_fast(s[n] - shift * dist * dist - row_lse);
    }
  }
}

// Softmax backward in place: dP ← P ⊙ (dP − rowsum(P ⊙ dP)) (= gradient of the logits). Returns
// Σ dS[m, n] · (−(n − m)²), this line's contribution to the gradient of θ (accumulated in double).
template <typename acc_t>
MEDATTN_INLINE double softmax_backward_rows(const acc_t* P, acc_t* dP, int64_t L) {
  double shift_grad = 0;
  for (int64_t m = 0; m < L; ++m) {
    const acc_t* p = P + m * L;
    acc_t* dp = dP + m * L;
    acc_t delta = 0;
#pragma omp simd reduction(+ : delta)
    for (int64_t n = 0; n < L; ++n) delta += p[n] * dp[n];
    double row = 0;
#pragma omp simd reduction(+ : row)
    for (int64_t n = 0; n < L; ++n) {
      dp[n] = p[n] * (dp[n] - delta);
      const double dist = static_cast<double>(n - m);
      row -= static_cast<double>(dp[n]) * dist * dist;
    }
    shift_grad += row;
  }
  return shift_grad;
}

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void load_scores(Line<const scalar_t> scores, int64_t L, acc_t* S) {
  for (int64_t m = 0; m < L; ++m)
    for (int64_t n = 0; n < L; ++n) S[m * L + n] = static_cast<acc_t>(scores.ptr[m * scores.step + n * scores.inner]);
}

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void store_scores(const acc_t* S, int64_t L, Line<scalar_t> out) {
  for (int64_t m = 0; m < L; ++m)
    for (int64_t n = 0; n < L; ++n) out.ptr[m * out.step + n * out.inner] = static_cast<scalar_t>(S[m * L + n]);
}

// ------------------------------------------------------------------------------------------------
// per-pass arguments
// ------------------------------------------------------------------------------------------------

// A tensor argument: data pointer and strides.
template <typename T>
struct Arg {
  T* data = nullptr;
  Strides st{};
};

template <typename T>
Arg<T> arg_of(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), strides_of(t)};
}

// The pass's accumulator target: `acc` (acc_t, unit stride along D) receives the row part; the
// column pass adds to it and, when `out` is a different (lower-precision) tensor, writes `out`.
template <typename scalar_t, typename acc_t>
struct Accumulator {
  Arg<acc_t> acc;
  Arg<scalar_t> out;
  bool convert = false;
};

struct Geometry {
  int64_t B, H, W, D;
  Axis axis;
  int64_t lines_per_batch() const { return axis == Axis::kRows ? H : W; }
  int64_t length() const { return axis == Axis::kRows ? W : H; }
};

// Destination panel of a line in an accumulator, and the final store of the column pass.
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE acc_t* acc_line(const Accumulator<scalar_t, acc_t>& a, const Geometry& g, int64_t b, int64_t idx,
                               int64_t* ld) {
  Line<acc_t> line = pixel_line(a.acc.data, a.acc.st, g.axis, b, idx);
  *ld = line.step;
  return line.ptr;
}

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void finish_line(const Accumulator<scalar_t, acc_t>& a, const Geometry& g, int64_t b, int64_t idx) {
  if (g.axis != Axis::kCols || !a.convert) return;
  Line<acc_t> src = pixel_line(a.acc.data, a.acc.st, g.axis, b, idx);
  store_panel<scalar_t, acc_t>(src.ptr, src.step, pixel_line(a.out.data, a.out.st, g.axis, b, idx), g.length(), g.D);
}

// --- from scores -------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct ScoresForward {
  Geometry g;
  acc_t shift;
  Arg<const scalar_t> scores, v;
  Accumulator<scalar_t, acc_t> out;
};

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void scores_forward_lines(const ScoresForward<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t L = g.length(), D = g.D;
  std::vector<acc_t> P(L * L), v_buf(L * D);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.lines_per_batch(), idx = t % g.lines_per_batch();
    load_scores(score_line(a.scores.data, a.scores.st, b, idx), L, P.data());
    gaussian_softmax_rows<acc_t>(P.data(), L, a.shift, nullptr);
    const Panel<acc_t> V = load_panel<scalar_t, acc_t>(pixel_line(a.v.data, a.v.st, g.axis, b, idx), L, D, v_buf.data());
    int64_t ldy;
    acc_t* Y = acc_line(a.out, g, b, idx, &ldy);
    if (g.axis == Axis::kRows)
      gemm_nn<acc_t, false>(L, L, D, P.data(), L, 1, V.ptr, V.ld, Y, ldy);
    else
      gemm_nn<acc_t, true>(L, L, D, P.data(), L, 1, V.ptr, V.ld, Y, ldy);
    finish_line(a.out, g, b, idx);
  }
}

template <typename scalar_t, typename acc_t>
struct ScoresBackward {
  Geometry g;
  acc_t shift;
  Arg<const scalar_t> grad_out, scores, v;
  Arg<scalar_t> grad_scores;
  Accumulator<scalar_t, acc_t> grad_v;
  double* shift_partials;  // one per line of this pass
};

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void scores_backward_lines(const ScoresBackward<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t L = g.length(), D = g.D;
  std::vector<acc_t> P(L * L), dP(L * L), v_buf(L * D), go_buf(L * D);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.lines_per_batch(), idx = t % g.lines_per_batch();
    load_scores(score_line(a.scores.data, a.scores.st, b, idx), L, P.data());
    gaussian_softmax_rows<acc_t>(P.data(), L, a.shift, nullptr);
    const Panel<acc_t> V = load_panel<scalar_t, acc_t>(pixel_line(a.v.data, a.v.st, g.axis, b, idx), L, D, v_buf.data());
    const Panel<acc_t> G =
        load_panel<scalar_t, acc_t>(pixel_line(a.grad_out.data, a.grad_out.st, g.axis, b, idx), L, D, go_buf.data());
    // dP = G Vᵀ, then the logits' gradient in place.
    gemm_nt<acc_t>(L, L, D, G.ptr, G.ld, V.ptr, V.ld, dP.data(), L);
    a.shift_partials[t] = softmax_backward_rows(P.data(), dP.data(), L);
    store_scores<scalar_t, acc_t>(dP.data(), L, score_line(a.grad_scores.data, a.grad_scores.st, b, idx));
    // grad v (+)= Pᵀ G.
    int64_t ldy;
    acc_t* Y = acc_line(a.grad_v, g, b, idx, &ldy);
    if (g.axis == Axis::kRows)
      gemm_nn<acc_t, false>(L, L, D, P.data(), 1, L, G.ptr, G.ld, Y, ldy);
    else
      gemm_nn<acc_t, true>(L, L, D, P.data(), 1, L, G.ptr, G.ld, Y, ldy);
    finish_line(a.grad_v, g, b, idx);
  }
}

// --- from q, k, v ------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct QkvForward {
  Geometry g;
  acc_t shift;
  Arg<const scalar_t> q, k, v;
  Accumulator<scalar_t, acc_t> out;
  Arg<acc_t> lse;  // (B, H, W): this pass's softmax statistics
};

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void qkv_forward_lines(const QkvForward<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t L = g.length(), D = g.D;
  std::vector<acc_t> P(L * L), row_lse(L), q_buf(L * D), k_buf(L * D), v_buf(L * D);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.lines_per_batch(), idx = t % g.lines_per_batch();
    const Panel<acc_t> Q = load_panel<scalar_t, acc_t>(pixel_line(a.q.data, a.q.st, g.axis, b, idx), L, D, q_buf.data());
    const Panel<acc_t> K = load_panel<scalar_t, acc_t>(pixel_line(a.k.data, a.k.st, g.axis, b, idx), L, D, k_buf.data());
    const Panel<acc_t> V = load_panel<scalar_t, acc_t>(pixel_line(a.v.data, a.v.st, g.axis, b, idx), L, D, v_buf.data());
    gemm_nt<acc_t>(L, L, D, Q.ptr, Q.ld, K.ptr, K.ld, P.data(), L);
    gaussian_softmax_rows<acc_t>(P.data(), L, a.shift, row_lse.data());
    Line<acc_t> lse = pixel_line(a.lse.data, a.lse.st, g.axis, b, idx);
    for (int64_t l = 0; l < L; ++l) lse.ptr[l * lse.step] = row_lse[l];
    int64_t ldy;
    acc_t* Y = acc_line(a.out, g, b, idx, &ldy);
    if (g.axis == Axis::kRows)
      gemm_nn<acc_t, false>(L, L, D, P.data(), L, 1, V.ptr, V.ld, Y, ldy);
    else
      gemm_nn<acc_t, true>(L, L, D, P.data(), L, 1, V.ptr, V.ld, Y, ldy);
    finish_line(a.out, g, b, idx);
  }
}

template <typename scalar_t, typename acc_t>
struct QkvBackward {
  Geometry g;
  acc_t shift;
  Arg<const scalar_t> grad_out, q, k, v;
  Arg<const acc_t> lse;
  Accumulator<scalar_t, acc_t> grad_q, grad_k, grad_v;
  double* shift_partials;
};

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void qkv_backward_lines(const QkvBackward<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t L = g.length(), D = g.D;
  std::vector<acc_t> P(L * L), dP(L * L), q_buf(L * D), k_buf(L * D), v_buf(L * D), go_buf(L * D);
  const bool first = g.axis == Axis::kRows;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / g.lines_per_batch(), idx = t % g.lines_per_batch();
    const Panel<acc_t> Q = load_panel<scalar_t, acc_t>(pixel_line(a.q.data, a.q.st, g.axis, b, idx), L, D, q_buf.data());
    const Panel<acc_t> K = load_panel<scalar_t, acc_t>(pixel_line(a.k.data, a.k.st, g.axis, b, idx), L, D, k_buf.data());
    const Panel<acc_t> V = load_panel<scalar_t, acc_t>(pixel_line(a.v.data, a.v.st, g.axis, b, idx), L, D, v_buf.data());
    const Panel<acc_t> G =
        load_panel<scalar_t, acc_t>(pixel_line(a.grad_out.data, a.grad_out.st, g.axis, b, idx), L, D, go_buf.data());
    // Recompute P from the logits and the saved log-sum-exp.
    gemm_nt<acc_t>(L, L, D, Q.ptr, Q.ld, K.ptr, K.ld, P.data(), L);
    const Line<const acc_t> lse = pixel_line(a.lse.data, a.lse.st, g.axis, b, idx);
    gaussian_probabilities_from_lse<acc_t>(P.data(), L, a.shift, lse.ptr, lse.step);
    // dS = P ⊙ (G Vᵀ − rowsum), in dP.
    gemm_nt<acc_t>(L, L, D, G.ptr, G.ld, V.ptr, V.ld, dP.data(), L);
    a.shift_partials[t] = softmax_backward_rows(P.data(), dP.data(), L);
    int64_t ldq, ldk, ldv;
    acc_t* dQ = acc_line(a.grad_q, g, b, idx, &ldq);
    acc_t* dK = acc_line(a.grad_k, g, b, idx, &ldk);
    acc_t* dV = acc_line(a.grad_v, g, b, idx, &ldv);
    if (first) {
      gemm_nn<acc_t, false>(L, L, D, dP.data(), L, 1, K.ptr, K.ld, dQ, ldq);  // dQ = dS K
      gemm_nn<acc_t, false>(L, L, D, dP.data(), 1, L, Q.ptr, Q.ld, dK, ldk);  // dK = dSᵀ Q
      gemm_nn<acc_t, false>(L, L, D, P.data(), 1, L, G.ptr, G.ld, dV, ldv);   // dV = Pᵀ G
    } else {
      gemm_nn<acc_t, true>(L, L, D, dP.data(), L, 1, K.ptr, K.ld, dQ, ldq);
      gemm_nn<acc_t, true>(L, L, D, dP.data(), 1, L, Q.ptr, Q.ld, dK, ldk);
      gemm_nn<acc_t, true>(L, L, D, P.data(), 1, L, G.ptr, G.ld, dV, ldv);
    }
    finish_line(a.grad_q, g, b, idx);
    finish_line(a.grad_k, g, b, idx);
    finish_line(a.grad_v, g, b, idx);
  }
}

// ------------------------------------------------------------------------------------------------
// ISA dispatch: each line function compiled for AVX-512, AVX2 and the baseline
// ------------------------------------------------------------------------------------------------

MEDATTN_ISA_VARIANTS(scores_forward_lines, ScoresForward)
MEDATTN_ISA_VARIANTS(scores_backward_lines, ScoresBackward)
MEDATTN_ISA_VARIANTS(qkv_forward_lines, QkvForward)
MEDATTN_ISA_VARIANTS(qkv_backward_lines, QkvBackward)

// Run `fn` over the lines of one pass. A line is L×L×D multiply-adds (or a small multiple of it);
// a task gets at least ~2^18 of them (~10 µs), so small grids (MT-UNet's 7×7 at B = 1) run inline
// instead of paying for waking threads, and larger ones still split over every thread.
template <typename Args>
void run_pass(void (*fn)(const Args&, int64_t, int64_t), const Args& a, int64_t lines) {
  constexpr int64_t kMinWorkPerTask = int64_t(1) << 18;
  const int64_t work_per_line = std::max<int64_t>(1, a.g.length() * a.g.length() * a.g.D);
  const int64_t grain = std::max<int64_t>(1, (kMinWorkPerTask + work_per_line - 1) / work_per_line);
  at::parallel_for(0, lines, grain, [&](int64_t lo, int64_t hi) { fn(a, lo, hi); });
}

// ------------------------------------------------------------------------------------------------
// host functions
// ------------------------------------------------------------------------------------------------

void check_common(const at::Tensor& v, const at::Tensor& shift) {
  TORCH_CHECK(v.device().is_cpu(), "gaussian_axial (cpp): expected CPU tensors, got ", v.device());
  TORCH_CHECK(v.dim() == 4, "gaussian_axial (cpp): v must be (B, H, W, D), got ", v.sizes());
  TORCH_CHECK(shift.numel() == 1, "gaussian_axial (cpp): shift must hold one value, got ", shift.sizes());
}

at::ScalarType acc_dtype_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The accumulator of an output: the output itself when its dtype is the accumulation type, else a
// float32 scratch of the same shape that the column pass converts into the output line by line.
template <typename scalar_t, typename acc_t>
Accumulator<scalar_t, acc_t> make_accumulator(const at::Tensor& out, at::Tensor* scratch_keepalive) {
  Accumulator<scalar_t, acc_t> a;
  a.out = arg_of<scalar_t>(out);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    a.acc = arg_of<acc_t>(out);
    a.convert = false;
  } else {
    *scratch_keepalive = at::empty(out.sizes(), out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    a.acc = arg_of<acc_t>(*scratch_keepalive);
    a.convert = true;
  }
  return a;
}

at::Tensor shift_grad_tensor(const std::vector<double>& partials, const at::Tensor& shift) {
  double total = 0;
  for (double p : partials) total += p;  // fixed order: rows then columns, line by line
  return at::full(shift.sizes(), total, shift.options());
}

at::Tensor scores_forward(const at::Tensor& atten_x, const at::Tensor& atten_y, const at::Tensor& v,
                          const at::Tensor& shift) {
  check_common(v, shift);
  const int64_t B = v.size(0), H = v.size(1), W = v.size(2), D = v.size(3);
  TORCH_CHECK(atten_x.sizes() == at::IntArrayRef({B, H, W, W}), "atten_x must be (B, H, W, W), got ", atten_x.sizes());
  TORCH_CHECK(atten_y.sizes() == at::IntArrayRef({B, W, H, H}), "atten_y must be (B, W, H, H), got ", atten_y.sizes());
  TORCH_CHECK(atten_x.scalar_type() == v.scalar_type() && atten_y.scalar_type() == v.scalar_type(),
              "gaussian_axial (cpp): atten_x, atten_y and v must share a dtype");
  at::Tensor out = at::empty({B, H, W, D}, v.options());
  const double shift_value = shift.item<double>();
  const Isa isa = runtime_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gaussian_axial_scores_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    at::Tensor scratch;
    ScoresForward<scalar_t, acc_t> a;
    a.shift = static_cast<acc_t>(shift_value);
    a.v = arg_of<const scalar_t>(v);
    a.out = make_accumulator<scalar_t, acc_t>(out, &scratch);
    a.g = {B, H, W, D, Axis::kRows};
    a.scores = arg_of<const scalar_t>(atten_x);
    run_pass(scores_forward_lines_for<scalar_t, acc_t>(isa), a, B * H);
    a.g.axis = Axis::kCols;
    a.scores = arg_of<const scalar_t>(atten_y);
    run_pass(scores_forward_lines_for<scalar_t, acc_t>(isa), a, B * W);
  });
  return out;
}

std::vector<at::Tensor> scores_backward(const at::Tensor& grad_out, const at::Tensor& atten_x,
                                        const at::Tensor& atten_y, const at::Tensor& v, const at::Tensor& shift) {
  check_common(v, shift);
  const int64_t B = v.size(0), H = v.size(1), W = v.size(2), D = v.size(3);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.scalar_type() == v.scalar_type(),
              "gaussian_axial (cpp): grad_out must match v, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(atten_x.sizes() == at::IntArrayRef({B, H, W, W}), "atten_x must be (B, H, W, W), got ", atten_x.sizes());
  TORCH_CHECK(atten_y.sizes() == at::IntArrayRef({B, W, H, H}), "atten_y must be (B, W, H, H), got ", atten_y.sizes());
  at::Tensor grad_atten_x = at::empty({B, H, W, W}, atten_x.options());
  at::Tensor grad_atten_y = at::empty({B, W, H, H}, atten_y.options());
  at::Tensor grad_v = at::empty({B, H, W, D}, v.options());
  std::vector<double> partials(B * H + B * W, 0.0);
  const double shift_value = shift.item<double>();
  const Isa isa = runtime_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gaussian_axial_scores_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    at::Tensor scratch;
    ScoresBackward<scalar_t, acc_t> a;
    a.shift = static_cast<acc_t>(shift_value);
    a.grad_out = arg_of<const scalar_t>(grad_out);
    a.v = arg_of<const scalar_t>(v);
    a.grad_v = make_accumulator<scalar_t, acc_t>(grad_v, &scratch);
    a.g = {B, H, W, D, Axis::kRows};
    a.scores = arg_of<const scalar_t>(atten_x);
    a.grad_scores = arg_of<scalar_t>(grad_atten_x);
    a.shift_partials = partials.data();
    run_pass(scores_backward_lines_for<scalar_t, acc_t>(isa), a, B * H);
    a.g.axis = Axis::kCols;
    a.scores = arg_of<const scalar_t>(atten_y);
    a.grad_scores = arg_of<scalar_t>(grad_atten_y);
    a.shift_partials = partials.data() + B * H;
    run_pass(scores_backward_lines_for<scalar_t, acc_t>(isa), a, B * W);
  });
  return {grad_atten_x, grad_atten_y, grad_v, shift_grad_tensor(partials, shift)};
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.sizes() == v.sizes() && k.sizes() == v.sizes(), "gaussian_axial (cpp): q, k, v must share a shape, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == v.scalar_type() && k.scalar_type() == v.scalar_type(),
              "gaussian_axial (cpp): q, k, v must share a dtype");
}

std::vector<at::Tensor> qkv_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& shift) {
  check_common(v, shift);
  check_qkv(q, k, v);
  const int64_t B = v.size(0), H = v.size(1), W = v.size(2), D = v.size(3);
  at::Tensor out = at::empty({B, H, W, D}, v.options());
  const auto stats_options = v.options().dtype(acc_dtype_of(v.scalar_type()));
  at::Tensor lse_rows = at::empty({B, H, W}, stats_options);
  at::Tensor lse_cols = at::empty({B, H, W}, stats_options);
  const double shift_value = shift.item<double>();
  const Isa isa = runtime_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gaussian_axial_qkv_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    at::Tensor scratch;
    QkvForward<scalar_t, acc_t> a;
    a.shift = static_cast<acc_t>(shift_value);
    a.q = arg_of<const scalar_t>(q);
    a.k = arg_of<const scalar_t>(k);
    a.v = arg_of<const scalar_t>(v);
    a.out = make_accumulator<scalar_t, acc_t>(out, &scratch);
    // The (B, H, W) statistics addressed as a (B, H, W, 1) tensor, so lines index them like pixels.
    const Strides lse_st{{H * W, W, 1, 0}};
    a.g = {B, H, W, D, Axis::kRows};
    a.lse = {lse_rows.data_ptr<acc_t>(), lse_st};
    run_pass(qkv_forward_lines_for<scalar_t, acc_t>(isa), a, B * H);
    a.g.axis = Axis::kCols;
    a.lse = {lse_cols.data_ptr<acc_t>(), lse_st};
    run_pass(qkv_forward_lines_for<scalar_t, acc_t>(isa), a, B * W);
  });
  return {out, lse_rows, lse_cols};
}

std::vector<at::Tensor> qkv_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& shift, const at::Tensor& lse_rows,
                                     const at::Tensor& lse_cols) {
  check_common(v, shift);
  check_qkv(q, k, v);
  const int64_t B = v.size(0), H = v.size(1), W = v.size(2), D = v.size(3);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.scalar_type() == v.scalar_type(),
              "gaussian_axial (cpp): grad_out must match v, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const auto acc = acc_dtype_of(v.scalar_type());
  TORCH_CHECK(lse_rows.sizes() == at::IntArrayRef({B, H, W}) && lse_cols.sizes() == lse_rows.sizes() &&
                  lse_rows.scalar_type() == acc && lse_cols.scalar_type() == acc,
              "gaussian_axial (cpp): softmax statistics must be (B, H, W) in ", acc);
  // The statistics are our own (B, H, W) outputs; make sure of their layout (a no-op for them).
  const at::Tensor lse_r = lse_rows.contiguous(), lse_c = lse_cols.contiguous();
  at::Tensor grad_q = at::empty({B, H, W, D}, v.options());
  at::Tensor grad_k = at::empty({B, H, W, D}, v.options());
  at::Tensor grad_v = at::empty({B, H, W, D}, v.options());
  std::vector<double> partials(B * H + B * W, 0.0);
  const double shift_value = shift.item<double>();
  const Isa isa = runtime_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "gaussian_axial_qkv_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    at::Tensor scratch_q, scratch_k, scratch_v;
    QkvBackward<scalar_t, acc_t> a;
    a.shift = static_cast<acc_t>(shift_value);
    a.grad_out = arg_of<const scalar_t>(grad_out);
    a.q = arg_of<const scalar_t>(q);
    a.k = arg_of<const scalar_t>(k);
    a.v = arg_of<const scalar_t>(v);
    a.grad_q = make_accumulator<scalar_t, acc_t>(grad_q, &scratch_q);
    a.grad_k = make_accumulator<scalar_t, acc_t>(grad_k, &scratch_k);
    a.grad_v = make_accumulator<scalar_t, acc_t>(grad_v, &scratch_v);
    const Strides lse_st{{H * W, W, 1, 0}};
    a.g = {B, H, W, D, Axis::kRows};
    a.lse = {lse_r.data_ptr<acc_t>(), lse_st};
    a.shift_partials = partials.data();
    run_pass(qkv_backward_lines_for<scalar_t, acc_t>(isa), a, B * H);
    a.g.axis = Axis::kCols;
    a.lse = {lse_c.data_ptr<acc_t>(), lse_st};
    a.shift_partials = partials.data() + B * H;
    run_pass(qkv_backward_lines_for<scalar_t, acc_t>(isa), a, B * W);
  });
  return {grad_q, grad_k, grad_v, shift_grad_tensor(partials, shift)};
}

}  // namespace
}  // namespace gaussian_axial
}  // namespace medattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace ga = medattn::gaussian_axial;
  m.def("gaussian_axial_scores_forward", &ga::scores_forward,
        "Gaussian axial attention from scores: (atten_x (B,H,W,W), atten_y (B,W,H,H), v (B,H,W,D), shift) -> out",
        pybind11::arg("atten_x"), pybind11::arg("atten_y"), pybind11::arg("v"), pybind11::arg("shift"));
  m.def("gaussian_axial_scores_backward", &ga::scores_backward,
        "Backward of gaussian_axial_scores_forward -> [grad_atten_x, grad_atten_y, grad_v, grad_shift]",
        pybind11::arg("grad_out"), pybind11::arg("atten_x"), pybind11::arg("atten_y"), pybind11::arg("v"),
        pybind11::arg("shift"));
  m.def("gaussian_axial_qkv_forward", &ga::qkv_forward,
        "Gaussian axial attention from q, k, v (B,H,W,D) -> [out, lse_rows (B,H,W), lse_cols (B,H,W)]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("shift"));
  m.def("gaussian_axial_qkv_backward", &ga::qkv_backward,
        "Backward of gaussian_axial_qkv_forward -> [grad_q, grad_k, grad_v, grad_shift]", pybind11::arg("grad_out"),
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("shift"),
        pybind11::arg("lse_rows"), pybind11::arg("lse_cols"));
  m.def("gaussian_axial_isa", &medattn::isa_name, "The instruction set the gaussian_axial kernels dispatch to");
  // The kernels' own size constants, read by the tests that must reach every path they switch.
  m.attr("FEATURE_BLOCK_FLOAT") = ga::kFeatureBlock<float>;
  m.attr("FEATURE_BLOCK_DOUBLE") = ga::kFeatureBlock<double>;
}
