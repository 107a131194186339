"""Model-side helpers of fine-tuning: the classifier head, the static teacher, user models."""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import DynconvertError, first_line
from ..files import safe_torch_load
from ..io.saved_model import has_meta_tensors
from ..layers import DynamicConvNd


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last ``nn.Linear`` outside the routers of the dynamic layers."""
    routers = {
        id(m) for layer in model.modules() if isinstance(layer, DynamicConvNd)
        for m in layer.router.modules()
    }  # fmt: skip
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module) not in routers:
            found = (name, module)
    return found


def model_num_classes(model: nn.Module) -> int | None:
    """The head's output count: timm's ``num_classes``, else the last ``nn.Linear``'s."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    last = _last_linear(model)
    return last[1].out_features if last else None


def reset_head(model: nn.Module, num_classes: int, seed: int = 0) -> None:
    """A fresh ``num_classes`` head: timm's ``reset_classifier``, else a new last ``nn.Linear``.

    Its initial weights come from ``seed`` (not from the global RNG's state), so a run with
    a fixed seed is reproducible; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _reset_head(model, num_classes)


def _reset_head(model: nn.Module, num_classes: int) -> None:
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    last = _last_linear(model)
    if last is None:
        raise DynconvertError(
            "num_classes: the model has no reset_classifier() and no nn.Linear head to replace"
        )
    name, linear = last
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    new = nn.Linear(
        linear.in_features,
        num_classes,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    setattr(parent, name.rpartition(".")[2], new)


def check_head(model: nn.Module, classes: list[str] | None) -> None:
    if classes is None:
        return
    n = model_num_classes(model)
    if n is not None and n != len(classes):
        raise DynconvertError(
            f"data: the model's head has {n} outputs but the data has {len(classes)} classes; "
            f"pass --num-classes {len(classes)} (num_classes=) to reset the head",
            usage=True,
        )


def static_twin(model: nn.Module, *, keep_trained_routers: bool = False) -> nn.Module:
    """A copy of ``model`` whose dynamic convs are plain convs: each layer's K kernels mixed by
    its router's constant start weights (for a softmax router, their mean).

    Each such conv computes what its layer computes under constant routing, at the static
    cost: for a freshly converted model, the model it came from; for a trained one, the
    function without the per-sample attention. ``keep_trained_routers`` leaves the layers
    whose router has trained (no longer at its start: non-zero logit layer) dynamic.
    """
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if not isinstance(module, DynamicConvNd):
            continue
        if keep_trained_routers and not module.router.at_start():
            continue
        if not name:
            return module.to_conv()
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name), child, module.to_conv())
    return twin


def static_teacher(model: nn.Module) -> nn.Module:
    """A frozen static copy of a freshly converted model: the original model it came from.

    While a dynamic layer's router is still uniform (its logit layer is zero, as
    ``from_conv`` leaves it), the layer computes the conv with the mean of its K kernels, so
    that conv replaces it exactly and the teacher costs what the original cost. Layers
    whose router has already trained stay dynamic (and frozen).
    """
    return static_twin(model, keep_trained_routers=True).eval().requires_grad_(False)


@torch.no_grad()
def to_channels_last(model: nn.Module) -> nn.Module:
    """``channels_last`` for the 4-D parameters and buffers only.

    ``Module.to(memory_format=torch.channels_last)`` fails on the 5-D ``(K, out, in, kh, kw)``
    kernels of dynamic layers; those are mixed per sample before the conv anyway.
    """
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


def clean_state_dict(obj: object, path: str | Path = "the file") -> dict[str, torch.Tensor]:
    """The state dict in a weights file: unwraps ``state_dict``/``model``, strips ``module.``."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DynconvertError(
            f"weights: {path} is not a state dict of tensors (it holds {type(obj).__name__}); "
            f"{_SAVE_WEIGHTS}"
        )
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


_SAVE_WEIGHTS = "save the weights with torch.save(model.state_dict(), path)"
# ``python -m dynconvert`` puts the current folder on sys.path, the installed script does not.
_IMPORTABLE = (
    "it must be importable: install it, or add its folder to PYTHONPATH (the dynconvert "
    "command does not look in the current folder: PYTHONPATH=. dynconvert ...)"
)


