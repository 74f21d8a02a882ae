"""Deprecated: this module moved to `ensemble_kernel.analysis._classifier`.

Import the names from `ensemble_kernel` or `ensemble_kernel.analysis` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .analysis import _classifier as _moved

warnings.warn("ensemble_kernel.classifier moved to ensemble_kernel.analysis._classifier: import from "
              "ensemble_kernel.analysis instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
