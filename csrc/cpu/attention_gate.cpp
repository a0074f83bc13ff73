// Attention U-Net gate (additive form, and grid form's output pass), fused C++ CPU kernels.
//
// The Python side (medattn_fast/ops/_attention_gate_kernels.py) folds every normalisation it can
// into the three projections and computes the coarse gating map G = BN_g(W_g·g) (B, Ci, *Sg) with
// ordinary ops (it is small). What stays is, per output position p of x (B, Cx, *S):
//
//   a[p]     = W·x[:, p] + b + up(G)[p]          (Ci)   up = bilinear/trilinear, align_corners=False
//   q[p]     = w·relu(a[p]) + c                  (1)    the ψ pre-activation
//   α[p]     = σ(q[p])      (σ(σ(q[p])) with double_sigmoid)
//   out[:,p] = α[p] · x[:, p]
//
// Entry points:
//   gate_forward   eval pass: out and α; x is read once, out written once, `a` never stored.
//   gate_logits    q only (B, 1, *S): the training path normalises q with its batch statistics.
//   gate_backward  recomputes a and q from x, then: dq (from grad_out/grad_alpha through the
//                  sigmoid(s), or given as grad_q), da = dq·w ⊙ [a > 0], grad_x = α·grad_out + Wᵀ·da;
//                  it writes da (B, Ci, *S) in the accumulation type (the caller turns it into the
//                  gradients of W, b and G with one GEMM and the interpolation's adjoint) and the
//                  per-tile partial sums of dq·relu(a) and dq (the gradients of w and c).
//   gate_project   grid mode's output transform on the upsampled map α: out = α·(W·x) + b per
//                  position (Oktay's `W` conv with its BN folded), α⊙x never stored;
//   gate_project_backward  its grad_x = α·Wᵀ·grad_out and ∂α = (Wᵀ·grad_out)·x.
//
// Work is split into tiles of kTile consecutive positions of one batch element. A tile gathers
// its x values (any strides, any float dtype) into a small position-major float/double buffer and
// then runs contiguous loops over channels, which the compiler vectorises (`omp simd`). Tiles are
// the unit of at::parallel_for and of the partial sums, which are added in tile order afterwards:
// results do not depend on the thread count.
//
// The tile loops are compiled three times (AVX-512, AVX2+FMA, baseline) through GCC target
// attributes and picked at run time from ATen's CPU capability, so the JIT build needs no -march.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "isa.h"

namespace medattn {
namespace attention_gate {
namespace {

// float for float32/float16/bfloat16 inputs, double for float64.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int64_t kTile = 64;  // positions per tile: x tile (64 × Cx) and a tile (64 × Ci) stay in L1/L2
constexpr int64_t kLanes = 16;  // channel block of the tile products (one AVX-512 register of floats)
constexpr int64_t kRows = 4;    // positions per register block of the tile products

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Linear interpolation along one axis, align_corners=False, exactly as ATen computes it:
// src = max(scale·(j + ½) − ½, 0) with scale = in/out, lo = ⌊src⌋, hi = min(lo + 1, in − 1).
template <typename acc_t>
struct AxisTable {
  std::vector<int64_t> lo, hi;
  std::vector<acc_t> w_lo, w_hi;

  AxisTable(int64_t out, int64_t in) : lo(out), hi(out), w_lo(out), w_hi(out) {
    const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
    for (int64_t j = 0; j < out; ++j) {
      acc_t src = scale * (static_cast<acc_t>(j) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
      if (src < 0) src = 0;
      const int64_t i0 = std::min<int64_t>(static_cast<int64_t>(src), in - 1);
      const acc_t lambda = std::min<acc_t>(std::max<acc_t>(src - static_cast<acc_t>(i0), 0), 1);
      lo[j] = i0;
      hi[j] = i0 + (i0 < in - 1 ? 1 : 0);
      w_lo[j] = static_cast<acc_t>(1) - lambda;
      w_hi[j] = lambda;
    }
  }
};

// Strides of a (B, C, D, H, W) view (D = 1, stride 0 for 2-D inputs).
struct Strides {
  int64_t b = 0, c = 0, d = 0, h = 0, w = 0;
};

Strides strides_of(const at::Tensor& t) {
  Strides s;
  s.b = t.stride(0);
  s.c = t.stride(1);
  if (t.dim() == 5) {
    s.d = t.stride(2);
    s.h = t.stride(3);
    s.w = t.stride(4);
  } else {
    s.d = 0;
    s.h = t.stride(2);
    s.w = t.stride(3);
  }
  return s;
}

template <typename scalar_t, typename acc_t>
struct Args {
  int64_t B = 0, Cx = 0, Ci = 0, D = 1, H = 1, W = 1, S = 1;
  int64_t CxP = 0, CiP = 0;  // channel counts padded to kLanes: rows of the a and grad-x tiles
  int64_t Dg = 1, Hg = 1, Wg = 1, Sg = 1;
  const scalar_t* x = nullptr;
  Strides xs;
  const acc_t* g_cl = nullptr;     // G channels-last (B, Sg, Ci)
  const acc_t* weight = nullptr;   // W (CiP, CxP), zero padding
  const acc_t* weight_t = nullptr; // Wᵀ (Cx, CiP), zero padding
  const acc_t* bias = nullptr;     // b (CiP), zero padding
  const acc_t* psi = nullptr;      // w (CiP), zero padding
  acc_t psi_bias = 0;              // c
  const AxisTable<acc_t>* ax_d = nullptr;
  const AxisTable<acc_t>* ax_h = nullptr;
  const AxisTable<acc_t>* ax_w = nullptr;
  bool double_sigmoid = false;
  // forward outputs
  scalar_t* out = nullptr;
  Strides os;
  scalar_t* alpha = nullptr;  // (B, 1, S) contiguous
  acc_t* logits = nullptr;    // (B, 1, S) contiguous
  // backward inputs / outputs
  const scalar_t* grad_out = nullptr;
  Strides gos;
  const scalar_t* grad_alpha = nullptr;  // (B, 1, S) contiguous or null
  const acc_t* grad_q = nullptr;         // (B, 1, S) contiguous or null
  scalar_t* grad_x = nullptr;
  Strides gxs;
  acc_t* grad_a = nullptr;    // (B, Ci, S) contiguous
  acc_t* partials = nullptr;  // (tiles, Ci + 1): Σ dq·relu(a), then Σ dq
  // grid mode's output transform (project_tiles): Ci plays C_out, weight/weight_t/bias are W_out's
  const acc_t* scale = nullptr;  // α (B, 1, S) contiguous
  acc_t* grad_scale = nullptr;   // ∂α (B, 1, S) contiguous

