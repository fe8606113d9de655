// Internal entry points for the tests, registered on the crystal_ext._C pybind11 module by
// bindings.cpp (defined in test_entry_points.cpp).
#pragma once

#include <torch/extension.h>

namespace crystal_ext {
namespace testing {

void register_test_entry_points(pybind11::module_& m);

}  // namespace testing
}  // namespace crystal_ext
