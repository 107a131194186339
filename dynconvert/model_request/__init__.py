"""The API behind the commands that take a MODEL string: build or load it, merge a recipe,
convert it (see :mod:`.request`), fine-tune it (:mod:`.finetune_plan`, :mod:`.finetune_run`).
It sits above ``sources``, ``io``, ``convert`` and ``finetune``, which it combines; the CLI
only parses and passes strings."""

from .finetune_plan import RunPlan, check_run, collect_options
from .finetune_run import finetune_model_file, has_dynamic_layers, load_model, run_finetune
from .head import reset_recorded_head
from .recipe_merge import apply_recipe
from .request import (
    CONVERSION_OPTIONS,
    ModelRequest,
    Prepared,
    convert_kwargs,
    convert_strictly,
    prepare_model,
)
from .saved import build_architecture, load_saved, refuse_saved_model_as_checkpoint

__all__ = [
    "CONVERSION_OPTIONS",
    "ModelRequest",
    "Prepared",
    "RunPlan",
    "apply_recipe",
    "build_architecture",
    "check_run",
    "collect_options",
    "convert_kwargs",
    "convert_strictly",
    "finetune_model_file",
    "has_dynamic_layers",
    "load_model",
    "load_saved",
    "prepare_model",
    "refuse_saved_model_as_checkpoint",
    "reset_recorded_head",
    "run_finetune",
]
