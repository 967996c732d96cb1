"""Former home of the end-to-end evaluation, now the package :mod:`eagle2_kernels.eval`.

Kept so that ``from eagle2_kernels import evaluation`` and ``eagle2_kernels.evaluation.X`` go on
working: every public name of the package, the same objects. New code imports
``eagle2_kernels.eval``.
"""

from eagle2_kernels.eval import *  # noqa: F401,F403
from eagle2_kernels.eval import __all__  # noqa: F401
