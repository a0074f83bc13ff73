// Attention U-Net gate (additive form, and grid form's output pass), fused CUDA kernels.
//
// Same contract as csrc/cpu/attention_gate.cpp (the Python side folds the normalisations and
// computes the coarse gating map G (B, Ci, *Sg) in the accumulation dtype). Per position p:
//
//   a[p] = W·x[:, p] + b + up(G)[p]    (Ci, never stored)    up: (bi|tri)linear, align_corners=False
//   q[p] = w·relu(a[p]) + c,   α[p] = σ(q[p]) (σ∘σ with double_sigmoid),   out[:, p] = α[p]·x[:, p]
//
// A block owns kThreads (128) consecutive positions of one batch element, one thread per position;
// a thread decomposes its flat position once and addresses its x column (any strides: channels-first,
// channels_last, views) from there. It holds that column in registers — whole when Cx <= 64 (32 in float64,
// 16 in its backward), loaded once; past that a 64-channel chunk at a time, re-read per 8 rows of W from the
// cache — and W streams through shared memory in (8 × 64) tiles that all threads read at the same
// address (a broadcast): one shared load per FMA, a few KB of shared memory per block whatever Cx
// and Ci, so no width is refused for lack of it. Each thread then has 8 channels of its own `a`
// at a time.
//
// gate_backward recomputes a (and q) per thread, writes da (B, Ci, *S) and reads this thread's da
// back for grad_x = α·grad_out + Σ_i da_i·W[i, :], 64 channels of grad_x at a time (W's tiles
// again). The products dq·relu(a_i) go to a shared (8 + 1) × 128 buffer whose rows 8 threads sum
// in order: the per-block partials are deterministic, and they are added on the host side in block
// order.
//
// Grid mode's output transform on the upsampled attention map α (B, 1, *S) (the Python side runs
// the logits pass above on θ·x and upsamples α):
//   gate_project           out[:, p] = α[p]·(W·x[:, p]) + b     (W: Co × Cx, BN folded)
//   gate_project_backward  grad_x[:, p] = α[p]·Wᵀ·grad_out[:, p],  ∂α[p] = (Wᵀ·grad_out[:, p])·x[:, p]
// Same blocking: W (Co × Cx) in (8 × 64) shared tiles, the output written per thread, 8 channels
// (backward: 64) at a time.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace medattn {
namespace attention_gate_cuda {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

struct Strides {
  int64_t b, c, d, h, w;
};

struct Dims {
  int64_t Cx, Ci, D, H, W, S, Dg, Hg, Wg, Sg;
};

Strides strides_of(const at::Tensor& t) {
  if (t.dim() == 5) return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
  return {t.stride(0), t.stride(1), 0, t.stride(2), t.stride(3)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + exp(-v));
}

// ATen's linear source index, align_corners=False: src = max(scale·(j + ½) − ½, 0).
template <typename acc_t>
struct Axis {
  int64_t lo, hi;
  acc_t lam;
};

template <typename acc_t>
__device__ __forceinline__ Axis<acc_t> axis(int64_t j, int64_t in, int64_t out) {
  const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
  acc_t src = scale * (static_cast<acc_t>(j) + acc_t(0.5)) - acc_t(0.5);
  if (src < acc_t(0)) src = acc_t(0);
  int64_t lo = static_cast<int64_t>(src);
  if (lo > in - 1) lo = in - 1;
  acc_t lam = src - static_cast<acc_t>(lo);
  lam = lam < acc_t(0) ? acc_t(0) : (lam > acc_t(1) ? acc_t(1) : lam);
  return {lo, lo + (lo < in - 1 ? 1 : 0), lam};
}

// One thread's position: its flat index decomposed into (d, h, w) once, and its interpolation
// corners. offset(st) is the position's element offset in a tensor of strides st (channel 0);
// every access of the kernels below steps from there by the channel stride, so no div/mod runs
// per element.
template <typename acc_t>
struct Position {
  int64_t s;         // flat index in S
  int64_t d, h, w;
  Axis<acc_t> ad, ah, aw;
  __device__ __forceinline__ int64_t offset(const Strides& st) const { return d * st.d + h * st.h + w * st.w; }
};

template <typename acc_t>
__device__ __forceinline__ Position<acc_t> position(int64_t s, const Dims& n) {
  const int64_t w = s % n.W, h = (s / n.W) % n.H, d = s / (n.W * n.H);
  return {s, d, h, w, axis<acc_t>(d, n.Dg, n.D), axis<acc_t>(h, n.Hg, n.H), axis<acc_t>(w, n.Wg, n.W)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t sample(const acc_t* plane, const Position<acc_t>& P, const Dims& n) {
  auto at = [&](int64_t d, int64_t h, int64_t w) { return plane[(d * n.Hg + h) * n.Wg + w]; };
  const acc_t lw = P.aw.lam, lh = P.ah.lam, ld = P.ad.lam;
  const acc_t near = (acc_t(1) - lh) * ((acc_t(1) - lw) * at(P.ad.lo, P.ah.lo, P.aw.lo) + lw * at(P.ad.lo, P.ah.lo, P.aw.hi)) +
                     lh * ((acc_t(1) - lw) * at(P.ad.lo, P.ah.hi, P.aw.lo) + lw * at(P.ad.lo, P.ah.hi, P.aw.hi));
  if (ld == acc_t(0)) return near;
  const acc_t far = (acc_t(1) - lh) * ((acc_t(1) - lw) * at(P.ad.hi, P.ah.lo, P.aw.lo) + lw * at(P.ad.hi, P.ah.lo, P.aw.hi)) +
                    lh * ((acc_t(1) - lw) * at(P.ad.hi, P.ah.hi, P.aw.lo) + lw * at(P.ad.hi, P.ah.hi, P.aw.hi));
  return (acc_t(1) - ld) * near + ld * far;
}

// Blocking of every kernel below: a block owns kThreads consecutive positions of one batch element,
// one thread per position. A thread holds a chunk of its own x column (Columns<acc_t>::value channels) in
// registers — the whole column when Cx <= Columns, loaded once — and the weight matrix passes
// through shared memory in (kRows × Columns) tiles that every thread of the block reads (the same
// address across a warp: a broadcast). Shared memory is a few KB whatever the widths, so no
// channel count is refused for lack of it. Past Columns channels a thread re-reads its column one
// chunk per row chunk (from L1/L2).
constexpr int kThreads = 128;
constexpr int kRows = 8;
// 64 floats of registers; in float64 32 (forward) / 16 (backward): 32 doubles spilled 20 B in the
// backward, 16 spilled 8 B in the forward (ptxas, sm_90)
template <typename acc_t, bool kBackward = false>
struct Columns {
  static constexpr int value = sizeof(acc_t) == 8 ? (kBackward ? 16 : 32) : 64;
};

// column[c0 .. c0 + K) of one strided column into registers (0 past Cx, or for a padding thread).
template <int K, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_column(const scalar_t* column, int64_t stride_c, int64_t c0, int64_t Cx,
                                            bool valid, acc_t (&r)[K]) {
  const scalar_t* p = column + c0 * stride_c;  // stepped, not recomputed per channel
#pragma unroll
  for (int k = 0; k < K; ++k, p += stride_c) r[k] = valid && c0 + k < Cx ? static_cast<acc_t>(*p) : acc_t(0);
}

// The (kRows × K) tile matrix[r0 .. r0 + kRows, c0 .. c0 + K) of a row-major (rows × cols) matrix
// into shared memory, 0 past its edges. Every thread of the block calls it (two barriers).
template <int K, typename acc_t>
__device__ __forceinline__ void stage_tile(const acc_t* __restrict__ matrix, int64_t rows, int64_t cols, int64_t r0,
                                           int64_t c0, acc_t* tile) {
  __syncthreads();  // the previous tile is no longer read
  for (int k = threadIdx.x; k < kRows * K; k += blockDim.x) {
    const int64_t r = r0 + k / K, c = c0 + k % K;
    tile[k] = r < rows && c < cols ? matrix[r * cols + c] : acc_t(0);
  }
  __syncthreads();
}

// a[r] += Σ_k tile[r][k]·xr[k] for the kRows rows of a staged tile.
template <int K, typename acc_t>
__device__ __forceinline__ void rows_times_column(const acc_t* tile, const acc_t (&xr)[K], acc_t (&a)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < K; ++k) sum += tile[r * K + k] * xr[k];
    a[r] += sum;
  }
}

// The pre-activations W·x of rows i0 .. i0 + kRows of W (Ci × Cx) at this thread's position: a[r].
template <int K, typename scalar_t, typename acc_t>
__device__ __forceinline__ void project_rows(const acc_t* __restrict__ weight, int64_t Ci, int64_t Cx, int64_t i0,
                                             const scalar_t* x_column, int64_t x_stride_c, bool valid,
                                             bool resident, acc_t (&xr)[K], acc_t* tile, acc_t (&a)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) a[r] = acc_t(0);
  for (int64_t c0 = 0; c0 < Cx; c0 += K) {
    stage_tile<K>(weight, Ci, Cx, i0, c0, tile);
    if (!resident) load_column<K>(x_column, x_stride_c, c0, Cx, valid, xr);
    rows_times_column<K>(tile, xr, a);
  }
}

