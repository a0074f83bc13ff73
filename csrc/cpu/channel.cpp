// Channel attention, C++ CPU forward and backward.
//
// Math, per batch, X the (C × N) feature matrix (N = prod of the spatial dims):
//
//   E = X Xᵀ (C × C),   A = softmax_rows(σ E) with σ = −1 (negate, DANet CAM) or +1,
//   o = A X,            out = γ · (o ⊙ f) + x        (gamma, multiply = f, residual = x; optional)
//
// Backward, G = ∂L/∂o = γ f ⊙ g:
//   dγ = Σ g ⊙ o ⊙ f,   df = γ g ⊙ o,   dA = G Xᵀ,   dZ = A ⊙ (dA − rowsum(A ⊙ dA)),   dE = σ dZ,
//   dX = Aᵀ G + (dE + dEᵀ) X                                      (three GEMMs)
//
// Compared with autograd through the composite (four GEMMs in backward, a saved negated energy
// and the softmax output, separate epilogue nodes), backward saves one (C×C)·(C×N) GEMM, and the
// passes over C×N data are folded into the GEMMs: γ·A X + x is one baddbmm writing the output,
// dγ = Σ g ⊙ o = Σ (g Xᵀ) ⊙ A is a C×C sum (o is not saved unless there is a multiply), γ goes
// into the GEMMs' alpha, and for DANet's residual x the residual's gradient g seeds dx's GEMM.
//
// The three products are batched GEMMs of ATen (MKL underneath, multithreaded over the whole
// batch); E, A, o and the gradients are accumulated in float32 (float64 for float64 inputs), so
// float16/bfloat16 inputs with large |E| stay finite. The C×C softmax and its backward are the
// hand-written part: one row per task of at::parallel_for, a stable softmax (the row max of σE is
// subtracted), a vectorisable exp.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace medattn {
namespace channel {
namespace {

at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// E (rows × C, contiguous) ← softmax_rows(sign · E) in place.
template <typename T>
void softmax_rows(T* E, int64_t rows, int64_t C, T sign) {
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      T* e = E + r * C;
      T row_max = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : row_max)
      for (int64_t c = 0; c < C; ++c) row_max = std::max(row_max, sign * e[c]);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) {
        e[c] = exp_fast(sign * e[c] - row_max);
        sum += e[c];
      }
      const T inv = T(1) / sum;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) e[c] *= inv;
    }
  });
}

// dA (rows × C, contiguous) ← sign · A ⊙ (dA − rowsum(A ⊙ dA)) in place: the energy gradient.
template <typename T>
void softmax_backward_rows(const T* A, T* dA, int64_t rows, int64_t C, T sign) {
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* a = A + r * C;
      T* g = dA + r * C;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < C; ++c) dot += a[c] * g[c];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) g[c] = sign * a[c] * (g[c] - dot);
    }
  });
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "channel_attention (cpp): expected a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 3, "channel_attention (cpp): x must be (B, C, *S), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "channel_attention (cpp): x must be floating point");
}

void check_like_x(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (t.has_value())
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), "channel_attention (cpp): ", name,
                " must match x (", x.sizes(), ", ", x.scalar_type(), "), got ", t->sizes());
}

// (B, C, N) in the accumulation type: a view when x already is, else a converted copy.
at::Tensor flat_acc(const at::Tensor& x) {
  return x.reshape({x.size(0), x.size(1), -1}).to(acc_dtype_of(x.scalar_type()));
}

// (B, C, N) in the accumulation type, or `fallback` when t is absent.
at::Tensor flat_acc_or(const c10::optional<at::Tensor>& t, const at::Tensor& fallback) {
  return t.has_value() ? flat_acc(*t) : fallback;
}

// -> [out (x's shape, contiguous, x's dtype), o (B, C, N) in x's dtype or empty,
//     attention (B, C, C) float32/float64 or empty]. `residual_is_x`: the residual is x itself
// (DANet CAM's γ·o + x; `residual` is then None) — backward folds its gradient into dx.
// o is kept only when save and there is a multiply: dγ needs Σ g ⊙ f ⊙ o = Σ (G' Xᵀ) ⊙ A with
// G' = g ⊙ f, a C×C sum from the backward's own GEMM, so without f nothing of size C×N is saved
// besides x.
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                                const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& multiply,
                                bool negate, bool save, bool residual_is_x) {
  check_x(x);
  check_like_x(residual, x, "residual");
  check_like_x(multiply, x, "multiply");
  TORCH_CHECK(!(residual_is_x && residual.has_value()), "channel_attention (cpp): residual given twice");
  const int64_t B = x.size(0), C = x.size(1);
  const at::Tensor X = flat_acc(x);
  at::Tensor A = at::bmm(X, X.transpose(1, 2));  // E, then A in place
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "channel_attention_softmax", [&] {
    softmax_rows<scalar_t>(A.data_ptr<scalar_t>(), B * C, C, negate ? scalar_t(-1) : scalar_t(1));
  });
  const double g = gamma.has_value() ? gamma->item<double>() : 1.0;
  const bool has_residual = residual_is_x || residual.has_value();
  const at::Tensor res = residual_is_x ? X : (residual.has_value() ? flat_acc(*residual) : at::Tensor());
  at::Tensor out, o_saved = at::empty({0}, x.options());
  if (multiply.has_value()) {
    const at::Tensor o = at::bmm(A, X);
    const at::Tensor f = flat_acc(*multiply);
    out = has_residual ? at::addcmul(res, o, f, g) : at::mul(o, f).mul_(g);
    if (save) o_saved = o.to(x.scalar_type());
  } else if (has_residual) {
    out = at::baddbmm(res, A, X, 1.0, g);  // x + γ A X: one GEMM writing the output
  } else {
    out = at::bmm(A, X);
    if (gamma.has_value()) out.mul_(g);
  }
  out = out.view(x.sizes()).to(x.scalar_type()).contiguous();
  return {out, o_saved, save ? A : at::empty({0}, x.options().dtype(A.scalar_type()))};
}

