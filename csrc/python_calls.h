// Eager entry points of the ops for lookahead_cuda/ops.py (python_calls.cpp says why they exist).
#pragma once

#include <pybind11/pybind11.h>

namespace lookahead {

// Adds try_<op> to the module for every op of op_declarations.h (try_lookahead_update_, ...).
void def_python_calls(pybind11::module_& m);

}  // namespace lookahead