  int64_t tiles_per_batch() const { return (S + kTile - 1) / kTile; }
};

template <typename acc_t>
MEDATTN_INLINE acc_t sigmoid(acc_t v) {
  return static_cast<acc_t>(1) / (static_cast<acc_t>(1) + std::exp(-v));
}

// The (d, h, w) coordinates of a tile's positions, decoded once per tile by stepping (no division
// per position: at these channel counts a per-position div/mod costs as much as the interpolation).
struct TileCoords {
  int64_t d[kTile], h[kTile], w[kTile];

  void fill(int64_t s0, int64_t n, int64_t H, int64_t W) {
    int64_t w_ = s0 % W, h_ = (s0 / W) % H, d_ = s0 / (W * H);
    for (int64_t p = 0; p < n; ++p) {
      d[p] = d_, h[p] = h_, w[p] = w_;
      if (++w_ == W) {
        w_ = 0;
        if (++h_ == H) h_ = 0, ++d_;
      }
    }
  }
};

// Offsets (relative to the batch element) of the tile's positions in a tensor with strides s.
MEDATTN_INLINE void position_offsets(const TileCoords& tc, int64_t n, const Strides& s, int64_t* off) {
  for (int64_t p = 0; p < n; ++p) off[p] = tc.d[p] * s.d + tc.h[p] * s.h + tc.w[p] * s.w;
}

// A tile element (position p, channel c) lives at p·rs + c·cs of its buffer: position-major
// (rs = C or CP, cs = 1) or channel-major (rs = 1, cs = kTile). Each tensor's tile takes the layout
// its memory has — channel-major for channels-first x, position-major for channels_last — so that
// gathers and scatters run along the contiguous axis.
struct TileLayout {
  int64_t rs, cs;
};

// True when the tile's positions are consecutive elements in memory (channels-first, dense S).
MEDATTN_INLINE bool consecutive(const int64_t* off, int64_t n) {
  for (int64_t p = 1; p < n; ++p)
    if (off[p] != off[0] + p) return false;
  return true;
}

// Gather an n-position × C-channel tile of a strided (B, C, *S) tensor into `dst` (layout L).
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void gather_tile(const scalar_t* base, int64_t stride_c, const int64_t* off, int64_t n, int64_t C,
                                acc_t* dst, TileLayout L) {
  if (stride_c == 1) {  // channels_last: contiguous along channels
    for (int64_t p = 0; p < n; ++p) {
      const scalar_t* src = base + off[p];
      acc_t* row = dst + p * L.rs;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) row[c * L.cs] = static_cast<acc_t>(src[c]);
    }
  } else if (consecutive(off, n)) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = base + c * stride_c + off[0];
      acc_t* col = dst + c * L.cs;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) col[p * L.rs] = static_cast<acc_t>(src[p]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = base + c * stride_c;
      for (int64_t p = 0; p < n; ++p) dst[p * L.rs + c * L.cs] = static_cast<acc_t>(src[off[p]]);
    }
  }
}

// Scatter a tile (layout L) into a strided tensor, each position scaled by row_scale[p] (1 when null).
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void scatter_tile(scalar_t* base, int64_t stride_c, const int64_t* off, int64_t n, int64_t C,
                                 const acc_t* src, TileLayout L, const acc_t* row_scale) {
  if (stride_c == 1) {
    for (int64_t p = 0; p < n; ++p) {
      scalar_t* dst = base + off[p];
      const acc_t* row = src + p * L.rs;
      const acc_t k = row_scale ? row_scale[p] : static_cast<acc_t>(1);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(k * row[c * L.cs]);
    }
  } else if (consecutive(off, n)) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* dst = base + c * stride_c + off[0];
      const acc_t* col = src + c * L.cs;
      if (row_scale) {
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) dst[p] = static_cast<scalar_t>(row_scale[p] * col[p * L.rs]);
      } else {
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) dst[p] = static_cast<scalar_t>(col[p * L.rs]);
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* dst = base + c * stride_c;
      for (int64_t p = 0; p < n; ++p) {
        const acc_t k = row_scale ? row_scale[p] : static_cast<acc_t>(1);
        dst[off[p]] = static_cast<scalar_t>(k * src[p * L.rs + c * L.cs]);
      }
    }
  }
}

