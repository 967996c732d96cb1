// Python bindings of the native CPU backend: the module eagle2_kernels._C.
// eagle2_kernels/_native.py loads it (once, on first use); each op's
// eagle2_kernels/ops/<op>/native.py wraps these into the reference's signature, and
// eagle2_kernels/ops/_library.py registers the ops as torch.ops.eagle2.*.
#include <torch/csrc/utils/pybind.h>

#include "eagle2.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native CPU kernels of the eagle2_kernels ops (see eagle2_kernels._native).";
  // c10 errors become the Python exceptions torch raises for them (ValueError, TypeError,
  // ...), with the message only (no C++ backtrace).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("tree_expand", &eagle2::tree_expand, py::arg("logits"), py::arg("parent_scores"),
        py::arg("top_k"), py::arg("draft_to_target") = py::none(),
        "-> (child_tokens [B,R,K] i64, child_scores [B,R,K] f32, next_index [B,K] i64, "
        "next_scores [B,K] f32)");
  m.def("tree_build", &eagle2::tree_build, py::arg("cand_tokens"), py::arg("cand_scores"),
        py::arg("cand_parents"), py::arg("root_tokens"), py::arg("total_tokens"),
        "-> (tokens, parents, depth, mask, error codes [B] i32)");
  m.def("tree_attention", &eagle2::tree_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("prefix_len"), py::arg("tree_mask"), py::arg("tree_len"),
        py::arg("scale") = py::none(), py::arg("window") = py::none(),
        py::arg("softcap") = py::none(), py::arg("sinks") = py::none(),
        "-> out [B,Hq,Tq,Dh] like q");
  m.def("verify_greedy", &eagle2::verify_greedy, py::arg("tokens"), py::arg("parents"),
        py::arg("target_logits"), "-> (path [B,T] i64, accept_len [B] i64, bonus [B] i64)");
  m.def("verify_sample_step", &eagle2::verify_sample_step, py::arg("tokens"),
        py::arg("parents"), py::arg("probs"), py::arg("uniforms"), py::arg("cur"),
        "-> (accepted child or -1, bonus or -1) for one sequence at node cur");
  m.def("kv_compact", &eagle2::kv_compact, py::arg("cache"), py::arg("prefix_len"),
        py::arg("path"), py::arg("accept_len"), "in place on cache [N,B,Hkv,Lmax,Dh]");
}
