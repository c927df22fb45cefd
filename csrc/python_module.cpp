// The Python module fpet_kernels._C. Importing it runs the static registrations of register.cpp; the ops are then
// reached through torch.ops.fpet. No Python bindings of its own (the ops need none), so no pybind11.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
