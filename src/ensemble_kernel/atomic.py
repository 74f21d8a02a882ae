"""Deprecated: this module moved to `ensemble_kernel._atomic`.

Import the names from `ensemble_kernel` or `ensemble_kernel.` instead; this alias
goes in the next release.
"""

import sys
import warnings

from . import _atomic as _moved

warnings.warn("ensemble_kernel.atomic moved to ensemble_kernel._atomic: import from "
              "ensemble_kernel. instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
