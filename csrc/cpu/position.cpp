// Position attention, flash-style fused C++ CPU kernels.
//
// Math, per batch b (heads folded into B), queries i < Nq, keys j < Nk, s = scale:
//
//   S_ij = s · q_i·k_j,   lse_i = log Σ_j exp S_ij,   P_ij = exp(S_ij − lse_i)
//   transpose=False (DANet PAM):   o_i = Σ_j P_ij v_j          (v: Nk rows, o: Nq rows)
//   transpose=True  (guided):      o_j = Σ_i P_ij v_i          (v: Nq rows, o: Nk rows)
//   out = γ · (o ⊙ f) + x          (each part optional: gamma, multiply = f, residual = x)
//
// Memory is O(N·d): the scores only ever exist as one (block_q × block_k) tile per thread, and
// backward recomputes the tiles from q, k and the saved row log-sum-exp (flash attention).
//
// Forward, transpose=False: at::parallel_for over (batch, query block); each task sweeps the key
// blocks with the online softmax (running row max m and row sum l, O rescaled by exp(m_old − m_new)
// when the max moves), then writes the epilogue and lse = m + log l.
// Forward, transpose=True: the output rows are keys, so the normaliser of every *query* row must
// be known before any column can be accumulated: pass 1 (batch, query block) computes lse, pass 2
// (batch, key block) accumulates o_j = Σ_i P_ij v_i over all query blocks.
//
// Backward. With G = ∂L/∂o (the epilogue's γ·f⊙g) and dP_ij = ∂L/∂P_ij, the softmax gives
// dS_ij = s · P_ij (dP_ij − D_i), D_i = Σ_j P_ij dP_ij, and
//   transpose=False:  dP_ij = G_i·v_j,  D_i = G_i·o_i,  dv_j = Σ_i P_ij G_i
//   transpose=True:   dP_ij = v_i·G_j,  dv_i = Σ_j P_ij G_j,  D_i = v_i·dv_i  (a row pass first)
//   dq_i = Σ_j dS_ij k_j,   dk_j = Σ_i dS_ij q_i.
// The key pass runs over (batch, key group): a task owns a fixed group of consecutive key blocks
// and every dk/dv row in them, so dk and dv need no atomics. dq sums over all key blocks; each
// group accumulates its own (Nq × dk) partial, and the partials are added in group order after the
// pass. The number of groups is a constant (not the thread count), so the result is bitwise the
// same for any number of threads, and dP — the expensive (block × dv) GEMM — is computed once
// instead of once more in a separate query pass.
//
// GEMMs on tiles go to the BLAS libtorch links (sgemm_/dgemm_: MKL or OpenBLAS) on raw pointers,
// single-threaded inside the parallel region. Operands are read in place through
// their strides when they already are in the accumulation type with one unit stride (token-major
// or channel-first conv outputs); otherwise (bf16/fp16 inputs, odd strides) the whole operand is
// converted once into a contiguous float32 copy, O(N·d), because every key block is read by every
// query block. The softmax loops (max, exp, sums) are `omp simd` loops compiled for AVX-512,
// AVX2+FMA and the baseline via GCC target attributes, chosen at run time from ATen's capability.
// Accumulation: float (double for float64 inputs).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "vec_math.h"