// q = c + Σ_i w_i·relu(a_i), a = W·x + b + up(G), at this thread's position (every thread calls it).
template <int K, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t logits_at(const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                           const acc_t* __restrict__ psi, const acc_t* __restrict__ psi_bias,
                                           const acc_t* g_batch, const Dims& n, const Position<acc_t>& pos,
                                           const scalar_t* x_column, int64_t x_stride_c, bool valid, bool resident,
                                           acc_t (&xr)[K], acc_t* tile) {
  acc_t q = psi_bias[0];
  for (int64_t i0 = 0; i0 < n.Ci; i0 += kRows) {
    acc_t a[kRows];
    project_rows(weight, n.Ci, n.Cx, i0, x_column, x_stride_c, valid, resident, xr, tile, a);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + r;
      if (i < n.Ci) {
        const acc_t ai = a[r] + bias[i] + sample(g_batch + i * n.Sg, pos, n);
        q += psi[i] * (ai > acc_t(0) ? ai : acc_t(0));
      }
    }
  }
  return q;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const scalar_t* __restrict__ x, Strides xs, const acc_t* __restrict__ G,
               const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, const acc_t* __restrict__ psi,
               const acc_t* __restrict__ psi_bias, Dims n, bool double_sigmoid, scalar_t* __restrict__ out,
               Strides os, scalar_t* __restrict__ alpha_out, acc_t* __restrict__ logits) {
  constexpr int K = Columns<acc_t>::value;
  __shared__ acc_t tile[kRows * K];
  const int64_t b = blockIdx.y;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool valid = s < n.S;
  const Position<acc_t> pos = position<acc_t>(valid ? s : 0, n);
  const scalar_t* x_column = x + b * xs.b + pos.offset(xs);
  const bool resident = n.Cx <= K;  // uniform across the block
  acc_t xr[K];
  if (resident) load_column<K>(x_column, xs.c, 0, n.Cx, valid, xr);
  const acc_t q = logits_at(weight, bias, psi, psi_bias, G + b * n.Ci * n.Sg, n, pos, x_column, xs.c, valid,
                            resident, xr, tile);
  if (!valid) return;  // past the last barrier
  if (logits) {
    logits[b * n.S + s] = q;
    return;
  }
  acc_t alpha = sigmoid(q);
  if (double_sigmoid) alpha = sigmoid(alpha);
  alpha_out[b * n.S + s] = static_cast<scalar_t>(alpha);
  scalar_t* out_column = out + b * os.b + pos.offset(os);
  if (resident) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < n.Cx) out_column[k * os.c] = static_cast<scalar_t>(alpha * xr[k]);
  } else {
    for (int64_t c = 0; c < n.Cx; ++c)
      out_column[c * os.c] = static_cast<scalar_t>(alpha * static_cast<acc_t>(x_column[c * xs.c]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const scalar_t* __restrict__ x, Strides xs, const acc_t* __restrict__ G,
                const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, const acc_t* __restrict__ psi,
                const acc_t* __restrict__ psi_bias, Dims n, bool double_sigmoid, const acc_t* __restrict__ grad_q,
                const scalar_t* __restrict__ grad_out, Strides gos, const scalar_t* __restrict__ grad_alpha,
                scalar_t* __restrict__ grad_x, Strides gxs, acc_t* __restrict__ grad_a,
                acc_t* __restrict__ partials) {
  constexpr int K = Columns<acc_t, true>::value;
  __shared__ acc_t tile[kRows * K];
  __shared__ acc_t red[(kRows + 1) * kThreads];  // per-row contributions, row kRows: dq
  const int t = threadIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kThreads + t;
  const bool valid = s < n.S;
  const Position<acc_t> pos = position<acc_t>(valid ? s : 0, n);
  const scalar_t* x_column = x + b * xs.b + pos.offset(xs);
  const acc_t* g_batch = G + b * n.Ci * n.Sg;
  const bool resident = n.Cx <= K;
  acc_t xr[K];
  if (resident) load_column<K>(x_column, xs.c, 0, n.Cx, valid, xr);

  // sweep 1: dq (given, or through the sigmoid(s) from grad_out·x and grad_alpha)
  acc_t dq = acc_t(0), alpha = acc_t(0);
  if (grad_q) {
    if (valid) dq = grad_q[b * n.S + s];
  } else {
    const acc_t q = logits_at(weight, bias, psi, psi_bias, g_batch, n, pos, x_column, xs.c, valid, resident, xr,
                              tile);
    const acc_t first = sigmoid(q);
    alpha = double_sigmoid ? sigmoid(first) : first;
    acc_t d_alpha = grad_alpha && valid ? static_cast<acc_t>(grad_alpha[b * n.S + s]) : acc_t(0);
    if (grad_out && valid) {
      const scalar_t* go_column = grad_out + b * gos.b + pos.offset(gos);
      if (resident) {
#pragma unroll
        for (int k = 0; k < K; ++k)
          if (k < n.Cx) d_alpha += static_cast<acc_t>(go_column[k * gos.c]) * xr[k];
      } else {
        for (int64_t c = 0; c < n.Cx; ++c)
          d_alpha += static_cast<acc_t>(go_column[c * gos.c]) * static_cast<acc_t>(x_column[c * xs.c]);
      }
    }
    if (double_sigmoid) d_alpha *= alpha * (acc_t(1) - alpha);
    if (valid) dq = d_alpha * first * (acc_t(1) - first);
  }

  // sweep 2a: da_i = dq·w_i·[a_i > 0] into grad_a; per-block partial sums of dq·relu(a_i) and dq,
  // deterministic: row r's kThreads values summed in order by thread r
  acc_t* part = partials + (b * gridDim.x + blockIdx.x) * (n.Ci + 1);
  red[kRows * kThreads + t] = dq;
  for (int64_t i0 = 0; i0 < n.Ci; i0 += kRows) {
    acc_t a[kRows];
    project_rows(weight, n.Ci, n.Cx, i0, x_column, xs.c, valid, resident, xr, tile, a);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + r;
      acc_t contribution = acc_t(0);
      if (valid && i < n.Ci) {
        const acc_t ai = a[r] + bias[i] + sample(g_batch + i * n.Sg, pos, n);
        contribution = ai > acc_t(0) ? dq * ai : acc_t(0);
        grad_a[(b * n.Ci + i) * n.S + s] = ai > acc_t(0) ? dq * psi[i] : acc_t(0);
      }
      red[r * kThreads + t] = contribution;
    }
    __syncthreads();
    if (t < kRows && i0 + t < n.Ci) {
      acc_t sum = acc_t(0);
      for (int k = 0; k < kThreads; ++k) sum += red[t * kThreads + k];
      part[i0 + t] = sum;
    }
    // the next project_rows starts with a barrier: red is not overwritten before it is summed
  }
  __syncthreads();
  if (t == 0) {
    acc_t sum = acc_t(0);
    for (int k = 0; k < kThreads; ++k) sum += red[kRows * kThreads + k];
    part[n.Ci] = sum;
  }

  // sweep 2b: grad_x = α·grad_out + Σ_i da_i·W[i, :], a chunk of K channels at a time; this
  // thread's da_i are read back from grad_a (written above by this same thread)
  const scalar_t* go_column = grad_out && !grad_q ? grad_out + b * gos.b + pos.offset(gos) : nullptr;
  scalar_t* gx_column = grad_x + b * gxs.b + pos.offset(gxs);
  const acc_t* da_column = grad_a + b * n.Ci * n.S + (valid ? s : 0);
  for (int64_t c0 = 0; c0 < n.Cx; c0 += K) {
    acc_t gx[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t c = c0 + k;
      gx[k] = go_column && valid && c < n.Cx ? alpha * static_cast<acc_t>(go_column[c * gos.c]) : acc_t(0);
    }
    for (int64_t i0 = 0; i0 < n.Ci; i0 += kRows) {
      stage_tile<K>(weight, n.Ci, n.Cx, i0, c0, tile);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const acc_t da = valid && i0 + r < n.Ci ? da_column[(i0 + r) * n.S] : acc_t(0);
        if (da != acc_t(0)) {
#pragma unroll
          for (int k = 0; k < K; ++k) gx[k] += da * tile[r * K + k];
        }
      }
    }
    if (valid) {
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (c0 + k < n.Cx) gx_column[(c0 + k) * gxs.c] = static_cast<scalar_t>(gx[k]);
    }
  }
}


