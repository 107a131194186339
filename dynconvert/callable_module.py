"""A subpackage that is also the function of the same name: ``dynconvert.convert(...)``.

``dynconvert.convert``, ``dynconvert.finetune`` and ``dynconvert.export`` are exported lazily as
functions, but importing the subpackage of the same name rebinds the package attribute to the
module. :func:`make_callable` makes that module forward calls to its function, so both work.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Calling the module ``module_name`` calls ``function``."""

    class _CallableModule(types.ModuleType):
        __doc__ = f"``{module_name}`` is both this subpackage and the function."

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
