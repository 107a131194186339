"""Export converted models with a dynamic batch: torch.export (pt2), ONNX and TorchScript.

``formats`` writes and reads each format, ``verify`` compares a written file with the PyTorch
model at several batch sizes, ``fold_bn`` folds BatchNorms into the dynamic convs before
export, ``options`` declares the options once, ``api.export`` ties them together (see
:func:`export`).
"""

from ..callable_module import make_callable
from .api import ExportResult, export
from .fold_bn import FoldedPair, fold_bn
from .formats import FORMATS
from .options import DEFAULT_BATCH_SIZES, ExportOptions
from .verify import TOLERANCE

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "FORMATS",
    "TOLERANCE",
    "ExportOptions",
    "ExportResult",
    "FoldedPair",
    "export",
    "fold_bn",
]


make_callable(__name__, export)
