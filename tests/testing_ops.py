"""Loads the test-only ops (csrc/testing/, the library gmm_allreduce._testing) into
torch.ops.gmm_allreduce. A normal install does not build them; the Makefile's builds do
(GMM_TESTING=1). Imported by conftest.py (the pytest process) and dist_utils.py (spawned ranks).

_testing uses _C's symbols without linking to it: _C, already loaded by `import gmm_allreduce`, is
made global first (RTLD_NOLOAD only promotes the loaded library), so that the loader finds them.
"""

import ctypes
import os

import gmm_allreduce  # noqa: F401  (loads _C and the public ops)
from gmm_allreduce import _C

ctypes.CDLL(_C.__file__, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
try:
    from gmm_allreduce import _testing  # noqa: F401
except ImportError as e:
    raise ImportError("the tests need the test-only ops: build with GMM_TESTING=1 (make test does: "
                      "GMM_TESTING=1 pip install --no-build-isolation -e .)") from e
