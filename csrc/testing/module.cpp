// gmm_allreduce._testing: the test-only ops of this folder, in a library of their own that a
// normal install does not build (setup.py builds it with GMM_TESTING=1). It links against the
// symbols of gmm_allreduce._C, which tests/conftest.py loads globally before importing it.
#include <Python.h>

extern "C" PyObject* PyInit__testing(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_testing", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
