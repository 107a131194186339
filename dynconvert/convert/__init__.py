"""Select the convolutions of a model (torch.fx + the module tree) and swap them in place.

``discover`` finds the convs and how they are used, ``select`` decides, ``source_layers`` (which
dynamic layer rebuilds which conv type) and ``variants`` (which router, which exact start)
build exact dynamic counterparts, ``replace`` swaps them into the module tree, ``api.convert``
ties these together and returns a :class:`~dynconvert.report.ConversionReport`.
"""

from ..callable_module import make_callable
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


make_callable(__name__, convert)
