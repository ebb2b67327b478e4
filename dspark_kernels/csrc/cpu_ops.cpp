// Python bindings of the CPU kernels (built by kernels/cpu_ops.py with torch.utils.cpp_extension).
#include <torch/extension.h>

#include "decoder_stack.h"
#include "gguf_matmul.h"
#include "gguf_q8.h"
#include "layer_ops.h"
#include "paged_attention.h"

namespace {

std::string isa() {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AMX_INT8__)
  return "avx512amx";
#elif defined(__AVX512F__) && defined(__AVX512VNNI__)
  return "avx512vnni";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &dspark::paged_attention, "paged decode/verify attention (in place)");
  m.def("gguf_matmul", &dspark::gguf_matmul, "few-row matmul on GGUF block weights");
  m.def("gguf_matmul_q8", &dspark::gguf_matmul_q8,
        "few-row matmul on repacked Q4_0/Q4_1/Q8_0 weights with Q8-quantised activations");
  m.def("q8_amx_available", &dspark::q8_amx_available,
        "whether gguf_matmul_q8 can use the AMX tile unit here");
  m.def("q8_amx_min_rows", &dspark::q8_amx_min_rows,
        "rows from which gguf_matmul_q8 uses AMX on Q8_0 (all formats when all_formats; "
        "rows < 0 reads, 0 turns it off)",
        py::arg("rows"), py::arg("all_formats") = false);
  m.def("gguf_repack_q8", &dspark::gguf_repack_q8,
        "GGUF Q4_0/Q4_1/Q8_0 rows -> the layout gguf_matmul_q8 reads");
  m.def("gguf_dequantize", &dspark::gguf_dequantize, "dequantise GGUF block rows to float32");
  m.def("rms_norm", &dspark::rms_norm, "RMSNorm of each row times a weight");
  m.def("qkv_rope_store", &dspark::qkv_rope_store,
        "split q/k/v, q/k norm, rotary embedding, k/v written to pool slots; returns q");
  m.def("silu_mul", &dspark::silu_mul, "silu(gate) * up of a fused [gate | up] row");
  m.def("markov_greedy_chain", &dspark::markov_greedy_chain,
        "greedy DSpark chain with a vanilla Markov head on Q8 blocks (token ids [bs, k])");
  m.def("draft_context_update", &dspark::draft_context_update,
        "DSpark drafter context update: fc + norm, per layer k/v + k norm + rotary + store");
  py::class_<dspark::DecoderStack>(m, "DecoderStack")
      .def(py::init<>())
      .def("add_layer", &dspark::DecoderStack::add_layer)
      .def("num_layers", &dspark::DecoderStack::num_layers)
      .def("set_profile", &dspark::DecoderStack::set_profile)
      .def("take_times", &dspark::DecoderStack::take_times)
      .def("forward", &dspark::DecoderStack::forward);
  m.def("isa", &isa, "instruction set the extension was compiled for");
}
