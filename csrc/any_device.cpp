// The ops on devices without a kernel of ours (and on empty lists, which name no device): the same
// validation, then ATen one tensor at a time; on meta tensors, the validation alone.
#include <torch/library.h>

#include "op_declarations.h"
#include "op_skeleton.h"

namespace lookahead {

TORCH_LIBRARY_IMPL(lookahead_cuda, CompositeExplicitAutograd, m) {
#define LOOKAHEAD_IMPL_WITH_ATEN(name, schema, ...) m.impl(#name, &OpKernels<Op::name>::aten);
  LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_IMPL_WITH_ATEN)
#undef LOOKAHEAD_IMPL_WITH_ATEN
}

TORCH_LIBRARY_IMPL(lookahead_cuda, Meta, m) {
#define LOOKAHEAD_IMPL_META(name, schema, ...) m.impl(#name, &OpKernels<Op::name>::meta);
  LOOKAHEAD_FOR_EACH_OP(LOOKAHEAD_IMPL_META)
#undef LOOKAHEAD_IMPL_META
}

}  // namespace lookahead
