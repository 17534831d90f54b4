// pybind11 bindings of the tilecl CUDA kernels, without libtorch.
//
// Tensors cross as integers (tensor.data_ptr()), with their shapes and row strides, a dtype code
// (0 float32, 1 float16, 2 bfloat16) and the stream handle
// (torch.cuda.current_stream().cuda_stream): one build works with any torch version. The group
// masking arrays (row_groups, col_groups, kept_cols) are addresses too, 0 for none. The Python
// side (tilecl.backends.cuda) validates every argument before calling in here. A gradient sweep
// takes a SweepArgs (the operands, masking, outputs and stream, the same for every form) and its
// form's own arguments: one binding per form.
//
// Built twice from this one file: as tilecl._cuda against the nvcc-compiled kernels, and (with
// TILECL_EMU) as the CPU emulation module, whose launches must keep the GIL (the emulated
// shared memory and scheduler are process-global).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "tilecl_cuda.h"

#ifdef TILECL_EMU
#include "cuda_emu.h"  // set_schedule()
#endif

#ifndef TILECL_MODULE_NAME
#define TILECL_MODULE_NAME _cuda
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

tilecl::DType dtype_of(int code) {
  if (code < tilecl::kFloat32 || code > tilecl::kBFloat16)
    throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<tilecl::DType>(code);
}

int as_int(int64_t value, const char* name) {
  if (value < 0 || value > INT32_MAX) throw std::invalid_argument(std::string(name) + " must be in [0, 2^31)");
  return static_cast<int>(value);
}

// The group mask's three pointers (0: no masking), in the arguments of any launch.
template <class Args>
void set_group_mask(Args& args, std::uintptr_t row_groups, std::uintptr_t col_groups, std::uintptr_t kept_cols) {
  args.row_groups = ptr<const int64_t>(row_groups);
  args.col_groups = ptr<const int64_t>(col_groups);
  args.kept_cols = ptr<const int64_t>(kept_cols);
}

// The sweep of any form on the dtype's kernels.
template <class Form>
void run_sweep(int dtype, const tilecl::SweepArgs& args, const Form& form) {
  switch (dtype_of(dtype)) {
    case tilecl::kFloat32: return tilecl::gradient_sweep<tilecl::kFloat32>(args, form);
    case tilecl::kFloat16: return tilecl::gradient_sweep<tilecl::kFloat16>(args, form);
    case tilecl::kBFloat16: return tilecl::gradient_sweep<tilecl::kBFloat16>(args, form);
  }
}

void lse_stats(int dtype, std::uintptr_t a, std::uintptr_t b, std::uintptr_t targets, std::uintptr_t row_lse,
               std::uintptr_t col_lse, std::uintptr_t positive, float scale, int64_t n, int64_t m, int64_t d,
               int64_t lda, int64_t ldb, int64_t col_count, bool exclude_diagonal, std::uintptr_t row_groups,
               std::uintptr_t col_groups, std::uintptr_t kept_cols, std::uintptr_t workspace, int64_t parts,
               std::uintptr_t row_lse_low, std::uintptr_t col_lse_low, std::uintptr_t stream) {
  tilecl::LseArgs args{ptr<const void>(a), ptr<const void>(b), ptr<const int64_t>(targets), ptr<float>(row_lse),
                       ptr<float>(col_lse), ptr<float>(positive), scale, as_int(n, "n"), as_int(m, "m"),
                       as_int(d, "d"), as_int(col_count, "col_count"), lda, ldb, exclude_diagonal,
                       ptr<void>(stream)};
  set_group_mask(args, row_groups, col_groups, kept_cols);
  args.workspace = ptr<float>(workspace);
  args.parts = as_int(parts, "parts");
  args.row_lse_low = ptr<float>(row_lse_low);
  args.col_lse_low = ptr<float>(col_lse_low);
  switch (dtype_of(dtype)) {
    case tilecl::kFloat32: return tilecl::lse_stats_float(args);
    case tilecl::kFloat16: return tilecl::lse_stats_half(args);
    case tilecl::kBFloat16: return tilecl::lse_stats_bf16(args);
  }
}