// ------------------------------------------------------------------------------------------------
// grid mode's output pass
// ------------------------------------------------------------------------------------------------

// out[o] = α·Σ_c W[o, c]·x[c] + b[o]: rows of W (Co × Cx) kRows at a time, as the gate's W·x.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
project_kernel(const scalar_t* __restrict__ x, Strides xs, const acc_t* __restrict__ weight,
               const acc_t* __restrict__ bias, const acc_t* __restrict__ alpha, Dims n, int64_t Co,
               scalar_t* __restrict__ out, Strides os) {
  constexpr int K = Columns<acc_t>::value;
  __shared__ acc_t tile[kRows * K];
  const int64_t b = blockIdx.y;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool valid = s < n.S;
  const Position<acc_t> pos = position<acc_t>(valid ? s : 0, n);
  const scalar_t* x_column = x + b * xs.b + pos.offset(xs);
  scalar_t* out_column = out + b * os.b + pos.offset(os);
  const bool resident = n.Cx <= K;
  acc_t xr[K];
  if (resident) load_column<K>(x_column, xs.c, 0, n.Cx, valid, xr);
  const acc_t a = valid ? alpha[b * n.S + s] : acc_t(0);
  for (int64_t o0 = 0; o0 < Co; o0 += kRows) {
    acc_t z[kRows];
    project_rows(weight, Co, n.Cx, o0, x_column, xs.c, valid, resident, xr, tile, z);
    if (valid) {
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (o0 + r < Co) out_column[(o0 + r) * os.c] = static_cast<scalar_t>(a * z[r] + bias[o0 + r]);
    }
  }
}

