"""`dynconvert.export`: pt2, ONNX and TorchScript with a dynamic batch, verified on reload.

Every format x {hand-written 1d/2d/depthwise net, resnet18, mobilenetv3_small_100,
efficientnet_b0} is exported once (module-scoped cache) and checked at batch sizes 1, 3 and 8;
the other tests reuse those files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import onnx
import pytest
import torch
from export_models import MODELS, Mixed, build, input_size
from torch import nn

import dynconvert
from dynconvert import DynconvertError
from dynconvert.export import FORMATS, TOLERANCE, export_state
from dynconvert.export.api import _weight_bytes
from dynconvert.export.verify import compare

FORMAT_NAMES = tuple(FORMATS)


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = build(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(path, result) of exporting model ``name`` to ``fmt``, each pair done once."""
    cache = {}

    def get(name: str, fmt: str):
        if (name, fmt) not in cache:
            folder = tmp_path_factory.mktemp(f"{name}-{fmt}")
            path = folder / f"{name}{FORMATS[fmt].suffix}"
            result = dynconvert.export(
                models(name), path, fmt, input_size=input_size(name), show=False
            )
            cache[name, fmt] = path, result
        return cache[name, fmt]

    return get


def _leftovers(folder: Path, keep: Path | None = None) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != keep)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_export_verifies_at_batch_1_3_8(exported, models, name, fmt):
    path, result = exported(name, fmt)
    assert path.is_file() and _leftovers(path.parent, keep=path) == []  # no temporary file
    assert [row["batch"] for row in result.rows] == [1, 3, 8]
    for row in result.rows:
        assert row["ok"] and row["error"] is None, row
        assert row["max_abs_error"] <= TOLERANCE * row["max_abs_output"], row
        assert row["max_abs_output"] > 0
    assert result.verified and result.input_size == input_size(name)
    model = models(name)
    assert model.training  # flags and strategies are restored after export
    assert all(
        m.strategy == "auto" for m in model.modules() if isinstance(m, dynconvert.DynamicConvNd)
    )


def test_pt2_batch_dimension_is_dynamic(exported):
    path, _ = exported("resnet18", "pt2")
    program = torch.export.load(path)
    (batch,) = [
        s for s in program.graph_module.graph.find_nodes(op="placeholder")[-1].meta["val"].shape[:1]
    ]
    assert isinstance(batch, torch.SymInt)
    bounds = program.range_constraints[batch.node.expr]
    assert bounds.lower == 1 and bounds.upper > 1024


def _conv_groups(path: Path) -> list[int]:
    graph = onnx.load(str(path)).graph
    groups = []
    for node in graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            groups.append(int(attrs.get("group", 1)))
    return groups


def _batch_dim(path: Path) -> str:
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim.HasField("dim_value"), dim
    return dim.dim_param


@pytest.mark.parametrize("name", ["mixed", "mobilenetv3_small_100"])
def test_onnx_conv_groups_do_not_depend_on_the_batch(exported, models, name, tmp_path):
    """Every Conv's `group` is an original conv's; exporting at batch 2 and 5 gives the same."""
    model = models(name)
    original = {m.groups for m in model.modules() if hasattr(m, "groups")}
    at_2, _ = exported(name, "onnx")  # example batch 2
    groups_2 = _conv_groups(at_2)
    assert groups_2 and set(groups_2) <= original
    assert max(groups_2) > 1  # a depthwise conv is in there
    assert _batch_dim(at_2)
    if name == "mixed":  # exporting again at another batch size: byte-for-byte same groups
        x5 = torch.randn(5, *input_size(name))
        at_5 = tmp_path / "at5.onnx"
        dynconvert.export(model, at_5, "onnx", example_input=x5, verify=False, show=False)
        assert _conv_groups(at_5) == groups_2
        assert _batch_dim(at_5)


@contextmanager
def _grouped_strategy(model: nn.Module):
    """The batch-folded 'grouped' path forced where the exporter asks for 'static'."""
    layers = [m for m in model.modules() if isinstance(m, dynconvert.DynamicConvNd)]
    for layer in layers:
        layer.strategy = "grouped"
    try:
        yield model
    finally:
        for layer in layers:
            layer.strategy = "auto"


