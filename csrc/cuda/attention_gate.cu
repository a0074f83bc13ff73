// Attention U-Net gate (additive form, and grid form's output pass), fused CUDA kernels.
//
// Same contract as csrc/cpu/attention_gate.cpp (the Python side folds the normalisations and
// computes the coarse gating map G (B, Ci, *Sg) in the accumulation dtype). Per position p:
//
//   a[p] = W·x[:, p] + b + up(G)[p]    (Ci, never stored)    up: (bi|tri)linear, align_corners=False
//   q[p] = w·relu(a[p]) + c,   α[p] = σ(q[p]) (σ∘σ with double_sigmoid),   out[:, p] = α[p]·x[:, p]
//
// A block owns P consecutive positions of one batch element, one thread per position. The block
// stages its x tile (Cx × P, accumulation type) and W (Ci × Cx) in shared memory — the tile is
// read from global memory once, with coalesced loads for channels-first (positions contiguous) and
// channels_last (channels contiguous) layouts alike — and each thread then sweeps the Ci channels
// of its own `a`, one at a time, from shared memory.
//
// gate_backward recomputes a (and q) per thread; its per-thread gradient of x (Cx values) lives in
// a second shared tile, and the products dq·relu(a_i) go to a shared (Ci+1) × P buffer that Ci+1
// threads sum serially: the per-block partials are deterministic, and they are added on the host
// side in block order.
//
// Grid mode's output transform on the upsampled attention map α (B, 1, *S) (the Python side runs
// the logits pass above on θ·x and upsamples α):
//   gate_project           out[:, p] = α[p]·(W·x[:, p]) + b     (W: Co × Cx, BN folded)
//   gate_project_backward  grad_x[:, p] = α[p]·Wᵀ·grad_out[:, p],  ∂α[p] = (Wᵀ·grad_out[:, p])·x[:, p]
// Same blocking: one thread per position, the x (and grad_out) tiles and the result tile staged in
// shared memory for coalesced loads and stores; W is read through the cache (every thread of a warp
// reads the same W entry at the same time, a broadcast).
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

// One thread's position and its interpolation corners.
template <typename acc_t>
struct Position {
  int64_t s;       // flat index in S
  int64_t offset;  // d·sd + h·sh + w·sw of x
  Axis<acc_t> ad, ah, aw;
};