// t = Wᵀ·grad_out (K channels at a time), grad_x = α·t, ∂α = Σ_c t[c]·x[c].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
project_backward_kernel(const scalar_t* __restrict__ x, Strides xs, const acc_t* __restrict__ weight,
                        const acc_t* __restrict__ alpha, Dims n, int64_t Co, const scalar_t* __restrict__ grad_out,
                        Strides gos, scalar_t* __restrict__ grad_x, Strides gxs, acc_t* __restrict__ grad_alpha) {
  constexpr int K = Columns<acc_t>::value;
  __shared__ acc_t tile[kRows * K];
  const int64_t b = blockIdx.y;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool valid = s < n.S;
  const Position<acc_t> pos = position<acc_t>(valid ? s : 0, n);
  const scalar_t* x_column = x + b * xs.b + pos.offset(xs);
  const scalar_t* go_column = grad_out + b * gos.b + pos.offset(gos);
  scalar_t* gx_column = grad_x + b * gxs.b + pos.offset(gxs);
  const acc_t a = valid ? alpha[b * n.S + s] : acc_t(0);
  acc_t d_alpha = acc_t(0);
  for (int64_t c0 = 0; c0 < n.Cx; c0 += K) {
    acc_t v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = acc_t(0);
    for (int64_t o0 = 0; o0 < Co; o0 += kRows) {
      stage_tile<K>(weight, Co, n.Cx, o0, c0, tile);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const acc_t g = valid && o0 + r < Co ? static_cast<acc_t>(go_column[(o0 + r) * gos.c]) : acc_t(0);
#pragma unroll
        for (int k = 0; k < K; ++k) v[k] += g * tile[r * K + k];
      }
    }
    if (valid) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = c0 + k;
        if (c < n.Cx) {
          d_alpha += v[k] * static_cast<acc_t>(x_column[c * xs.c]);
          gx_column[c * gxs.c] = static_cast<scalar_t>(a * v[k]);
        }
      }
    }
  }
  if (valid) grad_alpha[b * n.S + s] = d_alpha;
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------

