"""Fine-tune a converted model: ``dynconvert.finetune(model, train, val=None, **options)``.

Modules, one job each: ``options`` (validated settings), ``data`` (ImageFolder checks, timm
transforms, resumable seeded sampling), ``losses`` (CE, distillation, param groups),
``schedules`` (cosine lr with warm-up, router temperature), ``loop`` (the trainer),
``checkpoint`` (atomic, resumable), ``health`` (attention entropy and kernel shares),
``distributed`` (torchrun/DDP), ``progress`` (rich), ``plot`` (matplotlib curves).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..callable_module import make_callable
from ..errors import DynconvertError
from ..ranks import warnings_on_main_only
from .loop import Trainer
from .models import load_user_model, reset_head, static_teacher, static_twin
from .options import FinetuneOptions
from .result import FinetuneResult


def finetune(model: nn.Module, train: Any, val: Any = None, **options: Any) -> FinetuneResult:
    """Train ``model`` in place on ``train`` and return a :class:`FinetuneResult`.

    ``train``/``val``: a ``Dataset``, a ``DataLoader`` (its dataset and collate_fn are used;
    sampling is replaced by the seeded, resumable, distributed sampler) or a folder: ``DIR``
    with ``train/`` and ``val/`` ImageFolders, or one ImageFolder. Folder images get timm's
    transforms for ``model`` (``resolve_data_config`` + ``create_transform``).

    ``options`` are the fields of :class:`FinetuneOptions` (all optional, validated before
    training). ``teacher=True`` distills from a frozen static copy of the model as given
    (exactly the original model for a freshly converted one). ``result.model`` is ``model``
    itself; ``result.history`` has one dict per epoch. Under ``torchrun`` the same call
    trains with DistributedDataParallel; only rank 0 writes files and prints. A ready
    :class:`FinetuneOptions` may come as ``options=`` instead of the keywords (not both).
    """
    opts = options.pop("options", None)
    if opts is None:
        opts = FinetuneOptions.from_kwargs(**options)
    elif options:
        raise DynconvertError(
            f"finetune: pass options either in options= or as keywords, not both (got options "
            f"and {', '.join(sorted(options))}); use dataclasses.replace(options, ...)",
            usage=True,
        )
    with warnings_on_main_only():
        return Trainer(model, train, val, opts).run()


__all__ = [
    "FinetuneOptions",
    "FinetuneResult",
    "finetune",
    "load_user_model",
    "reset_head",
    "static_teacher",
    "static_twin",
]


make_callable(__name__, finetune)