// The arguments every sweep takes (tilecl.SweepArgs on the Python side); each form's binding adds its own.
tilecl::SweepArgs sweep_args(std::uintptr_t a, std::uintptr_t b, float scale, int64_t n, int64_t m, int64_t d,
                             int64_t lda, int64_t ldb, bool exclude_diagonal, std::uintptr_t row_groups,
                             std::uintptr_t col_groups, std::uintptr_t kept_cols, std::uintptr_t grad_a,
                             std::uintptr_t grad_b, std::uintptr_t grad_scale, std::uintptr_t workspace,
                             std::uintptr_t stream) {
  tilecl::SweepArgs args{ptr<const void>(a), ptr<const void>(b), ptr<float>(grad_a), ptr<float>(grad_b),
                         ptr<float>(grad_scale), ptr<float>(workspace), scale, as_int(n, "n"), as_int(m, "m"),
                         as_int(d, "d"), lda, ldb, exclude_diagonal, ptr<void>(stream)};
  set_group_mask(args, row_groups, col_groups, kept_cols);
  return args;
}

// Each form's arguments as an object (tilecl.OffsetForm, tilecl.SigmoidForm on the Python side): the
// one sweep binding below takes any of them, so a new form adds a class here, not a binding.
tilecl::OffsetForm offset_form(std::uintptr_t row_offset, std::uintptr_t row_mult, std::uintptr_t col_offset,
                               std::uintptr_t col_mult, int64_t col_count, std::uintptr_t positive_cols,
                               std::uintptr_t positive_mult) {
  return tilecl::OffsetForm{ptr<const float>(row_offset),   ptr<const float>(row_mult),
                            ptr<const float>(col_offset),   ptr<const float>(col_mult),
                            as_int(col_count, "col_count"), ptr<const int64_t>(positive_cols),
                            ptr<const float>(positive_mult)};
}

tilecl::SigmoidForm sigmoid_form(float bias, std::uintptr_t row_keys, std::uintptr_t col_keys,
                                 std::uintptr_t row_weights, std::uintptr_t row_loss, std::uintptr_t grad_bias,
                                 bool with_grads) {
  return tilecl::SigmoidForm{bias,
                             ptr<const int64_t>(row_keys),
                             ptr<const int64_t>(col_keys),
                             ptr<const float>(row_weights),
                             ptr<float>(row_loss),
                             ptr<float>(grad_bias),
                             with_grads};
}

int64_t lse_workspace_floats(int dtype, int64_t n, int64_t m, int64_t col_count, int64_t parts) {
  const int n32 = as_int(n, "n"), m32 = as_int(m, "m"), count = as_int(col_count, "col_count");
  const int parts32 = as_int(parts, "parts");
  switch (dtype_of(dtype)) {
    case tilecl::kFloat32: return tilecl::lse_workspace_floats_float(n32, m32, count, parts32);
    case tilecl::kFloat16: return tilecl::lse_workspace_floats_half(n32, m32, count, parts32);
    case tilecl::kBFloat16: return tilecl::lse_workspace_floats_bf16(n32, m32, count, parts32);
  }
  return 0;
}

int64_t workspace_floats(int dtype, int64_t n, int64_t d) {
  switch (dtype_of(dtype)) {
    case tilecl::kFloat32: return tilecl::backward_workspace_floats_float(as_int(n, "n"), as_int(d, "d"));
    case tilecl::kFloat16: return tilecl::backward_workspace_floats_half(as_int(n, "n"), as_int(d, "d"));
    case tilecl::kBFloat16: return tilecl::backward_workspace_floats_bf16(as_int(n, "n"), as_int(d, "d"));
  }
  return 0;
}

}  // namespace

#ifdef TILECL_EMU
void register_emu_selftest(py::module_& module);  // emu_selftest.cpp
#ifdef TILECL_EMU_NO_TENSOR_CORES
#define TILECL_TENSOR_CORES_EMULATED 0
#else
#define TILECL_TENSOR_CORES_EMULATED 1
#endif
#endif