def test_negative_control_grouped_trace_fails_verification(models, tmp_path, monkeypatch):
    """A graph with the batch baked into `groups` fails at other sizes; nothing is written."""
    monkeypatch.setattr(export_state, "static_strategy", _grouped_strategy)
    model, out = models("mixed"), tmp_path / "grouped.ts"
    with pytest.raises(DynconvertError, match="failed verification") as info:
        dynconvert.export(model, out, "torchscript", input_size=Mixed.input_size, show=False)
    assert "batch 3" in str(info.value) and "was not written" in str(info.value)
    assert _leftovers(tmp_path) == []
    # The same broken graph passes at the traced batch size and fails at the others.
    with pytest.raises(DynconvertError, match="batch 3") as info:
        dynconvert.export(
            model, out, "torchscript", input_size=Mixed.input_size, batch_sizes=(2, 3), show=False
        )
    assert "batch 2" not in str(info.value)
    assert _leftovers(tmp_path) == []


def test_negative_control_grouped_onnx_export_fails(models, tmp_path, monkeypatch):
    monkeypatch.setattr(export_state, "static_strategy", _grouped_strategy)
    with pytest.raises(DynconvertError, match="onnx export of Mixed failed"):
        dynconvert.export(
            models("mixed"), tmp_path / "g.onnx", "onnx", input_size=Mixed.input_size, show=False
        )
    assert _leftovers(tmp_path) == []


def test_nan_in_the_exported_file_fails_verification(models, tmp_path, monkeypatch):
    """A file whose outputs are NaN is not written (max() alone would call its error 0)."""
    fmt = FORMATS["torchscript"]

    def load_nan(path, device):
        run = fmt.load(path, device)
        return lambda x: [out.clone().fill_(float("nan")) for out in run(x)]

    monkeypatch.setitem(FORMATS, "torchscript", dataclasses.replace(fmt, load=load_nan))
    with pytest.raises(DynconvertError, match="non-finite values in the exported output"):
        dynconvert.export(
            models("mixed"), tmp_path / "nan.ts", "torchscript", input_size=Mixed.input_size,
            show=False,
        )  # fmt: skip
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_free_space_estimate_is_a_lower_bound_of_the_file(exported, models, name, fmt):
    """The up-front disk check never refuses a file that would fit (weights ≤ file size)."""
    path, _ = exported(name, fmt)
    assert 0 < _weight_bytes(models(name)) <= path.stat().st_size


def test_a_disk_without_room_is_refused_before_the_exporter_runs(models, tmp_path, monkeypatch):
    """torch's exporters abort the process on a full disk; the check must come first."""
    model = models("mixed")
    free = _weight_bytes(model) // 2
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, free))
    monkeypatch.setitem(FORMATS, "pt2", dataclasses.replace(FORMATS["pt2"], write=None))
    with pytest.raises(DynconvertError, match=r"needs about 0\.0 MiB and its disk has 0\.0 MiB"):
        dynconvert.export(model, tmp_path / "m.pt2", "pt2", input_size=Mixed.input_size, show=False)
    assert _leftovers(tmp_path) == []


def test_non_finite_reference_is_a_failure_not_a_zero_error():
    ones, nan = [torch.ones(2, 3)], [torch.tensor([[1.0, float("nan"), 1.0]] * 2)]
    assert compare(ones, ones) == (0.0, 1.0, None)
    assert "the model's own output" in compare(ones, nan)[2]
    assert "the exported output" in compare(nan, ones)[2]


def test_fold_bn_export_resnet18(models, tmp_path):
    """Each converted conv's BatchNorm is folded; checked against the unfolded model."""
    model = models("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = dynconvert.export(
        model, tmp_path / "r.pt2", "pt2", input_size=input_size("resnet18"), fold_bn=True,
        show=False,
    )  # fmt: skip
    assert result.verified
    dynamic = [n for n, m in model.named_modules() if isinstance(m, dynconvert.DynamicConvNd)]
    expected = {(n, n.replace("conv", "bn").replace("downsample.0", "downsample.1"))
                for n in dynamic}  # fmt: skip
    assert {(p.conv, p.norm) for p in result.folded} == expected and len(expected) == 19
    after = model.state_dict()  # the caller's model is not folded
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    program = torch.export.load(tmp_path / "r.pt2")
    targets = {str(n.target) for n in program.graph_module.graph.nodes}
    assert not any("batch_norm" in t for t in targets if "layer" in t)
    norms = [t for t in targets if "batch_norm" in t]
    assert len(norms) <= 1  # only the stem's BatchNorm (its conv stays static) remains


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_fold_bn_export_mixed(models, tmp_path, fmt):
    result = dynconvert.export(
        models("mixed"), tmp_path / f"m{FORMATS[fmt].suffix}", fmt, fold_bn=True,
        input_size=Mixed.input_size, show=False,
    )  # fmt: skip
    assert result.verified
    assert [(p.conv, p.norm) for p in result.folded] == [
        ("conv", "bn"), ("dw", "bn_dw"), ("conv1d", "bn1d"),
    ]  # fmt: skip