at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Dims dims_of(const at::Tensor& x, const at::Tensor& G) {
  const bool three_d = x.dim() == 5;
  Dims n;
  n.Cx = x.size(1);
  n.Ci = G.size(1);
  n.D = three_d ? x.size(2) : 1;
  n.H = x.size(three_d ? 3 : 2);
  n.W = x.size(three_d ? 4 : 3);
  n.Dg = three_d ? G.size(2) : 1;
  n.Hg = G.size(three_d ? 3 : 2);
  n.Wg = G.size(three_d ? 4 : 3);
  n.S = n.D * n.H * n.W;
  n.Sg = n.Dg * n.Hg * n.Wg;
  return n;
}

void check_inputs(const at::Tensor& x, const at::Tensor& G, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& psi, const at::Tensor& psi_bias) {
  TORCH_CHECK(x.is_cuda(), "attention_gate (cuda): expected CUDA tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "attention_gate (cuda): x must be (B, Cx, *S), got ", x.sizes());
  TORCH_CHECK(G.dim() == x.dim() && G.size(0) == x.size(0), "attention_gate (cuda): G must be (B, Ci, *Sg), got ",
              G.sizes());
  const auto acc = acc_dtype_of(x.scalar_type());
  for (const at::Tensor* t : {&G, &weight, &bias, &psi, &psi_bias}) {
    TORCH_CHECK(t->scalar_type() == acc, "attention_gate (cuda): G and the folded parameters must be ", acc);
    TORCH_CHECK(t->device() == x.device(), "attention_gate (cuda): all tensors on x's device");
  }
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == G.size(1) && weight.size(1) == x.size(1),
              "attention_gate (cuda): weight must be (Ci, Cx), got ", weight.sizes());
}