// out[r, 0:NP] += Σ_k lhs[r·rs + k·ks] · rhs[k·NP + 0:NP] for the rows r < rows of a tile.
// Register blocking: kRows positions × kLanes channels of accumulators stay in registers over the
// whole k loop (one rhs vector load and kRows broadcasts per k). NP is a multiple of kLanes (zero
// padded operands); rows up to the next multiple of kRows are computed too and never read (the
// tile buffers hold kTile rows).
template <typename acc_t>
struct Vec64 {  // a GCC vector of 64 bytes: one AVX-512 register, two AVX2 registers, four SSE registers
  typedef acc_t type __attribute__((vector_size(64)));
};

template <typename acc_t>
MEDATTN_INLINE void tile_gemm(const acc_t* lhs, TileLayout L, int64_t K, const acc_t* rhs, int64_t NP, acc_t* out,
                              int64_t rows) {
  using V = typename Vec64<acc_t>::type;
  constexpr int64_t kPer = 64 / static_cast<int64_t>(sizeof(acc_t));  // lanes of one V
  constexpr int64_t kVecs = kLanes / kPer;                              // 1 for float, 2 for double
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    for (int64_t n0 = 0; n0 < NP; n0 += kLanes) {
      V acc[kRows][kVecs];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t j = 0; j < kVecs; ++j) std::memcpy(&acc[r][j], out + (r0 + r) * NP + n0 + j * kPer, 64);
      for (int64_t k = 0; k < K; ++k) {
        V w[kVecs];
        for (int64_t j = 0; j < kVecs; ++j) std::memcpy(&w[j], rhs + k * NP + n0 + j * kPer, 64);
        for (int64_t r = 0; r < kRows; ++r) {
          const acc_t v = lhs[(r0 + r) * L.rs + k * L.cs];
          for (int64_t j = 0; j < kVecs; ++j) acc[r][j] += v * w[j];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t j = 0; j < kVecs; ++j) std::memcpy(out + (r0 + r) * NP + n0 + j * kPer, &acc[r][j], 64);
    }
  }
}

// a[p] = b + up(G)[p] + W·x[:, p] for the n positions of a tile (a: n × CiP, x: layout XL).
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void pre_activation(const Args<scalar_t, acc_t>& A, int64_t b, const TileCoords& tc, int64_t n,
                                   const acc_t* xt, TileLayout XL, acc_t* at) {
  const int64_t Ci = A.Ci, CiP = A.CiP;
  const acc_t* g = A.g_cl + b * A.Sg * Ci;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t w = tc.w[p], h = tc.h[p], d = tc.d[p];
    acc_t* row = at + p * CiP;
#pragma omp simd
    for (int64_t i = 0; i < CiP; ++i) row[i] = A.bias[i];
    // up to 2 × 2 × 2 corners; a zero weight (same-size axis, clamped edge) is skipped
    const int64_t di[2] = {A.ax_d->lo[d], A.ax_d->hi[d]};
    const acc_t dw[2] = {A.ax_d->w_lo[d], A.ax_d->w_hi[d]};
    const int64_t hi_[2] = {A.ax_h->lo[h], A.ax_h->hi[h]};
    const acc_t hw[2] = {A.ax_h->w_lo[h], A.ax_h->w_hi[h]};
    const int64_t wi[2] = {A.ax_w->lo[w], A.ax_w->hi[w]};
    const acc_t ww[2] = {A.ax_w->w_lo[w], A.ax_w->w_hi[w]};
    for (int kd = 0; kd < 2; ++kd) {
      if (dw[kd] == 0) continue;
      for (int kh = 0; kh < 2; ++kh) {
        if (hw[kh] == 0) continue;
        for (int kw = 0; kw < 2; ++kw) {
          if (ww[kw] == 0) continue;
          const acc_t weight = dw[kd] * hw[kh] * ww[kw];
          const acc_t* corner = g + ((di[kd] * A.Hg + hi_[kh]) * A.Wg + wi[kw]) * Ci;
#pragma omp simd
          for (int64_t i = 0; i < Ci; ++i) row[i] += weight * corner[i];
        }
      }
    }
  }
  tile_gemm(xt, XL, A.Cx, A.weight_t, CiP, at, n);  // a += x·Wᵀ
}

template <typename acc_t>
MEDATTN_INLINE acc_t psi_logit(const acc_t* row, const acc_t* psi, acc_t psi_bias, int64_t Ci) {
  acc_t q = 0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < Ci; ++i) q += psi[i] * std::max(row[i], static_cast<acc_t>(0));
  return q + psi_bias;
}

struct Scratch {
  std::vector<int64_t> off_in, off_out;
};