_STANDALONE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "dynconvert":
                raise ImportError("dynconvert is blocked in this process")

    sys.meta_path.insert(0, Refuse())
    try:
        import dynconvert  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("dynconvert could be imported")

    import onnxruntime
    import torch

    data = torch.load(sys.argv[1], weights_only=True)
    x, reference = data["x"], data["reference"]
    outputs = {
        "pt2": torch.export.load(sys.argv[2]).module()(x),
        "torchscript": torch.jit.load(sys.argv[4])(x),
    }
    session = onnxruntime.InferenceSession(sys.argv[3], providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    outputs["onnx"] = torch.from_numpy(onnx_out)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "dynconvert")
    errors = {k: (v - reference).abs().max().item() for k, v in outputs.items()}
    print(json.dumps({"errors": errors, "scale": reference.abs().max().item(), "loaded": loaded}))
    """
)


def test_exports_run_without_dynconvert(exported, models, tmp_path):
    """A converted timm model's files load and run where dynconvert cannot be imported."""
    name = "resnet18"
    files = [str(exported(name, fmt)[0]) for fmt in ("pt2", "onnx", "torchscript")]
    model = models(name)
    x = torch.randn(5, *input_size(name))  # a batch size the export never saw
    with export_state.eval_mode(model), torch.no_grad():
        reference = model(x)
    data = tmp_path / "io.pt"
    torch.save({"x": x, "reference": reference}, data)
    script = tmp_path / "standalone.py"
    script.write_text(_STANDALONE)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(data), *files],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert set(report["errors"]) == {"pt2", "onnx", "torchscript"}
    for fmt, error in report["errors"].items():
        assert error <= TOLERANCE * report["scale"], (fmt, error)


def test_example_input_with_batch_1_still_exports_a_dynamic_batch(models, tmp_path):
    x1 = torch.randn(1, *Mixed.input_size)
    result = dynconvert.export(models("mixed"), tmp_path / "m.pt2", example_input=x1, show=False)
    assert result.verified and result.input_size == Mixed.input_size


def test_input_size_defaults_to_timm_data_config():
    from timm import create_model

    from dynconvert.export.api import resolve_input_size

    assert resolve_input_size(create_model("test_resnet"), None, None) == (3, 160, 160)
    with pytest.raises(DynconvertError, match="input_size="):
        resolve_input_size(Mixed(), None, None)


def test_a_model_forced_to_batch_1_dense_exports_and_keeps_its_strategy(tmp_path):
    model = Mixed()
    dynconvert.convert(model, strategy="dense", input_size=Mixed.input_size)
    layers = [m for m in model.modules() if isinstance(m, dynconvert.DynamicConvNd)]
    result = dynconvert.export(model, tmp_path / "m.pt2", input_size=Mixed.input_size, show=False)
    assert result.verified and [row["batch"] for row in result.rows] == [1, 3, 8]
    assert {layer.strategy for layer in layers} == {"dense"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_is_checked_against_its_float32_self(tmp_path, dtype):
    from timm import create_model

    from dynconvert.export.verify import verify

    model = create_model("test_resnet", pretrained=False).eval()
    dynconvert.convert(model, input_size=(3, 32, 32))
    model = model.to(dtype)
    result = dynconvert.export(model, tmp_path / "m.pt2", input_size=(3, 32, 32), show=False)
    assert result.verified
    assert all(row["relative_error"] > 1e-4 for row in result.rows)  # past float32's bound
    like = next(model.parameters())
    exact = copy.deepcopy(model).float()

    def off_by_a_tenth(x):  # a wrong file: 10% from the model
        with torch.no_grad():
            return [exact(x.float()) * 1.1]

    rows = verify("pt2", off_by_a_tenth, model, (3, 32, 32), (1, 3), like)
    assert not any(row["ok"] for row in rows)
    with pytest.raises(DynconvertError, match="onnxruntime has no bfloat16 Conv"):
        dynconvert.export(model.bfloat16(), tmp_path / "m.onnx", "onnx", input_size=(3, 32, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