unsigned position_blocks(const Dims& n) { return static_cast<unsigned>((n.S + kThreads - 1) / kThreads); }

std::vector<int64_t> with_channels(const at::Tensor& x, int64_t channels) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[1] = channels;
  return shape;
}

std::vector<at::Tensor> launch_forward(const at::Tensor& x, const at::Tensor& G_in, const at::Tensor& weight_in,
                                       const at::Tensor& bias_in, const at::Tensor& psi_in,
                                       const at::Tensor& psi_bias_in, bool double_sigmoid, bool logits_only) {
  check_inputs(x, G_in, weight_in, bias_in, psi_in, psi_bias_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor G = G_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor psi = psi_in.reshape({-1}).contiguous(), psi_bias = psi_bias_in.reshape({-1}).contiguous();
  const Dims n = dims_of(x, G);
  const auto acc = acc_dtype_of(x.scalar_type());
  at::Tensor out, alpha, logits;
  if (logits_only) {
    logits = at::empty(with_channels(x, 1), x.options().dtype(acc));
  } else {
    out = at::empty_like(x);
    alpha = at::empty(with_channels(x, 1), x.options());
  }
  if (n.S == 0 || x.size(0) == 0) return logits_only ? std::vector<at::Tensor>{logits} : std::vector<at::Tensor>{out, alpha};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_cuda_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const dim3 grid(position_blocks(n), static_cast<unsigned>(x.size(0)));
    forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), strides_of(x), G.data_ptr<acc_t>(), weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
        psi.data_ptr<acc_t>(), psi_bias.data_ptr<acc_t>(), n, double_sigmoid,
        logits_only ? nullptr : out.data_ptr<scalar_t>(), logits_only ? strides_of(x) : strides_of(out),
        logits_only ? nullptr : alpha.data_ptr<scalar_t>(), logits_only ? logits.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return logits_only ? std::vector<at::Tensor>{logits} : std::vector<at::Tensor>{out, alpha};
}