// ------------------------------------------------------------------------------------------------
// tile loops
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void forward_tiles(const Args<scalar_t, acc_t>& A, int64_t lo, int64_t hi) {
  std::vector<acc_t> xt(kTile * A.Cx), at(kTile * A.CiP), alpha(kTile);
  std::vector<int64_t> xoff(kTile), ooff(kTile);
  const int64_t tpb = A.tiles_per_batch();
  TileCoords tc;
  const TileLayout XL = A.xs.c == 1 ? TileLayout{A.Cx, 1} : TileLayout{1, kTile};
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / tpb, s0 = (t % tpb) * kTile, n = std::min(kTile, A.S - s0);
    tc.fill(s0, n, A.H, A.W);
    position_offsets(tc, n, A.xs, xoff.data());
    gather_tile(A.x + b * A.xs.b, A.xs.c, xoff.data(), n, A.Cx, xt.data(), XL);
    pre_activation(A, b, tc, n, xt.data(), XL, at.data());
    for (int64_t p = 0; p < n; ++p) {
      const acc_t q = psi_logit(at.data() + p * A.CiP, A.psi, A.psi_bias, A.CiP);
      if (A.logits) {
        A.logits[b * A.S + s0 + p] = q;
        continue;
      }
      acc_t a = sigmoid(q);
      if (A.double_sigmoid) a = sigmoid(a);
      alpha[p] = a;
      A.alpha[b * A.S + s0 + p] = static_cast<scalar_t>(a);
    }
    if (A.out) {
      position_offsets(tc, n, A.os, ooff.data());
      scatter_tile(A.out + b * A.os.b, A.os.c, ooff.data(), n, A.Cx, xt.data(), XL, alpha.data());
    }
  }
}

template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void backward_tiles(const Args<scalar_t, acc_t>& A, int64_t lo, int64_t hi) {
  const int64_t Ci = A.Ci, Cx = A.Cx, CiP = A.CiP, CxP = A.CxP;
  std::vector<acc_t> xt(kTile * Cx), at(kTile * CiP), gt(kTile * CxP);
  std::vector<int64_t> off(kTile);
  const int64_t tpb = A.tiles_per_batch();
  TileCoords tc;
  const TileLayout XL = A.xs.c == 1 ? TileLayout{Cx, 1} : TileLayout{1, kTile};
  const TileLayout GL{CxP, 1};  // grad tile: position-major, padded rows (the da·W product's output)
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / tpb, s0 = (t % tpb) * kTile, n = std::min(kTile, A.S - s0);
    tc.fill(s0, n, A.H, A.W);
    position_offsets(tc, n, A.xs, off.data());
    gather_tile(A.x + b * A.xs.b, A.xs.c, off.data(), n, Cx, xt.data(), XL);
    pre_activation(A, b, tc, n, xt.data(), XL, at.data());
    if (A.grad_out) {  // gt starts as grad_out; it becomes grad_x in place (padding columns stay 0)
      position_offsets(tc, n, A.gos, off.data());
      gather_tile(A.grad_out + b * A.gos.b, A.gos.c, off.data(), n, Cx, gt.data(), GL);
    } else {
      std::fill(gt.begin(), gt.end(), static_cast<acc_t>(0));
    }
    acc_t* part = A.partials + t * (Ci + 1);
    std::fill(part, part + Ci + 1, static_cast<acc_t>(0));
    for (int64_t p = 0; p < n; ++p) {
      acc_t* row = at.data() + p * CiP;
      acc_t* grow = gt.data() + p * CxP;
      const acc_t q = psi_logit(row, A.psi, A.psi_bias, CiP);
      acc_t dq;
      if (A.grad_out) {
        const acc_t* xr = xt.data() + p * XL.rs;
        const acc_t first = sigmoid(q);
        const acc_t a = A.double_sigmoid ? sigmoid(first) : first;
        acc_t d_alpha = A.grad_alpha ? static_cast<acc_t>(A.grad_alpha[b * A.S + s0 + p]) : static_cast<acc_t>(0);
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < Cx; ++c) dot += grow[c] * xr[c * XL.cs];
        d_alpha += dot;
        if (A.double_sigmoid) d_alpha *= a * (static_cast<acc_t>(1) - a);
        dq = d_alpha * first * (static_cast<acc_t>(1) - first);
#pragma omp simd
        for (int64_t c = 0; c < Cx; ++c) grow[c] *= a;  // α·grad_out
      } else {
        dq = A.grad_q[b * A.S + s0 + p];
      }
      part[Ci] += dq;
#pragma omp simd
      for (int64_t i = 0; i < Ci; ++i) {
        const bool active = row[i] > 0;
        part[i] += active ? dq * row[i] : static_cast<acc_t>(0);
        row[i] = active ? dq * A.psi[i] : static_cast<acc_t>(0);  // row now holds da
      }
#pragma omp simd
      for (int64_t i = Ci; i < CiP; ++i) row[i] = 0;
    }
    tile_gemm(at.data(), TileLayout{CiP, 1}, Ci, A.weight, CxP, gt.data(), n);  // grad_x += da·W
    acc_t* ga = A.grad_a + b * Ci * A.S + s0;
    for (int64_t i = 0; i < Ci; ++i)
      for (int64_t p = 0; p < n; ++p) ga[i * A.S + p] = at[p * CiP + i];
    position_offsets(tc, n, A.gxs, off.data());
    scatter_tile(A.grad_x + b * A.gxs.b, A.gxs.c, off.data(), n, Cx, gt.data(), GL,
                 static_cast<const acc_t*>(nullptr));
  }
}

