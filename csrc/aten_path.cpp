#include "aten_path.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/where.h>

#include <numeric>
#include <utility>

namespace lookahead {

void update_with_aten(at::TensorList slow, at::TensorList fast, double alpha,
                      const std::vector<size_t>& indices) {
  // Below autograd: these are parameters being overwritten, not a differentiable computation.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (const size_t i : indices) {
    slow[i].lerp_(fast[i].to(slow[i].scalar_type()), alpha);
    fast[i].copy_(slow[i]);
  }
}

void update_if_with_aten(at::TensorList slow, at::TensorList fast, double alpha,
                         const at::Tensor& due, const std::optional<at::Tensor>& restore,
                         const std::vector<size_t>& indices) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor due_flag = due.reshape({});
  const at::Tensor lerp_flag =
      restore ? due_flag.logical_and(restore->reshape({}).logical_not()) : due_flag;
  for (const size_t i : indices) {
    const at::Tensor lerped = slow[i].lerp(fast[i].to(slow[i].scalar_type()), alpha);
    slow[i].copy_(at::where(lerp_flag, lerped, slow[i]));
    fast[i].copy_(at::where(due_flag, slow[i].to(fast[i].scalar_type()), fast[i]));
  }
}

namespace {

// (new slow, new momentum) in the math type of the slow dtype, out of place: to(math) returns
// slow and momentum themselves when they already are in it, and the gated form must leave them as
// they are. Each step is add with alpha, one multiply-add, as momentum_element's.
std::pair<at::Tensor, at::Tensor> momentum_step(const at::Tensor& slow, const at::Tensor& fast,
                                                const at::Tensor& momentum, double lr, double mu,
                                                bool nesterov) {
  const auto math = slow.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor start = slow.to(math);
  const at::Tensor pseudo_gradient = start.sub(fast.to(math));
  const at::Tensor buffer = pseudo_gradient.add(momentum.to(math), mu);
  const at::Tensor step = nesterov ? pseudo_gradient.add(buffer, mu) : buffer;
  return {start.sub(step, lr), buffer};
}

}  // namespace

void momentum_update_with_aten(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                               double lr, double mu, bool nesterov,
                               const std::vector<size_t>& indices) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (const size_t i : indices) {
    const auto [result, buffer] = momentum_step(slow[i], fast[i], momentum[i], lr, mu, nesterov);
    momentum[i].copy_(buffer);
    slow[i].copy_(result);
    fast[i].copy_(slow[i]);
  }
}

void momentum_update_if_with_aten(at::TensorList slow, at::TensorList fast, at::TensorList momentum,
                                  double lr, double mu, bool nesterov, const at::Tensor& due,
                                  const std::optional<at::Tensor>& restore,
                                  const std::vector<size_t>& indices) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor due_flag = due.reshape({});
  const at::Tensor step_flag =
      restore ? due_flag.logical_and(restore->reshape({}).logical_not()) : due_flag;
  for (const size_t i : indices) {
    const auto [result, buffer] = momentum_step(slow[i], fast[i], momentum[i], lr, mu, nesterov);
    momentum[i].copy_(at::where(step_flag, buffer, momentum[i]));
    slow[i].copy_(at::where(step_flag, result, slow[i]));
    fast[i].copy_(at::where(due_flag, slow[i].to(fast[i].scalar_type()), fast[i]));
  }
}

void found_nonfinite_with_aten(at::TensorList tensors, const at::Tensor& found,
                               const std::optional<at::Tensor>& due,
                               const std::vector<size_t>& indices) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (const size_t i : indices) {
    at::Tensor bad = at::isfinite(tensors[i]).logical_not().any();
    if (due) bad = bad.logical_and(due->reshape({}));
    found.logical_or_(bad.reshape(found.sizes()));
  }
}

std::vector<size_t> all_indices(size_t n) {
  std::vector<size_t> indices(n);
  std::iota(indices.begin(), indices.end(), size_t{0});
  return indices;
}

}  // namespace lookahead
