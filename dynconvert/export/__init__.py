"""Export converted models with a dynamic batch: torch.export (pt2), ONNX and TorchScript.

``formats`` writes and reads each format, ``verify`` compares a written file with the PyTorch
model at several batch sizes, ``fold_bn`` folds BatchNorms into the dynamic convs before
export, ``api.export`` ties them together (see :func:`export`).
"""

from ..callable_module import make_callable
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


make_callable(__name__, export)
