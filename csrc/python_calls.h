// Eager entry points of the ops for lookahead_cuda/ops.py (python_calls.cpp says why they exist).
#pragma once

#include <pybind11/pybind11.h>

namespace lookahead {

// Adds try_lookahead_update_, try_lookahead_update_if_, try_lookahead_momentum_update_,
// try_lookahead_momentum_update_if_ and try_found_nonfinite_ to the module.
void def_python_calls(pybind11::module_& m);

}  // namespace lookahead