// Grid mode's output transform on the upsampled attention map α (B, 1, *S):
//   out[:, p] = α[p]·(W·x[:, p]) + b          (W: C_out × Cx; Oktay's W conv with its BN folded)
// W·(α⊙x) = α·(W·x) because α is one value per position, so α⊙x is never stored either.
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void project_tiles(const Args<scalar_t, acc_t>& A, int64_t lo, int64_t hi) {
  const int64_t Cx = A.Cx, Co = A.Ci, CoP = A.CiP;
  std::vector<acc_t> xt(kTile * Cx), zt(kTile * CoP);
  std::vector<int64_t> off(kTile);
  const int64_t tpb = A.tiles_per_batch();
  TileCoords tc;
  const TileLayout XL = A.xs.c == 1 ? TileLayout{Cx, 1} : TileLayout{1, kTile};
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / tpb, s0 = (t % tpb) * kTile, n = std::min(kTile, A.S - s0);
    tc.fill(s0, n, A.H, A.W);
    position_offsets(tc, n, A.xs, off.data());
    gather_tile(A.x + b * A.xs.b, A.xs.c, off.data(), n, Cx, xt.data(), XL);
    std::fill(zt.begin(), zt.end(), static_cast<acc_t>(0));
    tile_gemm(xt.data(), XL, Cx, A.weight_t, CoP, zt.data(), n);  // z = x·Wᵀ
    const acc_t* alpha = A.scale + b * A.S + s0;
    for (int64_t p = 0; p < n; ++p) {
      acc_t* row = zt.data() + p * CoP;
      const acc_t k = alpha[p];
#pragma omp simd
      for (int64_t o = 0; o < Co; ++o) row[o] = k * row[o] + A.bias[o];
    }
    position_offsets(tc, n, A.os, off.data());
    scatter_tile(A.out + b * A.os.b, A.os.c, off.data(), n, Co, zt.data(), TileLayout{CoP, 1},
                 static_cast<const acc_t*>(nullptr));
  }
}

// Its backward: t[p] = Wᵀ·grad_out[:, p] (Cx), grad_x[:, p] = α[p]·t[p], ∂α[p] = t[p]·x[:, p].
template <typename scalar_t, typename acc_t>
MEDATTN_INLINE void project_backward_tiles(const Args<scalar_t, acc_t>& A, int64_t lo, int64_t hi) {
  const int64_t Cx = A.Cx, CxP = A.CxP, Co = A.Ci, CoP = A.CiP;
  std::vector<acc_t> xt(kTile * Cx), gt(kTile * CoP), tt(kTile * CxP);
  std::vector<int64_t> off(kTile);
  const int64_t tpb = A.tiles_per_batch();
  TileCoords tc;
  const TileLayout XL = A.xs.c == 1 ? TileLayout{Cx, 1} : TileLayout{1, kTile};
  const TileLayout GL{CoP, 1};
  for (int64_t t = lo; t < hi; ++t) {
    const int64_t b = t / tpb, s0 = (t % tpb) * kTile, n = std::min(kTile, A.S - s0);
    tc.fill(s0, n, A.H, A.W);
    position_offsets(tc, n, A.xs, off.data());
    gather_tile(A.x + b * A.xs.b, A.xs.c, off.data(), n, Cx, xt.data(), XL);
    position_offsets(tc, n, A.gos, off.data());
    gather_tile(A.grad_out + b * A.gos.b, A.gos.c, off.data(), n, Co, gt.data(), GL);
    std::fill(tt.begin(), tt.end(), static_cast<acc_t>(0));
    tile_gemm(gt.data(), GL, Co, A.weight, CxP, tt.data(), n);  // t = grad_out·W
    const acc_t* alpha = A.scale + b * A.S + s0;
    acc_t* grad_alpha = A.grad_scale + b * A.S + s0;
    for (int64_t p = 0; p < n; ++p) {
      const acc_t* trow = tt.data() + p * CxP;
      const acc_t* xr = xt.data() + p * XL.rs;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < Cx; ++c) dot += trow[c] * xr[c * XL.cs];
      grad_alpha[p] = dot;
    }
    position_offsets(tc, n, A.gxs, off.data());
    scatter_tile(A.grad_x + b * A.gxs.b, A.gxs.c, off.data(), n, Cx, tt.data(), TileLayout{CxP, 1}, alpha);
  }
}

// ------------------------------------------------------------------------------------------------
// instruction-set dispatch
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
using TileFn = void (*)(const Args<scalar_t, acc_t>&, int64_t, int64_t);

MEDATTN_ISA_VARIANTS(forward_tiles, Args)
MEDATTN_ISA_VARIANTS(backward_tiles, Args)
MEDATTN_ISA_VARIANTS(project_tiles, Args)
MEDATTN_ISA_VARIANTS(project_backward_tiles, Args)

// ------------------------------------------------------------------------------------------------
// host functions
// ------------------------------------------------------------------------------------------------