namespace medattn {
namespace position {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Key blocks are split into at most this many groups in backward (see the header comment).
constexpr int64_t kKeyGroups = 8;

// ------------------------------------------------------------------------------------------------
// strided matrix views
// ------------------------------------------------------------------------------------------------

// One batch's matrix: element (r, c) at ptr[r * rs + c * cs].
template <typename T>
struct Mat {
  T* ptr;
  int64_t rs;
  int64_t cs;
  MEDATTN_INLINE Mat rows(int64_t r0) const { return {ptr + r0 * rs, rs, cs}; }
  MEDATTN_INLINE Mat<T> t() const { return {ptr, cs, rs}; }
  MEDATTN_INLINE T& operator()(int64_t r, int64_t c) const { return ptr[r * rs + c * cs]; }
};

// A (B, rows, cols) tensor seen through its strides.
template <typename T>
struct Batched {
  T* ptr = nullptr;
  int64_t bs = 0, rs = 0, cs = 0;
  MEDATTN_INLINE Mat<T> batch(int64_t b) const { return {ptr + b * bs, rs, cs}; }
};

template <typename T>
Batched<T> batched(const at::Tensor& t) {
  return {reinterpret_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// The Fortran BLAS that libtorch links (MKL on x86 wheels, OpenBLAS elsewhere) exports these; ATen's
// own C++ wrappers around them are not exported to extensions. Weak: a torch without BLAS leaves
// them null and the portable loop below runs instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// How BLAS reads a (rows × cols) view: row-major (unit column stride) or column-major (unit row
// stride), with a leading dimension BLAS accepts. A single row or column has no meaningful stride
// across it, so any value is fine there.
struct BlasForm {
  bool valid;
  bool row_major;
  int64_t ld;
};

BlasForm blas_form(int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if (cs == 1 && (rows == 1 || rs >= std::max<int64_t>(1, cols)))
    return {true, true, rows == 1 ? std::max<int64_t>(1, cols) : rs};
  if (rs == 1 && (cols == 1 || cs >= std::max<int64_t>(1, rows)))
    return {true, false, cols == 1 ? std::max<int64_t>(1, rows) : cs};
  return {false, false, 0};
}

// Can BLAS read this (rows × cols) tensor slice in place?
bool blas_layout(int64_t rows, int64_t cols, int64_t rs, int64_t cs) { return blas_form(rows, cols, rs, cs).valid; }

// C (M×N, row-major, ldc) = alpha · A (M×K) · B (K×N) + beta · C, A and B any BLAS-readable views.
// BLAS is column-major: a row-major (r × c) matrix is a column-major (c × r) one, so it computes
// Cᵀ = Bᵀ Aᵀ.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, Mat<const T> A, Mat<const T> B, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const BlasForm a = blas_form(M, K, A.rs, A.cs), b = blas_form(K, N, B.rs, B.cs);
  auto* blas = std::is_same_v<T, float> ? reinterpret_cast<void*>(&sgemm_) : reinterpret_cast<void*>(&dgemm_);
  if (K > 0 && a.valid && b.valid && blas != nullptr) {
    const char ta = b.row_major ? 'N' : 'T', tb = a.row_major ? 'N' : 'T';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int lda = static_cast<int>(b.ld), ldb = static_cast<int>(a.ld), ldc_ = static_cast<int>(ldc);
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, B.ptr, &lda, A.ptr, &ldb, &beta, C, &ldc_);
    } else {
      dgemm_(&ta, &tb, &m, &n, &k, &alpha, B.ptr, &lda, A.ptr, &ldb, &beta, C, &ldc_);
    }
    return;
  }
  // Portable fallback (no BLAS in this torch): plain loops, same result up to summation order.
  for (int64_t r = 0; r < M; ++r) {
    T* c = C + r * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
    for (int64_t p = 0; p < K; ++p) {
      const T scaled = alpha * A(r, p);
      for (int64_t j = 0; j < N; ++j) c[j] += scaled * B(p, j);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// softmax tile loops
// ------------------------------------------------------------------------------------------------

// One key tile of the online softmax: for each of the m rows of the (m × n) score tile S, move the
// running max, rescale the running sum (and the m × dv output accumulator O, if any) and turn the
// row into exp(S − max) in place.
template <typename T>
MEDATTN_INLINE void online_softmax_tile(T* S, int64_t ld, int64_t m, int64_t n, T* row_max, T* row_sum, T* O,
                                        int64_t ldo, int64_t dv) {
  for (int64_t r = 0; r < m; ++r) {
    T* s = S + r * ld;
    T tile_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tile_max)
    for (int64_t j = 0; j < n; ++j) tile_max = std::max(tile_max, s[j]);
    const T new_max = std::max(row_max[r], tile_max);
    // exp(−inf) on the first tile: the running sum and O are still zero, any finite factor works.
    const T correction = row_max[r] == new_max ? T(1) : exp_fast(row_max[r] - new_max);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_fast(s[j] - new_max);
      sum += s[j];
    }
    row_sum[r] = row_sum[r] * correction + sum;
    row_max[r] = new_max;
    if (O != nullptr && correction != T(1)) {
      T* o = O + r * ldo;
#pragma omp simd
      for (int64_t d = 0; d < dv; ++d) o[d] *= correction;
    }
  }
}

// S[r, :] ← exp(S[r, :] − lse[r]): the probabilities of a tile from the saved statistics.
template <typename T>
MEDATTN_INLINE void probabilities_tile(T* S, int64_t ld, int64_t m, int64_t n, const T* lse) {
  for (int64_t r = 0; r < m; ++r) {
    T* s = S + r * ld;
    const T l = lse[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = exp_fast(s[j] - l);
  }
}

// dP[r, :] ← scale · P[r, :] ⊙ (dP[r, :] − D[r]): the score gradient of a tile, in place.
template <typename T>
MEDATTN_INLINE void score_grad_tile(const T* P, T* dP, int64_t ld, int64_t m, int64_t n, const T* D, T scale) {
  for (int64_t r = 0; r < m; ++r) {
    const T* p = P + r * ld;
    T* g = dP + r * ld;
    const T d = D[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = scale * p[j] * (g[j] - d);
  }
}

// ------------------------------------------------------------------------------------------------
// the problem, in the accumulation type
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename T>
struct Problem {
  int64_t B = 0, Nq = 0, Nk = 0, dk = 0, dv = 0, n_out = 0;
  int64_t block_q = 0, block_k = 0;
  T scale = 1;
  bool transpose = false;
  Batched<const T> q, k, v;  // acc-type views (in place, or packed copies)

  // forward epilogue: out = γ (o ⊙ f) + x
  Batched<scalar_t> out;
  Batched<const scalar_t> residual, multiply;
  bool has_residual = false, has_multiply = false, has_gamma = false;
  T gamma = 1;
  scalar_t* o_save = nullptr;  // (B, n_out, dv) contiguous, or null
  T* lse = nullptr;            // (B, Nq) contiguous

  // backward
  const T* G = nullptr;        // ∂L/∂o, (B, n_out, dv) contiguous
  T* D = nullptr;              // (B, Nq) contiguous
  Batched<const T> left;       // the (Nq × dv) factor of dP: G (transpose=False) or v (transpose=True)
  Batched<const T> right;      // the (Nk × dv) factor of dP: v (transpose=False) or G (transpose=True)
  Batched<scalar_t> grad_q, grad_k, grad_v;
  T* grad_q_partial = nullptr;  // (groups, B, Nq, dk) contiguous
  int64_t groups = 1;

  T* workspace = nullptr;       // per-thread tiles, see thread_workspace
  int64_t workspace_threads = 0;
  at::Tensor workspace_storage;

  int64_t query_blocks() const { return (Nq + block_q - 1) / block_q; }
  int64_t key_blocks() const { return (Nk + block_k - 1) / block_k; }
};

// The calling thread's slice of the workspace: the tiles and row buffers of a pass are carved from
// it in order. The workspace is one ATen allocation made before the parallel loop (so memory
// profilers see it), threads × workspace_floats(p) elements: O(threads · block · (block + d)).
template <typename T>
struct Carve {
  T* next;
  MEDATTN_INLINE T* take(int64_t n) {
    T* out = next;
    next += n;
    return out;
  }
};

template <typename scalar_t, typename T>
int64_t workspace_floats(const Problem<scalar_t, T>& p) {
  // the largest pass (backward_keys): two score tiles, a dk and a dv block of keys; the others
  // need at most one tile, two row vectors and a (block × dv) accumulator.
  return 2 * p.block_q * p.block_k + 2 * p.block_q + p.block_k * p.dk + (p.block_q + p.block_k) * p.dv;
}

template <typename scalar_t, typename T>
MEDATTN_INLINE Carve<T> thread_workspace(const Problem<scalar_t, T>& p) {
  const int64_t tid = at::get_thread_num();
  TORCH_CHECK(tid < p.workspace_threads, "position_attention (cpp): thread ", tid, " outside the workspace");
  return {p.workspace + tid * workspace_floats(p)};
}

// out rows [r0, r0 + m) of batch b from the (m × dv) acc tile O (already normalised).
template <typename scalar_t, typename T>
MEDATTN_INLINE void write_output_rows(const Problem<scalar_t, T>& p, int64_t b, int64_t r0, int64_t m, const T* O,
                                      int64_t ldo) {
  const Mat<scalar_t> out = p.out.batch(b);
  const Mat<const scalar_t> x = p.residual.batch(b), f = p.multiply.batch(b);
  for (int64_t r = 0; r < m; ++r) {
    const T* o = O + r * ldo;
    const int64_t row = r0 + r;
    if (p.o_save != nullptr) {
      scalar_t* dst = p.o_save + (b * p.n_out + row) * p.dv;
      for (int64_t d = 0; d < p.dv; ++d) dst[d] = static_cast<scalar_t>(o[d]);
    }
    for (int64_t d = 0; d < p.dv; ++d) {
      T value = o[d];
      if (p.has_multiply) value *= static_cast<T>(f(row, d));
      if (p.has_gamma) value *= p.gamma;
      if (p.has_residual) value += static_cast<T>(x(row, d));
      out(row, d) = static_cast<scalar_t>(value);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// forward passes
// ------------------------------------------------------------------------------------------------

// Tasks (batch, query block). transpose=False: the full output rows; transpose=True: lse only.
template <typename scalar_t, typename T>
MEDATTN_INLINE void forward_rows(const Problem<scalar_t, T>& p, int64_t lo, int64_t hi) {
  const int64_t bq = p.block_q, bk = p.block_k, nqb = p.query_blocks();
  const bool with_output = !p.transpose;
  Carve<T> ws = thread_workspace(p);
  T *S = ws.take(bq * bk), *row_max = ws.take(bq), *row_sum = ws.take(bq), *O = ws.take(bq * p.dv);
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t b = task / nqb, i0 = (task % nqb) * bq, m = std::min(bq, p.Nq - i0);
    const Mat<const T> q_rows = p.q.batch(b).rows(i0);
    std::fill_n(row_max, m, -std::numeric_limits<T>::infinity());
    std::fill_n(row_sum, m, T(0));
    if (with_output) std::fill_n(O, m * p.dv, T(0));
    for (int64_t j0 = 0; j0 < p.Nk; j0 += bk) {
      const int64_t n = std::min(bk, p.Nk - j0);
      gemm<T>(m, n, p.dk, p.scale, q_rows, p.k.batch(b).rows(j0).t(), T(0), S, bk);
      online_softmax_tile(S, bk, m, n, row_max, row_sum, with_output ? O : nullptr,
                          p.dv, p.dv);
      if (with_output) gemm<T>(m, p.dv, n, T(1), {S, bk, 1}, p.v.batch(b).rows(j0), T(1), O, p.dv);
    }
    T* lse = p.lse + b * p.Nq + i0;
    for (int64_t r = 0; r < m; ++r) lse[r] = row_max[r] + std::log(row_sum[r]);
    if (with_output) {
      for (int64_t r = 0; r < m; ++r) {
        const T inv = T(1) / row_sum[r];
        T* o = O + r * p.dv;
#pragma omp simd
        for (int64_t d = 0; d < p.dv; ++d) o[d] *= inv;
      }
      write_output_rows(p, b, i0, m, O, p.dv);
    }
  }
}

// transpose=True, tasks (batch, key block): o_j = Σ_i P_ij v_i over every query block.
template <typename scalar_t, typename T>
MEDATTN_INLINE void forward_columns(const Problem<scalar_t, T>& p, int64_t lo, int64_t hi) {
  const int64_t bq = p.block_q, bk = p.block_k, nkb = p.key_blocks();
  Carve<T> ws = thread_workspace(p);
  T *S = ws.take(bq * bk), *O = ws.take(bk * p.dv);
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t b = task / nkb, j0 = (task % nkb) * bk, n = std::min(bk, p.Nk - j0);
    const Mat<const T> k_cols = p.k.batch(b).rows(j0).t();
    std::fill_n(O, n * p.dv, T(0));
    for (int64_t i0 = 0; i0 < p.Nq; i0 += bq) {
      const int64_t m = std::min(bq, p.Nq - i0);
      gemm<T>(m, n, p.dk, p.scale, p.q.batch(b).rows(i0), k_cols, T(0), S, bk);
      probabilities_tile(S, bk, m, n, p.lse + b * p.Nq + i0);
      // O (n × dv) += Pᵀ (n × m) · v_rows (m × dv)
      gemm<T>(n, p.dv, m, T(1), {S, 1, bk}, p.v.batch(b).rows(i0), T(1), O, p.dv);
    }
    write_output_rows(p, b, j0, n, O, p.dv);
  }
}

// ------------------------------------------------------------------------------------------------
// backward passes
// ------------------------------------------------------------------------------------------------

// transpose=True, tasks (batch, query block): dv_i = Σ_j P_ij G_j, then D_i = v_i · dv_i.
template <typename scalar_t, typename T>
MEDATTN_INLINE void backward_value_rows(const Problem<scalar_t, T>& p, int64_t lo, int64_t hi) {
  const int64_t bq = p.block_q, bk = p.block_k, nqb = p.query_blocks();
  Carve<T> ws = thread_workspace(p);
  T *S = ws.take(bq * bk), *dV = ws.take(bq * p.dv);
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t b = task / nqb, i0 = (task % nqb) * bq, m = std::min(bq, p.Nq - i0);
    const Mat<const T> q_rows = p.q.batch(b).rows(i0);
    const Mat<const T> G = {p.G + b * p.n_out * p.dv, p.dv, 1};
    std::fill_n(dV, m * p.dv, T(0));
    for (int64_t j0 = 0; j0 < p.Nk; j0 += bk) {
      const int64_t n = std::min(bk, p.Nk - j0);
      gemm<T>(m, n, p.dk, p.scale, q_rows, p.k.batch(b).rows(j0).t(), T(0), S, bk);
      probabilities_tile(S, bk, m, n, p.lse + b * p.Nq + i0);
      gemm<T>(m, p.dv, n, T(1), {S, bk, 1}, G.rows(j0), T(1), dV, p.dv);
    }
    const Mat<const T> v_rows = p.v.batch(b).rows(i0);
    const Mat<scalar_t> grad_v = p.grad_v.batch(b).rows(i0);
    for (int64_t r = 0; r < m; ++r) {
      T dot = 0;
      for (int64_t d = 0; d < p.dv; ++d) {
        const T g = dV[r * p.dv + d];
        dot += g * v_rows(r, d);
        grad_v(r, d) = static_cast<scalar_t>(g);
      }
      p.D[b * p.Nq + i0 + r] = dot;
    }
  }
}

// Tasks (batch, key group): dk (and dv for transpose=False) of the group's keys, and the group's
// partial dq over all queries.
template <typename scalar_t, typename T>
MEDATTN_INLINE void backward_keys(const Problem<scalar_t, T>& p, int64_t lo, int64_t hi) {
  const int64_t bq = p.block_q, bk = p.block_k, nkb = p.key_blocks(), groups = p.groups;
  const bool with_value_grad = !p.transpose;
  Carve<T> ws = thread_workspace(p);
  T *P = ws.take(bq * bk), *dS = ws.take(bq * bk), *dK = ws.take(bk * p.dk), *dV = ws.take(bk * p.dv);
  for (int64_t task = lo; task < hi; ++task) {
    const int64_t b = task / groups, g = task % groups;
    const int64_t first = g * nkb / groups, last = (g + 1) * nkb / groups;  // key blocks [first, last)
    T* dq_partial = p.grad_q_partial + (g * p.B + b) * p.Nq * p.dk;
    const Mat<const T> q = p.q.batch(b), left = p.left.batch(b);
    const T* lse = p.lse + b * p.Nq;
    const T* D = p.D + b * p.Nq;
    for (int64_t kb = first; kb < last; ++kb) {
      const int64_t j0 = kb * bk, n = std::min(bk, p.Nk - j0);
      const Mat<const T> k_rows = p.k.batch(b).rows(j0), right_rows = p.right.batch(b).rows(j0);
      std::fill_n(dK, n * p.dk, T(0));
      if (with_value_grad) std::fill_n(dV, n * p.dv, T(0));
      for (int64_t i0 = 0; i0 < p.Nq; i0 += bq) {
        const int64_t m = std::min(bq, p.Nq - i0);
        const Mat<const T> q_rows = q.rows(i0), left_rows = left.rows(i0);
        gemm<T>(m, n, p.dk, p.scale, q_rows, k_rows.t(), T(0), P, bk);
        probabilities_tile(P, bk, m, n, lse + i0);
        if (with_value_grad)  // dV (n × dv) += Pᵀ G_rows
          gemm<T>(n, p.dv, m, T(1), {P, 1, bk}, left_rows, T(1), dV, p.dv);
        gemm<T>(m, n, p.dv, T(1), left_rows, right_rows.t(), T(0), dS, bk);  // dP
        score_grad_tile(P, dS, bk, m, n, D + i0, p.scale);
        gemm<T>(n, p.dk, m, T(1), {dS, 1, bk}, q_rows, T(1), dK, p.dk);       // dK += dSᵀ q
        gemm<T>(m, p.dk, n, T(1), {dS, bk, 1}, k_rows, T(1), dq_partial + i0 * p.dk, p.dk);  // dq += dS k
      }
      const Mat<scalar_t> grad_k = p.grad_k.batch(b).rows(j0);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t d = 0; d < p.dk; ++d) grad_k(r, d) = static_cast<scalar_t>(dK[r * p.dk + d]);
      if (with_value_grad) {
        const Mat<scalar_t> grad_v = p.grad_v.batch(b).rows(j0);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t d = 0; d < p.dv; ++d) grad_v(r, d) = static_cast<scalar_t>(dV[r * p.dv + d]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// ISA dispatch: each pass compiled for AVX-512, AVX2 and the baseline
// ------------------------------------------------------------------------------------------------
// The passes are always_inline, so each wrapper below holds its own copy compiled for its target
// (a plain call would run the baseline code from inside the AVX-512 wrapper).

template <typename scalar_t, typename T>
using Pass = void (*)(const Problem<scalar_t, T>&, int64_t, int64_t);

MEDATTN_ISA_VARIANTS(forward_rows, Problem)
MEDATTN_ISA_VARIANTS(forward_columns, Problem)
MEDATTN_ISA_VARIANTS(backward_value_rows, Problem)
MEDATTN_ISA_VARIANTS(backward_keys, Problem)

// One task is a (block × N × d) sweep: a grain of one task keeps every thread busy.
template <typename scalar_t, typename T>
void run(Pass<scalar_t, T> pass, Problem<scalar_t, T>& p, int64_t tasks) {
  if (p.workspace == nullptr) {
    p.workspace_threads = at::get_num_threads();
    p.workspace_storage = at::empty({p.workspace_threads * workspace_floats(p)},
                                    at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    p.workspace = p.workspace_storage.template data_ptr<T>();
  }
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) { pass(p, lo, hi); });
}

// ------------------------------------------------------------------------------------------------
// host functions
// ------------------------------------------------------------------------------------------------

at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// An acc-type view of a (B, rows, cols) operand: the tensor itself when BLAS can read it in place,
// else a contiguous acc-type copy (kept alive by `keep`).
template <typename T>
Batched<const T> acc_operand(const at::Tensor& t, at::Tensor* keep) {
  const bool in_place = t.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                        blas_layout(t.size(1), t.size(2), t.stride(1), t.stride(2));
  *keep = in_place ? t : t.to(c10::CppTypeToScalarType<T>::value).contiguous();
  return batched<const T>(*keep);
}

void check_block(int64_t block, const char* name) {
  TORCH_CHECK(block >= 1, "position_attention (cpp): ", name, " must be >= 1, got ", block);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool transpose) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "position_attention (cpp): expected CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "position_attention (cpp): q, k, v must be 3-D");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(2) == q.size(2),
              "position_attention (cpp): q (B, Nq, dk) and k (B, Nk, dk) disagree: ", q.sizes(), " vs ", k.sizes());
  TORCH_CHECK(v.size(1) == (transpose ? q.size(1) : k.size(1)), "position_attention (cpp): v has ", v.size(1),
              " rows, expected ", transpose ? q.size(1) : k.size(1));
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "position_attention (cpp): q, k, v must share a dtype");
}

// -> (out (B, n_out, dv) token-major, a view of channel-first (B, dv, n_out) storage when channels_first,
// o (B, n_out, dv) or empty, lse (B, Nq) float32/float64 or empty).
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& residual,
                                const c10::optional<at::Tensor>& multiply, double scale, bool transpose,
                                bool channels_first, bool save_o, bool save_lse, int64_t block_q, int64_t block_k) {
  check_qkv(q, k, v, transpose);
  check_block(block_q, "block_q");
  check_block(block_k, "block_k");
  const int64_t B = q.size(0), Nq = q.size(1), Nk = k.size(1), dk = q.size(2), dv = v.size(2);
  const int64_t n_out = transpose ? Nk : Nq;
  const at::ScalarType acc = acc_dtype_of(q.scalar_type());
  for (const auto* t : {&residual, &multiply}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->sizes() == at::IntArrayRef({B, n_out, dv}) && (*t)->scalar_type() == q.scalar_type(),
                  "position_attention (cpp): residual/multiply must be (B, n_out, dv) in q's dtype, got ",
                  (*t)->sizes());
    }
  }
  at::Tensor storage = channels_first ? at::empty({B, dv, n_out}, q.options()) : at::empty({B, n_out, dv}, q.options());
  at::Tensor out = channels_first ? storage.transpose(1, 2) : storage;
  at::Tensor o = save_o ? at::empty({B, n_out, dv}, q.options()) : at::empty({0}, q.options());
  at::Tensor lse = at::empty({B, Nq}, q.options().dtype(acc));
  TORCH_CHECK(Nq > 0 && Nk > 0 && dk > 0 && dv > 0, "position_attention (cpp): empty token or feature dim");
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "position_attention_forward", [&] {
      using T = acc_type<scalar_t>;
      Problem<scalar_t, T> p;
      p.B = B, p.Nq = Nq, p.Nk = Nk, p.dk = dk, p.dv = dv, p.n_out = n_out;
      p.block_q = block_q, p.block_k = block_k, p.scale = static_cast<T>(scale), p.transpose = transpose;
      at::Tensor keep_q, keep_k, keep_v;
      p.q = acc_operand<T>(q, &keep_q);
      p.k = acc_operand<T>(k, &keep_k);
      p.v = acc_operand<T>(v, &keep_v);
      p.out = batched<scalar_t>(out);
      if (residual.has_value()) p.residual = batched<const scalar_t>(*residual), p.has_residual = true;
      if (multiply.has_value()) p.multiply = batched<const scalar_t>(*multiply), p.has_multiply = true;
      if (gamma.has_value()) p.gamma = static_cast<T>(gamma->item<double>()), p.has_gamma = true;
      p.o_save = save_o ? o.data_ptr<scalar_t>() : nullptr;
      p.lse = lse.data_ptr<T>();
      const Isa isa = runtime_isa();
      run(forward_rows_for<scalar_t, T>(isa), p, B * p.query_blocks());
      if (transpose) run(forward_columns_for<scalar_t, T>(isa), p, B * p.key_blocks());
    });
  }
  return {out, o, save_lse ? lse : at::empty({0}, lse.options())};
}

