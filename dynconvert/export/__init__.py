"""Export converted models with a dynamic batch: torch.export (pt2), ONNX and TorchScript.

``formats`` writes and reads each format, ``verify`` compares a written file with the PyTorch
model at several batch sizes, ``fold_bn`` folds BatchNorms into the dynamic convs before
export, ``api.export`` ties them together (see :func:`export`).
"""

import sys
import types

from .api import DEFAULT_BATCH_SIZES, ExportResult, export
from .fold_bn import FoldedPair, fold_bn
from .formats import FORMATS
from .verify import TOLERANCE

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "FORMATS",
    "TOLERANCE",
    "ExportResult",
    "FoldedPair",
    "export",
    "fold_bn",
]


class _CallableModule(types.ModuleType):
    """``dynconvert.export`` is both this subpackage and the function.

    Importing the subpackage rebinds the attribute ``dynconvert.export`` to the module (over
    the lazily exported function), so the module itself forwards calls to :func:`export`.
    """

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