PYBIND11_MODULE(TILECL_MODULE_NAME, module) {
  module.doc() = "tilecl CUDA kernels: streaming-LSE statistics and the gradient sweep (raw pointers)";
#ifdef TILECL_EMU
  using launch_guard = py::call_guard<>;
  module.attr("EMULATED") = true;
  module.attr("TENSOR_CORES") = bool(TILECL_TENSOR_CORES_EMULATED);
  module.def("set_schedule", &tilecl_emu::set_schedule, py::arg("order"), py::arg("seed") = 0,
             "Order in which the fibers of a block run between synchronization points: 'forward' (thread 0 "
             "first), 'reverse' (the last thread first) or 'shuffled' (a permutation per round, seeded).");
  module.def("get_schedule", [] { return py::make_tuple(tilecl_emu::schedule_name(), tilecl_emu::g_seed); });
  register_emu_selftest(module);
#else
  // a launch is asynchronous, but argument checks and the launch itself need no Python state
  using launch_guard = py::call_guard<py::gil_scoped_release>;
  module.attr("EMULATED") = false;
#endif
#ifdef TILECL_BUILT_ARCHS
  // the compute capabilities compiled in, e.g. "80,90" (SASS for each, PTX of the last)
  module.attr("ARCHS") = TILECL_BUILT_ARCHS;
#endif
  module.def("lse_stats", &lse_stats, launch_guard(), py::arg("dtype"), py::arg("a"), py::arg("b"),
             py::arg("targets"), py::arg("row_lse"), py::arg("col_lse"), py::arg("positive"), py::arg("scale"),
             py::arg("n"), py::arg("m"), py::arg("d"), py::arg("lda"), py::arg("ldb"), py::arg("col_count"),
             py::arg("exclude_diagonal"), py::arg("row_groups"), py::arg("col_groups"), py::arg("kept_cols"),
             py::arg("workspace"), py::arg("parts"), py::arg("row_lse_low"), py::arg("col_lse_low"),
             py::arg("stream"),
             "Row LSE (n), column LSE (col_count), positive logits (n) of S = scale·a·bᵀ and what rounding "
             "each LSE left out (n, col_count), float32 outputs.");
  module.def("lse_workspace_floats", &lse_workspace_floats, py::arg("dtype"), py::arg("n"), py::arg("m"),
             py::arg("col_count"), py::arg("parts"),
             "Floats of scratch the statistics need (their partials), S cut into at most parts² blocks.");
  // module-local: the emulation's two modules (tensor cores, FMA) live in one process
  py::class_<tilecl::SweepArgs>(module, "SweepArgs", py::module_local(),
                                "What every gradient sweep takes: the operands of S, its masking, outputs and stream.")
      .def(py::init(&sweep_args), py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("n"), py::arg("m"),
           py::arg("d"), py::arg("lda"), py::arg("ldb"), py::arg("exclude_diagonal"), py::arg("row_groups"),
           py::arg("col_groups"), py::arg("kept_cols"), py::arg("grad_a"), py::arg("grad_b"), py::arg("grad_scale"),
           py::arg("workspace"), py::arg("stream"));
  py::class_<tilecl::OffsetForm>(module, "OffsetForm", py::module_local(),
                                 "The offset form's arguments: G = g·exp(S − c) + h·exp(S − r) − p·onehot(t).")
      .def(py::init(&offset_form), py::arg("row_offset"), py::arg("row_mult"), py::arg("col_offset"),
           py::arg("col_mult"), py::arg("col_count"), py::arg("positive_cols"), py::arg("positive_mult"));
  py::class_<tilecl::SigmoidForm>(module, "SigmoidForm", py::module_local(),
                                  "The sigmoid form's arguments: G = w·(σ(S + bias) − [z = +1]), its row losses.")
      .def(py::init(&sigmoid_form), py::arg("bias"), py::arg("row_keys"), py::arg("col_keys"), py::arg("row_weights"),
           py::arg("row_loss"), py::arg("grad_bias"), py::arg("with_grads"));
  // one binding for the sweep, whatever the form (an overload per form's argument class)
  module.def("sweep", &run_sweep<tilecl::OffsetForm>, launch_guard(), py::arg("dtype"), py::arg("sweep"),
             py::arg("form"),
             "The gradient sweep in the form's epilogue: grad_a = scale·G·b, grad_b = scale·Gᵀ·a, grad_scale = "
             "Σ G_ij a_i·b_j (SweepArgs' outputs), plus the form's own (float32).");
  module.def("sweep", &run_sweep<tilecl::SigmoidForm>, launch_guard(), py::arg("dtype"), py::arg("sweep"),
             py::arg("form"));
  module.def("workspace_floats", &workspace_floats, py::arg("dtype"), py::arg("n"), py::arg("d"),
             "Floats of scratch a gradient sweep needs (SweepArgs.workspace).");
}