at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Shapes and the tensors shared by every entry point; keeps the converted operands alive.
struct Prepared {
  at::Tensor g_cl, weight, weight_t, bias, psi;
  int64_t B, Cx, Ci, D, H, W, S, Dg, Hg, Wg, Sg, CxP, CiP;
  double psi_bias;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& G, const at::Tensor& weight, const at::Tensor& bias,
                 const at::Tensor& psi, const at::Tensor& psi_bias) {
  TORCH_CHECK(x.device().is_cpu(), "attention_gate (cpp): expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "attention_gate (cpp): x must be (B, Cx, *S), got ", x.sizes());
  TORCH_CHECK(G.dim() == x.dim() && G.size(0) == x.size(0),
              "attention_gate (cpp): G must be (B, Ci, *Sg) of x's rank, got ", G.sizes());
  const auto acc = acc_dtype_of(x.scalar_type());
  for (const at::Tensor* t : {&G, &weight, &bias, &psi, &psi_bias})
    TORCH_CHECK(t->scalar_type() == acc, "attention_gate (cpp): G and the folded parameters must be ", acc,
                " for x of dtype ", x.scalar_type(), ", got ", t->scalar_type());
  Prepared P;
  P.B = x.size(0);
  P.Cx = x.size(1);
  P.Ci = G.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == P.Ci && weight.size(1) == P.Cx,
              "attention_gate (cpp): weight must be (Ci, Cx), got ", weight.sizes());
  TORCH_CHECK(bias.numel() == P.Ci && psi.numel() == P.Ci && psi_bias.numel() == 1,
              "attention_gate (cpp): bias and psi must hold Ci values and psi_bias one");
  const bool three_d = x.dim() == 5;
  P.D = three_d ? x.size(2) : 1;
  P.H = x.size(three_d ? 3 : 2);
  P.W = x.size(three_d ? 4 : 3);
  P.Dg = three_d ? G.size(2) : 1;
  P.Hg = G.size(three_d ? 3 : 2);
  P.Wg = G.size(three_d ? 4 : 3);
  P.S = P.D * P.H * P.W;
  P.Sg = P.Dg * P.Hg * P.Wg;
  // the coarse map channels-last, so that one corner's Ci values are contiguous
  P.g_cl = G.reshape({P.B, P.Ci, P.Sg}).transpose(1, 2).contiguous();
  // zero-padded operands of the tile products (channel counts rounded up to kLanes)
  P.CxP = round_up(P.Cx, kLanes);
  P.CiP = round_up(P.Ci, kLanes);
  P.weight = at::zeros({P.CiP, P.CxP}, weight.options());
  P.weight.narrow(0, 0, P.Ci).narrow(1, 0, P.Cx).copy_(weight);
  P.weight_t = at::zeros({P.Cx, P.CiP}, weight.options());
  P.weight_t.narrow(1, 0, P.Ci).copy_(weight.t());
  P.bias = at::zeros({P.CiP}, bias.options());
  P.bias.narrow(0, 0, P.Ci).copy_(bias.reshape({P.Ci}));
  P.psi = at::zeros({P.CiP}, psi.options());
  P.psi.narrow(0, 0, P.Ci).copy_(psi.reshape({P.Ci}));
  P.psi_bias = psi_bias.item<double>();
  return P;
}

template <typename scalar_t, typename acc_t>
Args<scalar_t, acc_t> make_args(const Prepared& P, const at::Tensor& x, bool double_sigmoid) {
  Args<scalar_t, acc_t> A;
  A.B = P.B, A.Cx = P.Cx, A.Ci = P.Ci, A.D = P.D, A.H = P.H, A.W = P.W, A.S = P.S;
  A.Dg = P.Dg, A.Hg = P.Hg, A.Wg = P.Wg, A.Sg = P.Sg;
  A.CxP = P.CxP, A.CiP = P.CiP;
  A.x = x.data_ptr<scalar_t>();
  A.xs = strides_of(x);
  A.g_cl = P.g_cl.data_ptr<acc_t>();
  A.weight = P.weight.data_ptr<acc_t>();
  A.weight_t = P.weight_t.data_ptr<acc_t>();
  A.bias = P.bias.data_ptr<acc_t>();
  A.psi = P.psi.data_ptr<acc_t>();
  A.psi_bias = static_cast<acc_t>(P.psi_bias);
  A.double_sigmoid = double_sigmoid;
  return A;
}

// A tile is kTile × Cx × Ci multiply-adds: a grain of a few tiles amortises the task overhead.
template <typename scalar_t, typename acc_t>
void run_tiles(TileFn<scalar_t, acc_t> fn, const Args<scalar_t, acc_t>& A) {
  const int64_t tiles = A.B * A.tiles_per_batch();
  const int64_t work = std::max<int64_t>(1, kTile * A.Cx * A.Ci);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, tiles, grain, [&](int64_t lo, int64_t hi) { fn(A, lo, hi); });
}

std::vector<int64_t> alpha_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[1] = 1;
  return shape;
}

// x (B, Cx, *S) any strides/float dtype; G (B, Ci, *Sg), weight (Ci, Cx), bias (Ci), psi (Ci),
// psi_bias (1) in the accumulation dtype -> (out like x, alpha (B, 1, *S) in x's dtype).
std::vector<at::Tensor> gate_forward(const at::Tensor& x, const at::Tensor& G, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& psi, const at::Tensor& psi_bias,
                                     bool double_sigmoid) {
  Prepared P = prepare(x, G, weight, bias, psi, psi_bias);
  at::Tensor out = at::empty_like(x);
  at::Tensor alpha = at::empty(alpha_shape(x), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    AxisTable<acc_t> ad(P.D, P.Dg), ah(P.H, P.Hg), aw(P.W, P.Wg);
    auto A = make_args<scalar_t, acc_t>(P, x, double_sigmoid);
    A.ax_d = &ad, A.ax_h = &ah, A.ax_w = &aw;
    A.out = out.data_ptr<scalar_t>();
    A.os = strides_of(out);
    A.alpha = alpha.data_ptr<scalar_t>();
    run_tiles<scalar_t, acc_t>(forward_tiles_for<scalar_t, acc_t>(runtime_isa()), A);
  });
  return {out, alpha};
}

