"""Where a model comes from: a timm name, ``package.module:function``, or a saved file.

* :mod:`.names`: what a MODEL string names, from its text;
* :mod:`.timm_models`: a timm model built by name with one clear error per failure, and the
  source a saved file records (:func:`model_source`);
* :mod:`.records`: what a saved file may record as its source, checked before any rebuild;
* :mod:`.input_size`: the input size a model is probed and converted at.

The API that turns a MODEL string into a converted model is :mod:`dynconvert.model_request`.
"""

from .input_size import full_input_size, probe_input_size
from .names import check_model_argument, check_model_path, is_saved_file, is_user_function
from .records import ARCHITECTURE_KWARGS, LOADING_KWARGS, MAX_KWARGS, source_problem
from .timm_models import (
    SOURCE_ATTR,
    build_timm_model,
    close_timm_names,
    model_source,
    rebuild_timm_model,
)

__all__ = [
    "ARCHITECTURE_KWARGS",
    "LOADING_KWARGS",
    "MAX_KWARGS",
    "SOURCE_ATTR",
    "build_timm_model",
    "check_model_argument",
    "check_model_path",
    "close_timm_names",
    "full_input_size",
    "is_saved_file",
    "is_user_function",
    "model_source",
    "probe_input_size",
    "rebuild_timm_model",
    "source_problem",
]
