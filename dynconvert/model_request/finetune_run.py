"""A fine-tuning run of the commands: the model loaded or built (a static one converted with
the recipe), its head reset to ``--num-classes``, the teacher of ``--distill``, then
:func:`dynconvert.finetune` and the save. The checks before any model is loaded are in
:mod:`.finetune_plan`."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .. import io
from ..convert import convert
from ..errors import DynconvertError
from ..finetune import finetune, load_user_model, static_teacher
from ..finetune.models import model_num_classes
from ..layers import DynamicConvNd
from ..ranks import is_main_process
from .finetune_plan import RunPlan, check_run
from .head import reset_recorded_head
from .saved import build_architecture, load_saved


def print_note(text: str) -> None:
    """A note on stderr, where the commands print theirs (stdout stays for results)."""
    print(text, file=sys.stderr, flush=True)


def run_finetune(
    model: nn.Module,
    flags: dict[str, Any],
    out: Path,
    *,
    original: nn.Module | None = None,
    save: bool = True,
    report: Any = None,
    plan: RunPlan | None = None,
    notify: Callable[[str], None] = print_note,
):
    """Fine-tune ``model`` with the CLI ``flags`` and save it to ``out`` (rank 0 only).

    ``original``: the static model before conversion, for the results table and as the
    teacher of ``--distill`` (default: a static copy of ``model``, exact while its routers
    are still uniform). ``plan``: :func:`check_run` of these flags, when already done.
    ``notify``: how the notes (no val/ folder, the file saved) are shown.
    """
    if plan is None:
        plan = check_run(flags, out)
    options, data = plan.options, plan.data
    head = model_num_classes(model)
    wanted = flags.get("num_classes")
    reset = wanted is not None and wanted != head
    if original is None:
        original = static_teacher(model)
    if reset:
        if options.get("teacher"):
            raise DynconvertError(
                "--distill needs the original classifier head; drop --num-classes or --distill",
                usage=True,
            )
        reset_recorded_head(model, wanted, seed=options.get("seed") or 0)
        original = None
    if options.get("teacher") is True and original is not None:
        options["teacher"] = original
    options["original"] = original
    if not plan.has_val and is_main_process():
        notify(f"note: {data} has no val/ folder, so no validation is done (no val top-1)")
    result = finetune(model, data, **options)
    if save and is_main_process():
        io.save(model, out, report=report)
        notify(f"saved {out}")
    return result


def load_model(model_file: Path | None, spec: str | None, weights: Path | None) -> nn.Module:
    """A ``dynconvert.save`` file (its architecture from ``--model`` for a custom model), or
    ``--model package.module:function`` with ``--weights`` (a state dict)."""
    if model_file is not None and weights is not None:
        raise DynconvertError("give either MODEL (a dynconvert file) or --weights", usage=True)
    if model_file is not None:
        return load_saved(model_file, build_architecture(spec))
    if spec is None:
        raise DynconvertError("give MODEL (a dynconvert file) or --model pkg.mod:fn", usage=True)
    return load_user_model(spec, weights)


def finetune_model_file(
    model_file: Path | None,
    spec: str | None,
    weights: Path | None,
    out: Path,
    flags: dict[str, Any],
    notify: Callable[[str], None] = print_note,
):
    """``dynconvert finetune``: MODEL (a dynconvert file), ``--model`` with ``--weights``, or
    the recipe's ``model.name``, fine-tuned with ``flags`` and saved to ``out``.

    Every check that needs no model runs first (:func:`check_run`). A static model is
    converted with the recipe's ``convert`` section; without one it is refused (only a
    converted model can be saved).
    """
    # before anything is loaded
    plan = check_run(flags, out, {"MODEL": model_file, "--weights": weights})
    recipe = plan.recipe
    if model_file is None and spec is None and recipe.model.get("name"):
        name = recipe.model["name"]  # a dynconvert file, or package.module:function
        spec, model_file = (name, None) if ":" in name else (None, Path(name))
        if spec is not None and weights is None and recipe.model.get("weights"):
            weights = Path(recipe.model["weights"])
    model = load_model(model_file, spec, weights)
    original = report = None
    if not has_dynamic_layers(model):  # a static model: convert with the recipe, or refuse
        if not recipe.convert:  # io.save would refuse it, after the whole run
            raise DynconvertError(
                f"{spec or model_file} has no dynamic convolutions, and only a converted model "
                "can be saved; convert it first: add a convert: section to a --recipe "
                "(e.g. 'convert: {k: 4}'), or use dynconvert.convert and dynconvert.save",
                usage=True,
            )
        original = copy.deepcopy(model).eval()
        model, report = convert(model, **recipe.convert)
    return run_finetune(
        model, flags, out, original=original, report=report, plan=plan, notify=notify
    )


def has_dynamic_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a dynamic conv (is converted)."""
    return any(isinstance(m, DynamicConvNd) for m in model.modules())