template <typename acc_t>
__device__ __forceinline__ Position<acc_t> position(int64_t s, const Dims& n, const Strides& xs) {
  const int64_t w = s % n.W, h = (s / n.W) % n.H, d = s / (n.W * n.H);
  return {s, d * xs.d + h * xs.h + w * xs.w, axis<acc_t>(d, n.Dg, n.D), axis<acc_t>(h, n.Hg, n.H),
          axis<acc_t>(w, n.Wg, n.W)};
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

// Cooperative load of a (Cx × P) tile of a strided (B, Cx, *S) tensor into shared memory tile[c·P + t].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const scalar_t* base, const Strides& st, const Dims& n, int64_t s0,
                                          int P, acc_t* tile) {
  const int64_t count = n.Cx * P;
  const bool channels_inner = st.c == 1;  // channels_last: consecutive threads walk channels
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t c = channels_inner ? k % n.Cx : k / P;
    const int64_t t = channels_inner ? k / n.Cx : k % P;
    const int64_t s = s0 + t;
    acc_t v = acc_t(0);
    if (s < n.S) {
      const int64_t w = s % n.W, h = (s / n.W) % n.H, d = s / (n.W * n.H);
      v = static_cast<acc_t>(base[c * st.c + d * st.d + h * st.h + w * st.w]);
    }
    tile[c * P + t] = v;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_tile(scalar_t* base, const Strides& st, const Dims& n, int64_t s0, int P,
                                           const acc_t* tile, const acc_t* scale) {
  const int64_t count = n.Cx * P;
  const bool channels_inner = st.c == 1;
  for (int64_t k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t c = channels_inner ? k % n.Cx : k / P;
    const int64_t t = channels_inner ? k / n.Cx : k % P;
    const int64_t s = s0 + t;
    if (s >= n.S) continue;
    const int64_t w = s % n.W, h = (s / n.W) % n.H, d = s / (n.W * n.H);
    const acc_t k_scale = scale ? scale[t] : acc_t(1);
    base[c * st.c + d * st.d + h * st.h + w * st.w] = static_cast<scalar_t>(k_scale * tile[c * P + t]);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t channel_pre_activation(int64_t i, int t, int P, const acc_t* x_s, const acc_t* w_s,
                                                        const acc_t* bias, const acc_t* g_batch,
                                                        const Position<acc_t>& pos, const Dims& n) {
  acc_t a = bias[i] + sample(g_batch + i * n.Sg, pos, n);
  const acc_t* w_row = w_s + i * n.Cx;
  for (int64_t c = 0; c < n.Cx; ++c) a += w_row[c] * x_s[c * P + t];
  return a;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, Strides xs, const acc_t* __restrict__ G,
                               const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                               const acc_t* __restrict__ psi, const acc_t* __restrict__ psi_bias, Dims n,
                               bool double_sigmoid, scalar_t* __restrict__ out, Strides os,
                               scalar_t* __restrict__ alpha_out, acc_t* __restrict__ logits) {
  extern __shared__ unsigned char smem_raw[];
  const int P = blockDim.x;
  acc_t* x_s = reinterpret_cast<acc_t*>(smem_raw);  // Cx × P
  acc_t* w_s = x_s + n.Cx * P;                        // Ci × Cx
  acc_t* alpha_s = w_s + n.Ci * n.Cx;                 // P
  const int64_t b = blockIdx.y;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * P;
  const int t = threadIdx.x;

  for (int64_t k = t; k < n.Ci * n.Cx; k += P) w_s[k] = weight[k];
  load_tile(x + b * xs.b, xs, n, s0, P, x_s);
  __syncthreads();

  const int64_t s = s0 + t;
  if (s < n.S) {
    const Position<acc_t> pos = position<acc_t>(s, n, xs);
    const acc_t* g_batch = G + b * n.Ci * n.Sg;
    acc_t q = psi_bias[0];
    for (int64_t i = 0; i < n.Ci; ++i) {
      const acc_t a = channel_pre_activation(i, t, P, x_s, w_s, bias, g_batch, pos, n);
      q += psi[i] * (a > acc_t(0) ? a : acc_t(0));
    }
    if (logits) {
      logits[b * n.S + s] = q;
    } else {
      acc_t a = sigmoid(q);
      if (double_sigmoid) a = sigmoid(a);
      alpha_s[t] = a;
      alpha_out[b * n.S + s] = static_cast<scalar_t>(a);
    }
  }
  if (logits) return;  // uniform across the block
  __syncthreads();
  store_tile(out + b * os.b, os, n, s0, P, x_s, alpha_s);
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ x, Strides xs, const acc_t* __restrict__ G,
                                const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                const acc_t* __restrict__ psi, const acc_t* __restrict__ psi_bias, Dims n,
                                bool double_sigmoid, const acc_t* __restrict__ grad_q,
                                const scalar_t* __restrict__ grad_out, Strides gos,
                                const scalar_t* __restrict__ grad_alpha, scalar_t* __restrict__ grad_x,
                                Strides gxs, acc_t* __restrict__ grad_a, acc_t* __restrict__ partials) {
  extern __shared__ unsigned char smem_raw[];
  const int P = blockDim.x;
  acc_t* x_s = reinterpret_cast<acc_t*>(smem_raw);  // Cx × P
  acc_t* gx_s = x_s + n.Cx * P;                       // Cx × P: grad_out, then grad_x
  acc_t* w_s = gx_s + n.Cx * P;                       // Ci × Cx
  acc_t* red_s = w_s + n.Ci * n.Cx;                   // (Ci + 1) × P
  const int64_t b = blockIdx.y;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * P;
  const int t = threadIdx.x;

  for (int64_t k = t; k < n.Ci * n.Cx; k += P) w_s[k] = weight[k];
  load_tile(x + b * xs.b, xs, n, s0, P, x_s);
  if (grad_out) {
    load_tile(grad_out + b * gos.b, gos, n, s0, P, gx_s);
  } else {
    for (int64_t k = t; k < n.Cx * P; k += P) gx_s[k] = acc_t(0);
  }
  __syncthreads();

  const int64_t s = s0 + t;
  const bool valid = s < n.S;
  const Position<acc_t> pos = position<acc_t>(valid ? s : 0, n, xs);
  const acc_t* g_batch = G + b * n.Ci * n.Sg;
  acc_t dq = acc_t(0);
  if (valid) {
    if (grad_q) {
      dq = grad_q[b * n.S + s];
    } else {
      acc_t q = psi_bias[0];
      for (int64_t i = 0; i < n.Ci; ++i) {
        const acc_t a = channel_pre_activation(i, t, P, x_s, w_s, bias, g_batch, pos, n);
        q += psi[i] * (a > acc_t(0) ? a : acc_t(0));
      }
      const acc_t first = sigmoid(q);
      const acc_t alpha = double_sigmoid ? sigmoid(first) : first;
      acc_t d_alpha = grad_alpha ? static_cast<acc_t>(grad_alpha[b * n.S + s]) : acc_t(0);
      for (int64_t c = 0; c < n.Cx; ++c) {
        d_alpha += gx_s[c * P + t] * x_s[c * P + t];
        gx_s[c * P + t] *= alpha;  // α·grad_out; only this thread touches column t
      }
      if (double_sigmoid) d_alpha *= alpha * (acc_t(1) - alpha);
      dq = d_alpha * first * (acc_t(1) - first);
    }
  }
  for (int64_t i = 0; i < n.Ci; ++i) {
    acc_t contribution = acc_t(0);
    if (valid) {
      const acc_t a = channel_pre_activation(i, t, P, x_s, w_s, bias, g_batch, pos, n);
      const acc_t da = a > acc_t(0) ? dq * psi[i] : acc_t(0);
      contribution = a > acc_t(0) ? dq * a : acc_t(0);
      grad_a[(b * n.Ci + i) * n.S + s] = da;
      if (da != acc_t(0)) {
        const acc_t* w_row = w_s + i * n.Cx;
        for (int64_t c = 0; c < n.Cx; ++c) gx_s[c * P + t] += da * w_row[c];
      }
    }
    red_s[i * P + t] = contribution;
  }
  red_s[n.Ci * P + t] = valid ? dq : acc_t(0);
  __syncthreads();
  // deterministic per-block partials: Ci + 1 threads each add one row of P values in order
  acc_t* part = partials + (b * gridDim.x + blockIdx.x) * (n.Ci + 1);
  for (int64_t r = t; r <= n.Ci; r += P) {
    acc_t sum = acc_t(0);
    for (int k = 0; k < P; ++k) sum += red_s[r * P + k];
    part[r] = sum;
  }
  store_tile(grad_x + b * gxs.b, gxs, n, s0, P, gx_s, static_cast<const acc_t*>(nullptr));
}


// ------------------------------------------------------------------------------------------------
// grid mode's output pass
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void project_kernel(const scalar_t* __restrict__ x, Strides xs, const acc_t* __restrict__ weight,
                               const acc_t* __restrict__ bias, const acc_t* __restrict__ alpha, Dims n, int64_t Co,
                               scalar_t* __restrict__ out, Strides os) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* x_s = reinterpret_cast<acc_t*>(smem_raw);  // Cx × P
  const int P = blockDim.x;
  acc_t* o_s = x_s + n.Cx * P;                        // Co × P
  const int t = threadIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * P;
  load_tile(x + b * xs.b, xs, n, s0, P, x_s);
  __syncthreads();
  const int64_t s = s0 + t;
  const acc_t a = s < n.S ? alpha[b * n.S + s] : acc_t(0);
  for (int64_t o = 0; o < Co; ++o) {
    const acc_t* w_row = weight + o * n.Cx;
    acc_t z = acc_t(0);
    for (int64_t c = 0; c < n.Cx; ++c) z += w_row[c] * x_s[c * P + t];
    o_s[o * P + t] = a * z + bias[o];
  }
  __syncthreads();
  Dims out_dims = n;
  out_dims.Cx = Co;
  store_tile(out + b * os.b, os, out_dims, s0, P, o_s, static_cast<const acc_t*>(nullptr));
}

template <typename scalar_t, typename acc_t>
__global__ void project_backward_kernel(const scalar_t* __restrict__ x, Strides xs,
                                        const acc_t* __restrict__ weight, const acc_t* __restrict__ alpha, Dims n,
                                        int64_t Co, const scalar_t* __restrict__ grad_out, Strides gos,
                                        scalar_t* __restrict__ grad_x, Strides gxs, acc_t* __restrict__ grad_alpha) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* x_s = reinterpret_cast<acc_t*>(smem_raw);  // Cx × P: x, then grad_x in place
  const int P = blockDim.x;
  acc_t* g_s = x_s + n.Cx * P;                        // Co × P
  const int t = threadIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * P;
  load_tile(x + b * xs.b, xs, n, s0, P, x_s);
  Dims go_dims = n;
  go_dims.Cx = Co;
  load_tile(grad_out + b * gos.b, gos, go_dims, s0, P, g_s);
  __syncthreads();
  const int64_t s = s0 + t;
  const acc_t a = s < n.S ? alpha[b * n.S + s] : acc_t(0);
  acc_t d_alpha = acc_t(0);
  for (int64_t c = 0; c < n.Cx; ++c) {
    acc_t v = acc_t(0);  // (Wᵀ·grad_out)[c]
    for (int64_t o = 0; o < Co; ++o) v += weight[o * n.Cx + c] * g_s[o * P + t];
    d_alpha += v * x_s[c * P + t];
    x_s[c * P + t] = a * v;  // each thread owns its column of the tile
  }
  if (s < n.S) grad_alpha[b * n.S + s] = d_alpha;
  __syncthreads();
  store_tile(grad_x + b * gxs.b, gxs, n, s0, P, x_s, static_cast<const acc_t*>(nullptr));
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

// Positions per block: the largest of 128/64/32 whose shared tiles fit (opt-in shared memory).
int pick_block(const Dims& n, size_t elem, int tiles, size_t* smem) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  for (int P : {128, 64, 32}) {
    const size_t bytes = elem * (static_cast<size_t>(tiles) * n.Cx * P + n.Ci * n.Cx + (n.Ci + 1) * P);
    if (bytes <= static_cast<size_t>(limit)) {
      *smem = bytes;
      return P;
    }
  }
  TORCH_CHECK(false, "attention_gate (cuda): Cx = ", n.Cx, ", Ci = ", n.Ci,
              " need more shared memory than this device offers");
  return 0;
}

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
    size_t smem = 0;
    const int P = pick_block(n, sizeof(acc_t), 1, &smem);
    auto kernel = forward_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>((n.S + P - 1) / P), static_cast<unsigned>(x.size(0)));
    kernel<<<grid, P, smem, c10::cuda::getCurrentCUDAStream()>>>(
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
    size_t smem = 0;
    const int P = pick_block(n, sizeof(acc_t), 2, &smem);
    const int64_t blocks = (n.S + P - 1) / P;
    at::Tensor partials = at::empty({x.size(0) * blocks, n.Ci + 1}, x.options().dtype(acc));
    auto kernel = backward_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(x.size(0)));
    kernel<<<grid, P, smem, c10::cuda::getCurrentCUDAStream()>>>(
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

// Grid mode's output pass: positions per block from the shared tiles (Cx + Co channels × P).
int pick_projection_block(int64_t channels, size_t elem, size_t* smem) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  for (int P : {128, 64, 32}) {
    const size_t bytes = elem * static_cast<size_t>(channels) * P;
    if (bytes <= static_cast<size_t>(limit)) {
      *smem = bytes;
      return P;
    }
  }
  TORCH_CHECK(false, "attention_gate project (cuda): ", channels,
              " channels (x + output) need more shared memory than this device offers");
  return 0;
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
    size_t smem = 0;
    const int P = pick_projection_block(n.Cx + Co, sizeof(acc_t), &smem);
    auto kernel = project_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>((n.S + P - 1) / P), static_cast<unsigned>(x.size(0)));
    kernel<<<grid, P, smem, c10::cuda::getCurrentCUDAStream()>>>(
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
    size_t smem = 0;
    const int P = pick_projection_block(n.Cx + Co, sizeof(acc_t), &smem);
    auto kernel = project_backward_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>((n.S + P - 1) / P), static_cast<unsigned>(x.size(0)));
    kernel<<<grid, P, smem, c10::cuda::getCurrentCUDAStream()>>>(
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
