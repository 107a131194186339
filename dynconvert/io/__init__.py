"""Save and load converted models as one file that ``torch.load(weights_only=True)`` reads.

The file is a dict of plain data and tensors; no module is ever pickled::

    format    "dynconvert"            version   1 (a newer version is refused)
    source    {"kind": "timm", "name": "resnet50", "kwargs": {...}}
              or {"kind": "custom", "class": "pkg.mod.Net"} (shown, never imported); both
              checked before anything is built (:mod:`dynconvert.sources.records`)
    config    ConvertConfig.to_dict() of the conversion
    converted qualified names of the converted modules (what ``swap_named`` takes)
    strategies  {name: strategy} of converted layers whose strategy differs from the option
    architecture  [name, class, geometry] per module; ``load`` compares the rebuilt model
              with it, so a timm model created with other arguments (``output_stride``,
              ``global_pool``: same weight shapes, another function) is refused, not guessed
    state_dict, dtype, versions {"torch", "timm", "dynconvert"}
    report    ConversionReport.to_dict(), shown by ``dynconvert inspect FILE``

Where ``save`` learns the conversion (``convert`` does not record it on the model):

1. ``report=`` (the report that :func:`dynconvert.convert` returned): its options, converted
   names and table are stored as they are. The CLI always passes it.
2. Otherwise what :func:`load` recorded on the model it rebuilt (attribute ``CONVERSION_ATTR``),
   so a loaded, fine-tuned model saves again with its original options and report.
3. Otherwise it is read off the model: every ``DynamicConvNd`` is a converted module, and
   ``k``, the router ``ratio`` (from the router's width), ``temperature`` and ``strategy``
   come from the layers, which must agree. The other options only steer *which* convs are
   converted, so the defaults are recorded and ``config_inferred`` is set. The stored report
   then lists the converted layers only (static convs and MACs are unknown).

``config=`` overrides the options in every case. The source is recorded by
:func:`dynconvert.sources.model_source`: exact for models built by ``dynconvert`` (CLI,
:func:`load`), from ``pretrained_cfg`` for other timm models, else ``custom``.

``load`` reads with ``weights_only=True`` only (a pickle that would run code is refused, not
run), checks the marker and version, rebuilds timm models by name (``pretrained=False``) or
takes the caller's ``model=``, swaps the saved names with the saved options and loads the
state dict strictly. Writes go to a temporary file in the target folder, renamed into place.

Modules: ``files`` (output checks, atomic write, weights-only read), ``outputs`` (a
command's outputs checked against its inputs and each other), ``conversion`` (what is
recorded about the conversion), ``saved_model`` (``save``, ``read``, ``load``).
"""

from ..files import (
    atomic_output,
    atomic_torch_save,
    atomic_write_text,
    check_free_space,
    check_output_path,
    safe_torch_load,
)
from .conversion import CONVERSION_ATTR
from .outputs import check_outputs
from .saved_model import FORMAT, VERSION, load, read, save

__all__ = [
    "CONVERSION_ATTR",
    "FORMAT",
    "VERSION",
    "atomic_output",
    "atomic_torch_save",
    "atomic_write_text",
    "check_free_space",
    "check_output_path",
    "check_outputs",
    "load",
    "read",
    "safe_torch_load",
    "save",
]