std::vector<at::Tensor> gate_forward(const at::Tensor& x, const at::Tensor& G, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& psi, const at::Tensor& psi_bias,
                                     bool double_sigmoid) {
  return launch_forward(x, G, weight, bias, psi, psi_bias, double_sigmoid, false);
}

at::Tensor gate_logits(const at::Tensor& x, const at::Tensor& G, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& psi, const at::Tensor& psi_bias) {
  return launch_forward(x, G, weight, bias, psi, psi_bias, false, true)[0];
}

std::vector<at::Tensor> gate_backward(const at::Tensor& x, const at::Tensor& G_in, const at::Tensor& weight_in,
                                      const at::Tensor& bias_in, const at::Tensor& psi_in,
                                      const at::Tensor& psi_bias_in, const c10::optional<at::Tensor>& grad_q,
                                      const c10::optional<at::Tensor>& grad_out,
                                      const c10::optional<at::Tensor>& grad_alpha, bool double_sigmoid) {
  check_inputs(x, G_in, weight_in, bias_in, psi_in, psi_bias_in);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad_q.has_value() != (grad_out.has_value() || grad_alpha.has_value()),
              "attention_gate (cuda): give grad_q (logits pass) or grad_out/grad_alpha (output pass)");
  const at::Tensor G = G_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor psi = psi_in.reshape({-1}).contiguous(), psi_bias = psi_bias_in.reshape({-1}).contiguous();
  const Dims n = dims_of(x, G);
  const auto acc = acc_dtype_of(x.scalar_type());
  at::Tensor gq, go, ga_in;
  if (grad_q.has_value()) gq = grad_q->to(acc).contiguous();
  if (grad_out.has_value()) {
    go = *grad_out;
    TORCH_CHECK(go.sizes() == x.sizes() && go.scalar_type() == x.scalar_type(), "attention_gate (cuda): grad_out must match x");
  }
  if (grad_alpha.has_value()) ga_in = grad_alpha->to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_a = at::empty(with_channels(x, n.Ci), x.options().dtype(acc));
  at::Tensor grad_psi = at::zeros({n.Ci}, x.options().dtype(acc));
  at::Tensor grad_psi_bias = at::zeros({1}, x.options().dtype(acc));
  if (n.S == 0 || x.size(0) == 0) return {grad_x, grad_a, grad_psi, grad_psi_bias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_cuda_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const unsigned blocks = position_blocks(n);
    at::Tensor partials = at::empty({x.size(0) * static_cast<int64_t>(blocks), n.Ci + 1}, x.options().dtype(acc));
    const dim3 grid(blocks, static_cast<unsigned>(x.size(0)));
    backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), strides_of(x), G.data_ptr<acc_t>(), weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
        psi.data_ptr<acc_t>(), psi_bias.data_ptr<acc_t>(), n, double_sigmoid,
        gq.defined() ? gq.data_ptr<acc_t>() : nullptr, go.defined() ? go.data_ptr<scalar_t>() : nullptr,
        go.defined() ? strides_of(go) : strides_of(x), ga_in.defined() ? ga_in.data_ptr<scalar_t>() : nullptr,
        grad_x.data_ptr<scalar_t>(), strides_of(grad_x), grad_a.data_ptr<acc_t>(), partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // a plain (atomic-free) column sum over the blocks: deterministic
    const at::Tensor sums = partials.sum(0);
    grad_psi = sums.narrow(0, 0, n.Ci).clone();
    grad_psi_bias = sums.narrow(0, n.Ci, 1).clone();
  });
  return {grad_x, grad_a, grad_psi, grad_psi_bias};
}