// -> [dq, dk, dv, dγ (gamma's shape) or empty, df (B, n_out, dv) or empty].
// grad_out and o are token-major (B, n_out, dv) views of any strides.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
                                 const c10::optional<at::Tensor>& gamma, const c10::optional<at::Tensor>& multiply,
                                 double scale, bool transpose, bool need_multiply_grad, int64_t block_q,
                                 int64_t block_k) {
  check_qkv(q, k, v, transpose);
  check_block(block_q, "block_q");
  check_block(block_k, "block_k");
  const int64_t B = q.size(0), Nq = q.size(1), Nk = k.size(1), dk = q.size(2), dv = v.size(2);
  const int64_t n_out = transpose ? Nk : Nq;
  const at::ScalarType acc = acc_dtype_of(q.scalar_type());
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, n_out, dv}), "position_attention (cpp): grad_out must be ",
              at::IntArrayRef({B, n_out, dv}), ", got ", grad_out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, Nq}) && lse.scalar_type() == acc && lse.is_contiguous(),
              "position_attention (cpp): lse must be a contiguous (B, Nq) ", acc, " tensor");
  const bool has_gamma = gamma.has_value(), has_multiply = multiply.has_value();
  const bool needs_o = !transpose || has_gamma || has_multiply;
  TORCH_CHECK(!needs_o || o.sizes() == at::IntArrayRef({B, n_out, dv}),
              "position_attention (cpp): o must be (B, n_out, dv), got ", o.sizes());
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  at::Tensor grad_gamma = has_gamma ? at::empty_like(*gamma) : at::empty({0}, q.options());
  at::Tensor grad_multiply = (has_multiply && need_multiply_grad) ? at::empty_like(*multiply)
                                                                 : at::empty({0}, q.options());
  TORCH_CHECK(Nq > 0 && Nk > 0 && dk > 0 && dv > 0, "position_attention (cpp): empty token or feature dim");
  if (B == 0) {
    if (has_gamma) grad_gamma.zero_();
    return {grad_q, grad_k, grad_v, grad_gamma, grad_multiply};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "position_attention_backward", [&] {
    using T = acc_type<scalar_t>;
    Problem<scalar_t, T> p;
    p.B = B, p.Nq = Nq, p.Nk = Nk, p.dk = dk, p.dv = dv, p.n_out = n_out;
    p.block_q = block_q, p.block_k = block_k, p.scale = static_cast<T>(scale), p.transpose = transpose;
    at::Tensor keep_q, keep_k, keep_v;
    p.q = acc_operand<T>(q, &keep_q);
    p.k = acc_operand<T>(k, &keep_k);
    p.v = acc_operand<T>(v, &keep_v);
    p.lse = const_cast<T*>(lse.data_ptr<T>());
    const T gamma_value = has_gamma ? static_cast<T>(gamma->item<double>()) : T(1);

    // Prologue, tasks (batch, output row): G = γ f ⊙ g, df = γ g ⊙ o, the row parts of dγ = Σ g ⊙ o ⊙ f
    // and, for transpose=False, D_i = G_i · o_i.
    at::Tensor G = at::empty({B, n_out, dv}, q.options().dtype(acc));
    at::Tensor D = at::empty({B, Nq}, q.options().dtype(acc));
    at::Tensor gamma_rows = at::empty({B * n_out}, q.options().dtype(acc));
    {
      const Batched<const scalar_t> g = batched<const scalar_t>(grad_out);
      const Batched<const scalar_t> o_view = needs_o ? batched<const scalar_t>(o) : Batched<const scalar_t>{};
      const Batched<const scalar_t> f = has_multiply ? batched<const scalar_t>(*multiply) : Batched<const scalar_t>{};
      const Batched<scalar_t> df = grad_multiply.numel() > 0 ? batched<scalar_t>(grad_multiply) : Batched<scalar_t>{};
      T* G_ptr = G.data_ptr<T>();
      T* D_ptr = D.data_ptr<T>();
      T* gamma_rows_ptr = gamma_rows.data_ptr<T>();
      const bool write_df = grad_multiply.numel() > 0;
      at::parallel_for(0, B * n_out, 256, [&](int64_t lo, int64_t hi) {
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t b = task / n_out, r = task % n_out;
          T* G_row = G_ptr + task * dv;
          T d_term = 0, gamma_term = 0;
          for (int64_t d = 0; d < dv; ++d) {
            const T grad = static_cast<T>(g.batch(b)(r, d));
            const T o_value = needs_o ? static_cast<T>(o_view.batch(b)(r, d)) : T(0);
            const T f_value = has_multiply ? static_cast<T>(f.batch(b)(r, d)) : T(1);
            const T grad_o = gamma_value * f_value * grad;
            G_row[d] = grad_o;
            d_term += grad_o * o_value;
            gamma_term += grad * o_value * f_value;
            if (write_df) df.batch(b)(r, d) = static_cast<scalar_t>(gamma_value * grad * o_value);
          }
          if (!transpose) D_ptr[task] = d_term;  // n_out == Nq here
          gamma_rows_ptr[task] = gamma_term;
        }
      });
      if (has_gamma) {
        T total = 0;  // fixed order: deterministic for any thread count
        for (int64_t i = 0; i < B * n_out; ++i) total += gamma_rows_ptr[i];
        grad_gamma.fill_(static_cast<double>(total));
      }
    }
    p.G = G.data_ptr<T>();
    p.D = D.data_ptr<T>();
    const Batched<const T> G_view = batched<const T>(G);
    p.left = transpose ? p.v : G_view;
    p.right = transpose ? G_view : p.v;
    p.grad_q = batched<scalar_t>(grad_q);
    p.grad_k = batched<scalar_t>(grad_k);
    p.grad_v = batched<scalar_t>(grad_v);
    p.groups = std::min<int64_t>(kKeyGroups, p.key_blocks());
    at::Tensor partial = at::zeros({p.groups, B, Nq, dk}, q.options().dtype(acc));
    p.grad_q_partial = partial.data_ptr<T>();

    const Isa isa = runtime_isa();
    if (transpose) run(backward_value_rows_for<scalar_t, T>(isa), p, B * p.query_blocks());
    run(backward_keys_for<scalar_t, T>(isa), p, B * p.groups);

    // dq = Σ_groups partial, in group order.
    const T* part = p.grad_q_partial;
    const int64_t groups = p.groups, rows = B * Nq;
    at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / Nq, r = task % Nq;
        const Mat<scalar_t> dq = p.grad_q.batch(b);
        for (int64_t d = 0; d < dk; ++d) {
          T sum = 0;
          for (int64_t g = 0; g < groups; ++g) sum += part[(g * rows + task) * dk + d];
          dq(r, d) = static_cast<scalar_t>(sum);
        }
      }
    });
  });
  return {grad_q, grad_k, grad_v, grad_gamma, grad_multiply};
}

}  // namespace
}  // namespace position
}  // namespace medattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace pos = medattn::position;
  m.def("position_attention_forward", &pos::forward,
        "Flash-style position attention forward -> [out storage, o (B, n_out, dv) or empty, lse (B, Nq) or empty]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("gamma"),
        pybind11::arg("residual"), pybind11::arg("multiply"), pybind11::arg("scale"), pybind11::arg("transpose"),
        pybind11::arg("channels_first"), pybind11::arg("save_o"), pybind11::arg("save_lse"),
        pybind11::arg("block_q"), pybind11::arg("block_k"));
  m.def("position_attention_backward", &pos::backward,
        "Backward of position_attention_forward -> [dq, dk, dv, dgamma or empty, dmultiply or empty]",
        pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("o"),
        pybind11::arg("lse"), pybind11::arg("gamma"), pybind11::arg("multiply"), pybind11::arg("scale"),
        pybind11::arg("transpose"), pybind11::arg("need_multiply_grad"), pybind11::arg("block_q"),
        pybind11::arg("block_k"));
  m.def("position_isa", &medattn::isa_name, "The instruction set the position kernels dispatch to");
  // The kernels' own size constants, read by the tests that must reach every path they switch.
  m.attr("KEY_GROUPS") = pos::kKeyGroups;
}
