"""A recipe's ``model`` and ``convert`` sections merged into a :class:`ModelRequest`."""

from __future__ import annotations

from pathlib import Path

from ..recipes import Recipe
from ..sources import is_saved_file
from .request import ModelRequest


def apply_recipe(request: ModelRequest, recipe: Recipe) -> list[str]:
    """The recipe fills what the command line left at its defaults (precedence: defaults <
    recipe < command line, as for the fine-tuning options). Returns the notes to show.

    - ``convert``: the conversion options. A saved MODEL is already converted, so it is
      not re-converted; a note says so.
    - ``model``: ``pretrained``, and ``weights`` as ``checkpoint``, when the recipe names
      MODEL (or names no model). MODEL on the command line wins over another
      ``model.name``, and then that model's weights are not used; a note says so.
    """
    if is_saved_file(request.model):
        if recipe.convert:
            return [f"note: {request.model} is already converted; the recipe's convert "
                    "section is not applied"]  # fmt: skip
        return []
    for name, value in recipe.convert.items():
        if name not in request.explicit:
            is_size = name == "input_size" and value is not None
            request.options[name] = tuple(value) if is_size else value
    named = recipe.model.get("name")
    if named is not None and named != request.model:
        if recipe.model.keys() & {"weights", "pretrained"}:
            return [f"note: MODEL {request.model} replaces the recipe's model.name {named}; "
                    "its model.weights/pretrained are not used"]  # fmt: skip
        return []
    if "pretrained" in recipe.model and "pretrained" not in request.explicit:
        request.pretrained = recipe.model["pretrained"]
    weights = recipe.model.get("weights")
    if weights is not None and not request.explicit & {"checkpoint", "pretrained"}:
        request.checkpoint = Path(weights)
    return []
