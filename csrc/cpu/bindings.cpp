// The one Python module of the CPU extension (medattn_cpu). Add a line per op family.
#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "medattn_fast C++ CPU kernels";
  register_gaussian_axial(m);
}