// The ψ pre-activation q (B, 1, *S) in the accumulation dtype (training: normalised outside).
at::Tensor gate_logits(const at::Tensor& x, const at::Tensor& G, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& psi, const at::Tensor& psi_bias) {
  Prepared P = prepare(x, G, weight, bias, psi, psi_bias);
  at::Tensor logits = at::empty(alpha_shape(x), x.options().dtype(acc_dtype_of(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_logits", [&] {
    using acc_t = acc_type<scalar_t>;
    AxisTable<acc_t> ad(P.D, P.Dg), ah(P.H, P.Hg), aw(P.W, P.Wg);
    auto A = make_args<scalar_t, acc_t>(P, x, false);
    A.ax_d = &ad, A.ax_h = &ah, A.ax_w = &aw;
    A.logits = logits.data_ptr<acc_t>();
    run_tiles<scalar_t, acc_t>(forward_tiles_for<scalar_t, acc_t>(runtime_isa()), A);
  });
  return logits;
}

// Backward of gate_forward (grad_out and/or grad_alpha given) or of gate_logits (grad_q given).
// -> grad_x (like x), grad_a (B, Ci, *S) acc, grad_psi (Ci) acc, grad_psi_bias (1) acc.
std::vector<at::Tensor> gate_backward(const at::Tensor& x, const at::Tensor& G, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& psi, const at::Tensor& psi_bias,
                                      const c10::optional<at::Tensor>& grad_q,
                                      const c10::optional<at::Tensor>& grad_out,
                                      const c10::optional<at::Tensor>& grad_alpha, bool double_sigmoid) {
  Prepared P = prepare(x, G, weight, bias, psi, psi_bias);
  const auto acc = acc_dtype_of(x.scalar_type());
  const bool from_logits = grad_q.has_value();
  TORCH_CHECK(from_logits != (grad_out.has_value() || grad_alpha.has_value()),
              "attention_gate (cpp): give grad_q (logits pass) or grad_out/grad_alpha (output pass)");
  at::Tensor gq, go, ga_in;
  if (from_logits) gq = grad_q->to(acc).contiguous();
  if (grad_out.has_value()) {
    go = *grad_out;
    TORCH_CHECK(go.sizes() == x.sizes() && go.scalar_type() == x.scalar_type(),
                "attention_gate (cpp): grad_out must match x");
  }
  if (grad_alpha.has_value()) ga_in = grad_alpha->to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  std::vector<int64_t> a_shape(x.sizes().begin(), x.sizes().end());
  a_shape[1] = P.Ci;
  at::Tensor grad_a = at::empty(a_shape, x.options().dtype(acc));
  const int64_t tiles = P.B * ((P.S + kTile - 1) / kTile);
  at::Tensor partials = at::empty({tiles, P.Ci + 1}, x.options().dtype(acc));
  at::Tensor sums = at::zeros({P.Ci + 1}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    AxisTable<acc_t> ad(P.D, P.Dg), ah(P.H, P.Hg), aw(P.W, P.Wg);
    auto A = make_args<scalar_t, acc_t>(P, x, double_sigmoid);
    A.ax_d = &ad, A.ax_h = &ah, A.ax_w = &aw;
    if (from_logits) A.grad_q = gq.data_ptr<acc_t>();
    if (go.defined()) {
      A.grad_out = go.data_ptr<scalar_t>();
      A.gos = strides_of(go);
    }
    if (ga_in.defined()) {
      A.grad_alpha = ga_in.data_ptr<scalar_t>();
      if (!go.defined()) {  // only α is used: grad_out is zero
        go = at::zeros_like(x);
        A.grad_out = go.data_ptr<scalar_t>();
        A.gos = strides_of(go);
      }
    }
    A.grad_x = grad_x.data_ptr<scalar_t>();
    A.gxs = strides_of(grad_x);
    A.grad_a = grad_a.data_ptr<acc_t>();
    A.partials = partials.data_ptr<acc_t>();
    run_tiles<scalar_t, acc_t>(backward_tiles_for<scalar_t, acc_t>(runtime_isa()), A);
    // partial sums added serially in tile order: deterministic for any thread count
    acc_t* dst = sums.data_ptr<acc_t>();
    const acc_t* part = A.partials;
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t i = 0; i <= P.Ci; ++i) dst[i] += part[t * (P.Ci + 1) + i];
  });
  at::Tensor grad_psi = sums.narrow(0, 0, P.Ci).clone();
  at::Tensor grad_psi_bias = sums.narrow(0, P.Ci, 1).clone();
  return {grad_x, grad_a, grad_psi, grad_psi_bias};
}

// Grid mode's output transform: weight (Co, Cx), bias (Co) and alpha (B, 1, *S) in the
// accumulation dtype; the shapes, the zero-padded operands of the tile products and the Args.
struct Projection {
  at::Tensor weight, weight_t, bias, alpha;
  int64_t Co, CoP, CxP;
};

