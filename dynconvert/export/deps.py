"""The optional ONNX stack (``pip install 'dynconvert[export]'``), imported only when used.

``torch.export`` and TorchScript need nothing beyond torch. ONNX export needs ``onnx`` and
``onnxscript`` (the torch.export-based exporter builds the graph with them); reading the file
back for verification needs ``onnxruntime``.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ..errors import DynconvertError

INSTALL_HINT = "pip install 'dynconvert[export]'"


def require(*names: str, purpose: str) -> list[ModuleType]:
    """Import ``names``, or raise one :class:`DynconvertError` that lists all that are missing."""
    modules, missing = [], []
    for name in names:
        try:
            modules.append(import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise DynconvertError(
            f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            f" not installed; install the export extra: {INSTALL_HINT}"
        )
    return modules


def packages_for(format_name: str, verify: bool) -> tuple[str, ...]:
    """The optional packages that exporting (and verifying) ``format_name`` imports."""
    if format_name != "onnx":
        return ()
    return ("onnx", "onnxscript", "onnxruntime") if verify else ("onnx", "onnxscript")


def check_available(format_name: str, verify: bool) -> None:
    """Fail before any work when an optional package for this export is missing."""
    names = packages_for(format_name, verify)
    if names:
        purpose = "ONNX export" + (" with verification" if verify else "")
        require(*names, purpose=purpose)
