"""Select the convolutions of a model (torch.fx + the module tree) and swap them in place.

``discover`` finds the convs and how they are used, ``select`` decides, ``source_layers`` (which
dynamic layer rebuilds which conv type) and ``variants`` (which router, which exact start)
build exact dynamic counterparts, ``replace`` swaps them into the module tree, ``api.convert``
ties these together and returns a :class:`~dynconvert.report.ConversionReport`.
"""

import sys
import types

from .api import convert
from .config import ConvertConfig
from .replace import swap_named
from .source_layers import register_source_layer
from .variants import Variant, register_variant

__all__ = [
    "ConvertConfig",
    "Variant",
    "convert",
    "register_source_layer",
    "register_variant",
    "swap_named",
]


class _CallableModule(types.ModuleType):
    """``dynconvert.convert`` is both this subpackage and the function.

    Importing the subpackage rebinds the attribute ``dynconvert.convert`` to the module (over
    the lazily exported function), so the module itself forwards calls to :func:`convert`.
    """

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