void check_projection(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& weight) {
  TORCH_CHECK(x.is_cuda(), "attention_gate project (cuda): expected CUDA tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "attention_gate project (cuda): x must be (B, Cx, *S), got ", x.sizes());
  const auto acc = acc_dtype_of(x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == acc &&
                  weight.device() == x.device(),
              "attention_gate project (cuda): weight must be (Co, Cx) of dtype ", acc, " on x's device, got ",
              weight.sizes());
  TORCH_CHECK(alpha.sizes() == at::IntArrayRef(with_channels(x, 1)) && alpha.scalar_type() == acc &&
                  alpha.device() == x.device(),
              "attention_gate project (cuda): alpha must be (B, 1, *S) of dtype ", acc, ", got ", alpha.sizes());
}

Dims projection_dims(const at::Tensor& x) {
  Dims n = dims_of(x, x);
  n.Ci = 0, n.Dg = n.Hg = n.Wg = n.Sg = 1;
  return n;
}

at::Tensor gate_project(const at::Tensor& x, const at::Tensor& alpha_in, const at::Tensor& weight_in,
                        const c10::optional<at::Tensor>& bias_in) {
  check_projection(x, alpha_in, weight_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor alpha = alpha_in.contiguous(), weight = weight_in.contiguous();
  const int64_t Co = weight.size(0);
  const at::Tensor bias = bias_in.has_value() ? bias_in->reshape({Co}).contiguous() : at::zeros({Co}, weight.options());
  TORCH_CHECK(bias.scalar_type() == weight.scalar_type(), "attention_gate project (cuda): bias must match weight");
  const Dims n = projection_dims(x);
  at::Tensor out = Co == n.Cx ? at::empty_like(x) : at::empty(with_channels(x, Co), x.options());
  if (n.S == 0 || x.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_cuda_project", [&] {
    using acc_t = acc_type<scalar_t>;
    const dim3 grid(position_blocks(n), static_cast<unsigned>(x.size(0)));
    project_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), strides_of(x), weight.data_ptr<acc_t>(), bias.data_ptr<acc_t>(),
        alpha.data_ptr<acc_t>(), n, Co, out.data_ptr<scalar_t>(), strides_of(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> gate_project_backward(const at::Tensor& x, const at::Tensor& alpha_in,
                                              const at::Tensor& weight_in, const at::Tensor& grad_out) {
  check_projection(x, alpha_in, weight_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor alpha = alpha_in.contiguous(), weight = weight_in.contiguous();
  const int64_t Co = weight.size(0);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(with_channels(x, Co)) && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.device() == x.device(),
              "attention_gate project (cuda): grad_out must be (B, Co, *S) of x's dtype, got ", grad_out.sizes());
  const Dims n = projection_dims(x);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_alpha = at::empty(with_channels(x, 1), x.options().dtype(acc_dtype_of(x.scalar_type())));
  if (n.S == 0 || x.size(0) == 0) return {grad_x, grad_alpha};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_gate_cuda_project_backward",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    const dim3 grid(position_blocks(n), static_cast<unsigned>(x.size(0)));
    project_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), strides_of(x), weight.data_ptr<acc_t>(), alpha.data_ptr<acc_t>(), n, Co,
        grad_out.data_ptr<scalar_t>(), strides_of(grad_out), grad_x.data_ptr<scalar_t>(), strides_of(grad_x),
        grad_alpha.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_alpha};
}

}  // namespace
}  // namespace attention_gate_cuda
}  // namespace medattn

namespace agc = medattn::attention_gate_cuda;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused Attention U-Net gate (additive and grid forms), CUDA kernels";
  m.def("gate_forward", &agc::gate_forward, "out, alpha = fused gate (folded parameters)");
  m.def("gate_logits", &agc::gate_logits, "q = w·relu(W·x + b + up(G)) + c, (B, 1, *S)");
  m.def("gate_backward", &agc::gate_backward, "grad_x, grad_a, grad_psi, grad_psi_bias");
  m.def("gate_project", &agc::gate_project, "out = alpha·(W·x) + b per position (grid mode's output conv)");
  m.def("gate_project_backward", &agc::gate_project_backward, "grad_x, grad_alpha of gate_project");
}