Projection prepare_projection(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "attention_gate project (cpp): expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "attention_gate project (cpp): x must be (B, Cx, *S), got ",
              x.sizes());
  const auto acc = acc_dtype_of(x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == acc,
              "attention_gate project (cpp): weight must be (Co, Cx) of dtype ", acc, ", got ", weight.sizes(), " ",
              weight.scalar_type());
  std::vector<int64_t> a_shape = alpha_shape(x);
  TORCH_CHECK(alpha.sizes() == at::IntArrayRef(a_shape) && alpha.scalar_type() == acc,
              "attention_gate project (cpp): alpha must be ", at::IntArrayRef(a_shape), " of dtype ", acc,
              ", got ", alpha.sizes(), " ", alpha.scalar_type());
  Projection R;
  R.Co = weight.size(0);
  R.CoP = round_up(R.Co, kLanes);
  R.CxP = round_up(x.size(1), kLanes);
  R.weight = at::zeros({R.CoP, R.CxP}, weight.options());
  R.weight.narrow(0, 0, R.Co).narrow(1, 0, x.size(1)).copy_(weight);
  R.weight_t = at::zeros({x.size(1), R.CoP}, weight.options());
  R.weight_t.narrow(1, 0, R.Co).copy_(weight.t());
  R.bias = at::zeros({R.CoP}, weight.options());
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == R.Co && bias->scalar_type() == acc,
                "attention_gate project (cpp): bias must hold Co values of dtype ", acc);
    R.bias.narrow(0, 0, R.Co).copy_(bias->reshape({R.Co}));
  }
  R.alpha = alpha.contiguous();
  return R;
}

template <typename scalar_t, typename acc_t>
Args<scalar_t, acc_t> projection_args(const Projection& R, const at::Tensor& x) {
  Args<scalar_t, acc_t> A;
  const bool three_d = x.dim() == 5;
  A.B = x.size(0), A.Cx = x.size(1), A.Ci = R.Co;
  A.D = three_d ? x.size(2) : 1;
  A.H = x.size(three_d ? 3 : 2);
  A.W = x.size(three_d ? 4 : 3);
  A.S = A.D * A.H * A.W;
  A.CxP = R.CxP, A.CiP = R.CoP;
  A.x = x.data_ptr<scalar_t>();
  A.xs = strides_of(x);
  A.weight = R.weight.data_ptr<acc_t>();
  A.weight_t = R.weight_t.data_ptr<acc_t>();
  A.bias = R.bias.data_ptr<acc_t>();
  A.scale = R.alpha.data_ptr<acc_t>();
  return A;
}

// out (B, Co, *S) in x's dtype (x's memory format when Co == Cx) = α·(W·x) + b per position.
at::Tensor gate_project(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias) {
  Projection R = prepare_projection(x, alpha, weight, bias);
  std::vector<int64_t> o_shape(x.sizes().begin(), x.sizes().end());
  o_shape[1] = R.Co;
  at::Tensor out = R.Co == x.size(1) ? at::empty_like(x) : at::empty(o_shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_project", [&] {
    using acc_t = acc_type<scalar_t>;
    auto A = projection_args<scalar_t, acc_t>(R, x);
    A.out = out.data_ptr<scalar_t>();
    A.os = strides_of(out);
    run_tiles<scalar_t, acc_t>(project_tiles_for<scalar_t, acc_t>(runtime_isa()), A);
  });
  return out;
}

// -> grad_x (like x), grad_alpha (B, 1, *S) in the accumulation dtype.
std::vector<at::Tensor> gate_project_backward(const at::Tensor& x, const at::Tensor& alpha,
                                              const at::Tensor& weight, const at::Tensor& grad_out) {
  Projection R = prepare_projection(x, alpha, weight, c10::nullopt);
  TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.size(0) == x.size(0) && grad_out.size(1) == R.Co &&
                  grad_out.scalar_type() == x.scalar_type(),
              "attention_gate project (cpp): grad_out must be (B, Co, *S) of x's dtype, got ", grad_out.sizes());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_alpha = at::empty(alpha_shape(x), x.options().dtype(acc_dtype_of(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_project_backward",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    auto A = projection_args<scalar_t, acc_t>(R, x);
    A.grad_out = grad_out.data_ptr<scalar_t>();
    A.gos = strides_of(grad_out);
    A.grad_x = grad_x.data_ptr<scalar_t>();
    A.gxs = strides_of(grad_x);
    A.grad_scale = grad_alpha.data_ptr<acc_t>();
    run_tiles<scalar_t, acc_t>(project_backward_tiles_for<scalar_t, acc_t>(runtime_isa()), A);
  });
  return {grad_x, grad_alpha};
}

}  // namespace
}  // namespace attention_gate
}  // namespace medattn

namespace ag = medattn::attention_gate;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused Attention U-Net gate (additive and grid forms), C++ CPU kernels";
  m.def("gate_forward", &ag::gate_forward, "out, alpha = fused gate (folded parameters)");
  m.def("gate_logits", &ag::gate_logits, "q = w·relu(W·x + b + up(G)) + c, (B, 1, *S)");
  m.def("gate_backward", &ag::gate_backward, "grad_x, grad_a, grad_psi, grad_psi_bias");
  m.def("gate_project", &ag::gate_project, "out = alpha·(W·x) + b per position (grid mode's output conv)");
  m.def("gate_project_backward", &ag::gate_project_backward, "grad_x, grad_alpha of gate_project");
  m.def("gate_isa", &medattn::isa_name, "The instruction set the attention_gate kernels dispatch to");
}
