"""dynconvert: turn the convolutions of any PyTorch or timm model into dynamic convolutions.

Pipeline, one subpackage per stage::

    engine/    how a dynamic conv is computed fast: strategies, autotune, lean backward
    layers/    DynamicConv1d/2d/3d (Chen et al., CVPR 2020)
    convert/   select the convs of a model (torch.fx) and swap them in place
    report     what was replaced, as a rich table or JSON
    finetune/  train the converted model
    io         save/load files that torch.load(weights_only=True) reads
    export/    torch.export, ONNX and TorchScript with a dynamic batch
    cli/       the `dynconvert` command, a thin shell over the above
"""

from importlib import import_module
from typing import Any

from .errors import DynconvertError
from .layers import DynamicConv1d, DynamicConv2d, DynamicConv3d, DynamicConvNd

__version__ = "0.1.0"

#: The stages of the package in pipeline order. A module imports from its own stage and from
#: earlier ones only, never from a later or a sibling stage (``tests/test_architecture.py``
#: checks every import statement). docs/architecture.md explains each stage.
PIPELINE: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("ranks", "modes", "interrupts", "option_fields", "callable_module", "zoo"),
    ("files",),
    ("engine",),
    ("layers",),
    ("report",),
    ("convert",),
    ("sources",),
    ("io",),
    ("finetune", "export"),
    ("recipes", "benchmark"),
    ("model_request",),
    ("cli",),
    ("__main__",),
)

# The later stages pull in timm, rich, onnx...; import them when first used.
_LAZY = {
    "convert": "dynconvert.convert",
    "ConvertConfig": "dynconvert.convert",
    "ConversionReport": "dynconvert.report",
    "save": "dynconvert.io",
    "load": "dynconvert.io",
    "finetune": "dynconvert.finetune",
    "export": "dynconvert.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynconvert' has no attribute {name!r}")


__all__ = [
    "ConversionReport",
    "ConvertConfig",
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "DynamicConvNd",
    "DynconvertError",
    "__version__",
    "convert",
    "export",
    "finetune",
    "load",
    "save",
]
