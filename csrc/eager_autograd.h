// C++ autograd for the eager path of the compiled ops (issue 13, host overhead).
//
// Each op ddfast::<op>_eager is registered at the Autograd key with a torch::autograd::Function
// whose forward calls ddfast::<op>_fwd below autograd and whose backward calls ddfast::<op>_bwd,
// so an eager call builds one C++ node and the engine runs its backward without entering Python.
// torch.compile keeps calling <op>_fwd with its Python-registered autograd (the ops'
// eager_path() test in Python decides). The backward is once-differentiable: a backward
// with create_graph=True raises, naming the op, instead of returning a gradient without graph.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

namespace ddfast {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of a registered op, looked up once per process.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline void check_once_differentiable(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "ddfast.", op,
              ": its backward is not differentiable (backward with create_graph=True is not supported); "
              "call it with backend='torch' for higher-order gradients");
}

}  // namespace ddfast
