// Instruction-set dispatch shared by the CPU kernels.
//
// Each kernel body is compiled three times — AVX-512, AVX2+FMA and the baseline — through thin
// wrappers carrying a `target` attribute, and the variant is chosen once at run time. The bodies
// must be MEDATTN_INLINE (always_inline): GCC does not otherwise inline a default-target function
// into a target-attributed wrapper, and the "AVX-512" wrapper silently runs baseline code.
#pragma once

#include <ATen/Version.h>
#include <ATen/Context.h>

#include <string>

#if defined(__GNUC__)
#define MEDATTN_INLINE inline __attribute__((always_inline))
#else
#define MEDATTN_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MEDATTN_X86_DISPATCH 1
#define MEDATTN_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define MEDATTN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MEDATTN_X86_DISPATCH 0
#endif

namespace medattn {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// ATen's choice honours ATEN_CPU_CAPABILITY (so users can force a narrower ISA); the cpuid check
// guards against a capability string the CPU does not actually have.
inline Isa runtime_isa() {
  static const Isa isa = [] {
#if MEDATTN_X86_DISPATCH
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    if (cap.find("AVX512") != std::string::npos && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if ((cap.find("AVX2") != std::string::npos || cap.find("AVX512") != std::string::npos) &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

inline std::string isa_name() {
  switch (runtime_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace medattn

// MEDATTN_ISA_VARIANTS(NAME, ARGS): for a MEDATTN_INLINE template
// `void NAME<scalar_t, acc_t>(const ARGS<scalar_t, acc_t>&, int64_t lo, int64_t hi)`, defines its
// AVX-512 / AVX2 / baseline copies and `NAME##_for(Isa)` returning the one to call.
#if MEDATTN_X86_DISPATCH
#define MEDATTN_ISA_VARIANTS(NAME, ARGS)                                                            \
  template <typename scalar_t, typename acc_t>                                                      \
  MEDATTN_TARGET_AVX512 void NAME##_avx512(const ARGS<scalar_t, acc_t>& a, int64_t lo, int64_t hi) { \
    NAME<scalar_t, acc_t>(a, lo, hi);                                                               \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t>                                                      \
  MEDATTN_TARGET_AVX2 void NAME##_avx2(const ARGS<scalar_t, acc_t>& a, int64_t lo, int64_t hi) {     \
    NAME<scalar_t, acc_t>(a, lo, hi);                                                               \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t>                                                      \
  void NAME##_baseline(const ARGS<scalar_t, acc_t>& a, int64_t lo, int64_t hi) {                    \
    NAME<scalar_t, acc_t>(a, lo, hi);                                                               \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t>                                                      \
  void (*NAME##_for(Isa isa))(const ARGS<scalar_t, acc_t>&, int64_t, int64_t) {                     \
    switch (isa) {                                                                                  \
      case Isa::kAvx512:                                                                            \
        return &NAME##_avx512<scalar_t, acc_t>;                                                     \
      case Isa::kAvx2:                                                                              \
        return &NAME##_avx2<scalar_t, acc_t>;                                                       \
      default:                                                                                      \
        return &NAME##_baseline<scalar_t, acc_t>;                                                   \
    }                                                                                               \
  }
#else
#define MEDATTN_ISA_VARIANTS(NAME, ARGS)                                                            \
  template <typename scalar_t, typename acc_t>                                                      \
  void NAME##_baseline(const ARGS<scalar_t, acc_t>& a, int64_t lo, int64_t hi) {                    \
    NAME<scalar_t, acc_t>(a, lo, hi);                                                               \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t>                                                      \
  void (*NAME##_for(Isa))(const ARGS<scalar_t, acc_t>&, int64_t, int64_t) {                         \
    return &NAME##_baseline<scalar_t, acc_t>;                                                       \
  }
#endif
