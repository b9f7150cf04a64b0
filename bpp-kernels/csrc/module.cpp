// Makes bpp_kernels._C an importable Python module; importing it runs the static
// TORCH_LIBRARY registrations of every op under csrc/ops (torch.ops.bpp.*).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
