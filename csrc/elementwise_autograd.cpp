// Autograd of the elementwise skip-adds (identity and permutation; schemas in csrc/ops.cpp),
// registered for every device at the Autograd key. In C++ rather than through
// torch.library.register_autograd because these ops are memory-bound and small ones (a
// ViT-Ti block's 16 x 197 x 192) take a tenth of a millisecond: a Python autograd layer
// costs a good part of that each way, more once other work has evicted it from the caches.
//
// Forward: the op below autograd. x is saved only when alpha needs a gradient (dalpha =
// sum(grad * x) is the only term that reads it); the permutation also saves index/inverse.
// Backward: the *_backward op with output_mask = (x needs a gradient, alpha needs one);
// dbranch = grad, handed on without a copy. dx and dalpha are not differentiable: under
// create_graph=True they carry a node that raises if a second backward reaches it (like
// Python's @once_differentiable), never a silently wrong second derivative.
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

namespace entskip {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernels of `name` below the autograd key, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Pair = std::tuple<at::Tensor, at::Tensor>;

// The backward op's (dx, dalpha), run without recording a graph. Under create_graph=True,
// where an input of the backward requires grad, the defined ones come back attached to a
// DelayedError node: differentiating them again raises.
template <typename Run>
Pair once_differentiable(std::initializer_list<at::Tensor> backward_inputs, Run&& run) {
  bool recording = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : backward_inputs) recording |= t.defined() && t.requires_grad();
  }
  Pair out;
  {
    at::NoGradGuard no_grad;
    out = run();
  }
  if (!recording) return out;
  auto& [dx, dalpha] = out;
  const auto error = std::make_shared<torch::autograd::DelayedError>(
      "entskip: the identity and permutation skip-adds are differentiable once; their backward "
      "(dx, dalpha) has no derivative",
      2);
  variable_list wrapped = (*error)({dx.defined() ? dx.detach().requires_grad_() : at::Tensor(),
                                    dalpha.defined() ? dalpha.detach().requires_grad_() : at::Tensor()});
  return {wrapped[0], wrapped[1]};
}

// (dx, dalpha) of an elementwise skip-add for the inputs that need them (x: edge 0, alpha:
// edge `alpha_edge`), from run(x_or_grad, output_mask), the backward op; both undefined when
// neither is needed. Without dalpha the op does not read x, which is then not saved: grad
// stands in for it.
template <typename Run>
Pair dx_and_dalpha(AutogradContext* ctx, size_t alpha_edge, const at::Tensor& grad, const at::Tensor& x,
                   const at::Tensor& alpha, Run&& run) {
  const bool need_x = ctx->needs_input_grad(0), need_alpha = ctx->needs_input_grad(alpha_edge);
  if (!need_x && !need_alpha) return {};
  return once_differentiable({grad, x, alpha},
                             [&] { return run(x.defined() ? x : grad, std::array<bool, 2>{need_x, need_alpha}); });
}

// Whether the optional branch, the `edge`-th tensor argument, was given (and defined) and needs a gradient
// (an absent one is no input of the graph node, so its edge must not be asked about).
bool needs_branch_grad(AutogradContext* ctx, size_t edge) {
  return ctx->saved_data["branch"].toBool() && ctx->needs_input_grad(edge);
}

struct IdentitySkipAdd : torch::autograd::Function<IdentitySkipAdd> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& alpha,
                            const c10::optional<at::Tensor>& branch) {
    static const auto fwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>(
        "entskip::identity_skip_add");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["branch"] = branch.has_value() && branch->defined();
    ctx->save_for_backward({alpha.requires_grad() ? x : at::Tensor(), alpha});
    return fwd.call(x, alpha, branch);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 2>)>(
        "entskip::identity_skip_add_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const auto run = [&](const at::Tensor& x, std::array<bool, 2> mask) { return bwd.call(grad, x, saved[1], mask); };
    auto [dx, dalpha] = dx_and_dalpha(ctx, 1, grad, saved[0], saved[1], run);
    return {dx, dalpha, needs_branch_grad(ctx, 2) ? grad : at::Tensor()};
  }
};

struct PermutationSkipAdd : torch::autograd::Function<PermutationSkipAdd> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index,
                            const at::Tensor& inverse, const at::Tensor& alpha, const c10::optional<at::Tensor>& branch,
                            bool features_first) {
    static const auto fwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const c10::optional<at::Tensor>&, bool)>("entskip::permutation_skip_add");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["branch"] = branch.has_value() && branch->defined();
    ctx->saved_data["features_first"] = features_first;
    ctx->save_for_backward({alpha.requires_grad() ? x : at::Tensor(), index, inverse, alpha});
    return fwd.call(x, index, inverse, alpha, branch, features_first);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, std::array<bool, 2>, bool)>(
        "entskip::permutation_skip_add_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const bool features_first = ctx->saved_data["features_first"].toBool();
    const auto run = [&](const at::Tensor& x, std::array<bool, 2> mask) {
      return bwd.call(grad, x, saved[1], saved[2], saved[3], mask, features_first);
    };
    auto [dx, dalpha] = dx_and_dalpha(ctx, 3, grad, saved[0], saved[3], run);
    return {dx, at::Tensor(), at::Tensor(), dalpha, needs_branch_grad(ctx, 4) ? grad : at::Tensor(), at::Tensor()};
  }
};

at::Tensor identity_skip_add(const at::Tensor& x, const at::Tensor& alpha, const c10::optional<at::Tensor>& branch) {
  return IdentitySkipAdd::apply(x, alpha, branch);
}

at::Tensor permutation_skip_add(const at::Tensor& x, const at::Tensor& index, const at::Tensor& inverse,
                                const at::Tensor& alpha, const c10::optional<at::Tensor>& branch, bool features_first) {
  return PermutationSkipAdd::apply(x, index, inverse, alpha, branch, features_first);
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, Autograd, m) {
  m.impl("identity_skip_add", &identity_skip_add);
  m.impl("permutation_skip_add", &permutation_skip_add);
}

}  // namespace entskip
