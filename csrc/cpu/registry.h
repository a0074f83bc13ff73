// Each op family's C++ file defines one register_<family>(m) that adds its functions to the
// extension module; bindings.cpp owns the single PYBIND11_MODULE and calls them all.
#pragma once
#include <torch/extension.h>

void register_gaussian_axial(pybind11::module_& m);
