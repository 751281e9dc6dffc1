// The ops' typed dispatcher handles, for the C++ code that calls them: the autograd kernels
// (lookahead.cpp) and the Python entry points (python_calls.cpp). One per op of op_declarations.h,
// named after it (lookahead_update_op() for lookahead_update_), looked up once, at first use.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "op_declarations.h"

namespace lookahead {

#define LOOKAHEAD_DECLARE_HANDLE(name, schema, ...)                                       \
  inline const c10::TypedOperatorHandle<OpSignature<Op::name>::type>& name##op() {       \
    static const auto op = c10::Dispatcher::singleton()                                  \
                               .findSchemaOrThrow("lookahead_cuda::" #name, "")          \
                               .typed<OpSignature<Op::name>::type>();                    \
    return op;                                                                            \
  }
LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_DECLARE_HANDLE)
#undef LOOKAHEAD_DECLARE_HANDLE

}  // namespace lookahead
