// bpp::cpu_gemm_library() -> "onednn" or "mm": which library the CPU ops' GEMMs use right now
// (BPP_CPU_GEMM and the CPU decide; see gemm.h). For backend reports and benchmarks.
#include <torch/library.h>

#include "gemm.h"

#include <string>

namespace bpp {
std::string cpu_gemm_library() { return use_onednn() ? "onednn" : "mm"; }
}  // namespace bpp

TORCH_LIBRARY_FRAGMENT(bpp, m) {
  m.def("cpu_gemm_library() -> str", &bpp::cpu_gemm_library);
}
