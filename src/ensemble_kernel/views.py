"""Deprecated: this module moved to `ensemble_kernel.report._views`.

Import the names from `ensemble_kernel` or `ensemble_kernel.report` instead; this alias
goes in the next release.
"""

import sys
import warnings

from .report import _views as _moved

warnings.warn("ensemble_kernel.views moved to ensemble_kernel.report._views: import from "
              "ensemble_kernel.report instead", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