// -> [dx (x's shape, contiguous; includes the residual's gradient when residual_is_x),
//     dγ (gamma's shape) or empty, df (x's shape) or empty]. o: see forward.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& o,
                                 const at::Tensor& attention, const c10::optional<at::Tensor>& gamma,
                                 const c10::optional<at::Tensor>& multiply, bool negate, bool need_multiply_grad,
                                 bool residual_is_x) {
  check_x(x);
  check_like_x(multiply, x, "multiply");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "channel_attention (cpp): grad_out must match x");
  const int64_t B = x.size(0), C = x.size(1);
  const at::ScalarType acc = acc_dtype_of(x.scalar_type());
  TORCH_CHECK(attention.sizes() == at::IntArrayRef({B, C, C}) && attention.scalar_type() == acc,
              "channel_attention (cpp): attention must be (B, C, C) in ", acc);
  const at::Tensor A = attention.contiguous();
  const at::Tensor X = flat_acc(x);
  const at::Tensor g = flat_acc(grad_out);
  const bool has_gamma = gamma.has_value(), has_multiply = multiply.has_value();
  const double gamma_value = has_gamma ? gamma->item<double>() : 1.0;

  at::Tensor grad_multiply = at::empty({0}, x.options());
  // G' = g ⊙ f: the gradient reaching γ·o is γ G'.
  at::Tensor G = g;
  if (has_multiply) {
    G = at::mul(g, flat_acc(*multiply));
    if (need_multiply_grad) {
      TORCH_CHECK(o.numel() == X.numel(), "channel_attention (cpp): o must be (B, C, N) with a multiply");
      grad_multiply = at::mul(g, flat_acc(o)).mul_(gamma_value).view(x.sizes()).to(x.scalar_type()).contiguous();
    }
  }
  at::Tensor M = at::bmm(G, X.transpose(1, 2));  // ∂L/∂A = γ M
  at::Tensor grad_gamma = has_gamma ? at::mul(M, A).sum().reshape(gamma->sizes()).to(gamma->scalar_type())
                                    : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "channel_attention_softmax_backward", [&] {
    const scalar_t sign = negate ? scalar_t(-1) : scalar_t(1);
    softmax_backward_rows<scalar_t>(A.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), B * C, C,
                                    sign * static_cast<scalar_t>(gamma_value));
  });
  const at::Tensor& dE = M;
  // dx = [g if the residual is x] + γ Aᵀ G' + (dE + dEᵀ) X
  at::Tensor dX = residual_is_x ? at::baddbmm(g, A.transpose(1, 2), G, 1.0, gamma_value)
                                : at::baddbmm(at::zeros({1, 1, 1}, X.options()), A.transpose(1, 2), G, 0.0,
                                              gamma_value);
  dX.baddbmm_(at::add(dE, dE.transpose(1, 2)), X);
  at::Tensor grad_x = dX.view(x.sizes()).to(x.scalar_type()).contiguous();
  return {grad_x, grad_gamma, grad_multiply};
}

}  // namespace
}  // namespace channel
}  // namespace medattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace ch = medattn::channel;
  m.def("channel_attention_forward", &ch::forward,
        "Channel attention forward -> [out, o (B, C, N) or empty, attention (B, C, C) or empty]", pybind11::arg("x"),
        pybind11::arg("gamma"), pybind11::arg("residual"), pybind11::arg("multiply"), pybind11::arg("negate"),
        pybind11::arg("save"), pybind11::arg("residual_is_x"));
  m.def("channel_attention_backward", &ch::backward,
        "Backward of channel_attention_forward -> [dx, dgamma or empty, dmultiply or empty]",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("o"), pybind11::arg("attention"),
        pybind11::arg("gamma"), pybind11::arg("multiply"), pybind11::arg("negate"),
        pybind11::arg("need_multiply_grad"), pybind11::arg("residual_is_x"));
}