def _factory(spec: str) -> Callable[[], object]:
    """The callable that ``package.module:function`` names, checked to take no arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DynconvertError(f"model: expected package.module:function, got {spec!r}", usage=True)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise DynconvertError(
                f"model: cannot import {module_name} (for {spec}): no such module; {_IMPORTABLE}",
                usage=True,
            ) from None
        raise DynconvertError(
            f"model: importing {module_name} (for {spec}) failed: {first_line(exc)}; install "
            "what it imports"
        ) from exc
    except (Exception, SystemExit) as exc:  # SystemExit: script code run at import
        raise DynconvertError(
            f"model: importing {module_name} (for {spec}) raised {first_line(exc)}; fix the "
            "module (rerun with --debug for the traceback)"
        ) from exc
    factory: object = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise DynconvertError(
                f"model: {module_name} has no {attr!r} (for {spec}); name a function or class "
                "defined in it",
                usage=True,
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise DynconvertError(
            f"model: {spec} is not callable (it is of type {type(factory).__name__}); point "
            "--model at a function or class that builds the model",
            usage=True,
        )
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise DynconvertError(
            f"model: {spec} cannot be called without arguments ({exc}); --model calls it with "
            "none: point it at a function that builds the model with fixed arguments",
            usage=True,
        ) from None
    except ValueError:  # no signature to read (some builtins): calling it will tell
        pass
    return factory


def load_user_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build ``package.module:function`` and load ``weights`` (a state dict) into it."""
    factory = _factory(spec)
    try:
        model = factory()
    except DynconvertError:
        raise
    # SystemExit too: a builder that calls sys.exit (even with 0) built nothing, and the
    # command must not end as if it had succeeded. Ctrl-C (KeyboardInterrupt) still interrupts.
    except (Exception, SystemExit) as exc:
        raise DynconvertError(
            f"model: {spec}() raised {_raised(exc)}; fix it (rerun with --debug for the traceback)"
        ) from exc
    if not isinstance(model, nn.Module):
        raise DynconvertError(
            f"model: {spec}() returned {type(model).__name__}, not a torch.nn.Module; make it "
            "return the model"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise DynconvertError(
            f"model: {spec}() returned a TorchScript module, which cannot be converted or "
            "loaded into; make it return the eager nn.Module (before torch.jit.script)"
        )
    if has_meta_tensors(model):
        raise DynconvertError(
            f"model: {spec}() built the model on the meta device, which holds no weights; "
            "build it on a real device (e.g. cpu)"
        )
    if weights is not None:
        load_weights(model, Path(weights), spec)
    return model


def _raised(exc: BaseException) -> str:
    """``first_line`` of the builder's exception; ``SystemExit(0)`` has no text of its own."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r})"
    return first_line(exc)


def load_weights(model: nn.Module, path: Path, spec: str) -> None:
    """Load the state dict at ``path`` into ``model`` strictly, every problem in one line."""
    if path.is_dir():
        raise DynconvertError(
            f"weights: {path} is a folder; give the weights file (a state dict) in it",
            usage=True,
        )
    if not path.exists():
        raise DynconvertError(f"weights: {path} does not exist", usage=True)
    try:
        state = safe_torch_load(path, "cpu")
    except DynconvertError as exc:
        raise DynconvertError(f"weights: {exc}; --weights takes a state dict") from None
    state = clean_state_dict(state, path)
    problems = _load_loosely(model, state)
    if problems:
        raise DynconvertError(
            f"weights: {path} does not fit the model of {spec}: {'; '.join(problems)}; give "
            "the state dict of this architecture, or the --model the weights come from"
        )


def _load_loosely(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load what fits and return the problems: counts and the first few names of missing,
    unexpected and reshaped keys (torch's message lists every key, hundreds in a big model).

    ``strict=False`` lets modules fill in what they may (BatchNorm's ``num_batches_tracked``
    of older files); any problem still fails the caller, so the partial load is never used.
    """
    expected = model.state_dict()
    reshaped = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(expected[k].shape)}" for k in reshaped
    ]
    skip = set(reshaped)
    try:
        result = model.load_state_dict(
            {k: v for k, v in state.items() if k not in skip}, strict=False
        )
    except RuntimeError as exc:  # a module's own loading check
        return [first_line(exc)]
    missing = [k for k in result.missing_keys if k not in skip]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", result.unexpected_keys),
                        ("of another shape", shapes)):  # fmt: skip
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            noun = "key" if len(keys) == 1 else "keys"
            problems.append(f"{len(keys)} {noun} {label} ({', '.join(keys[:3])}{more})")
    return problems
