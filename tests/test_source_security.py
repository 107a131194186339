"""A saved file cannot make dynconvert load, fetch or import anything (issue 24, security).

The recorded source of a file is checked before anything is built from it; every
``torch.load`` in the package reads with ``weights_only=True``, on every load path.
"""

from __future__ import annotations

import ast
import pathlib
from pathlib import Path

import pytest
import timm
import torch
from finetune_helpers import make_data_dir, write_tinynet

import dynconvert
from dynconvert import DynconvertError
from dynconvert.cli import main
from dynconvert.sources import ARCHITECTURE_KWARGS, MAX_KWARGS, source_problem

PACKAGE = Path(dynconvert.__file__).parent
SIZE = (3, 32, 32)


class _TouchOnUnpickle:
    """A pickle payload that creates ``marker`` when it is unpickled with code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, report = dynconvert.convert(timm.create_model("test_resnet"), k=2, input_size=SIZE)
    return dynconvert.save(model, tmp_path_factory.mktemp("saved") / "m.pt", report=report)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"), per_class=2)


def _with_source(saved: Path, out: Path, source: dict) -> Path:
    """``saved`` written again by the project's own format with another recorded source."""
    payload = torch.load(saved, weights_only=True)
    payload["source"] = source
    torch.save(payload, out)
    return out


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """The malicious pickle and its marker, with ``torch.load`` made as unsafe as torch < 2.6
    for that file (what an old torch or a timm that loads with weights_only=False does)."""
    marker, pickle_path = tmp_path / "PWNED", tmp_path / "evil.pth"
    torch.save({"state_dict": _TouchOnUnpickle(marker)}, pickle_path)
    opened: list[Path] = []
    safe_load = torch.load

    def old_torch_load(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f) == pickle_path:
            opened.append(Path(f))
            kwargs["weights_only"] = False
        return safe_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", old_torch_load)
    yield pickle_path, marker, opened
    assert not marker.exists()
    safe_load(pickle_path, weights_only=False)  # the payload is real: unpickled, it runs
    assert marker.exists()


def _loading_kwargs(evil_path: Path) -> dict[str, tuple[object, str]]:
    """Refused kwarg -> (value, what the error line says about it)."""
    file = str(evil_path)
    loads = "which loads or fetches files"
    return {
        "checkpoint_path": (file, loads),
        "pretrained_cfg_overlay": ({"file": file}, loads),
        "pretrained_cfg": ({"file": file, "num_classes": 1000}, loads),
        "pretrained": (True, loads),
        "cache_dir": (str(evil_path.parent), loads),
        "weights_path": (file, loads),  # not a timm argument, but it names a file
        "global_pool": (file, "looks like a path or URL"),  # an allowed key, a path value
    }


REFUSED_KEYS = list(_loading_kwargs(Path("x")))


def _cli_args(command: str, crafted: Path, tmp_path: Path, data: Path, evil_path: Path):
    return {
        "convert": [crafted, "--out", tmp_path / "again.pt"],
        "inspect": ["inspect", crafted],
        "export": ["export", crafted, "--out", tmp_path / "m.pt2", "--no-verify"],
        "finetune --resume": [
            "finetune",
            crafted,
            "--data",
            data,
            "--resume",
            evil_path,
            "--out",
            tmp_path / "ft.pt",
            "--epochs",
            "1",
        ],
    }[command]


@pytest.mark.parametrize("key", REFUSED_KEYS)
def test_api_refuses_a_file_whose_kwargs_load_a_file(saved, tmp_path, evil, key):
    evil_path, _, opened = evil
    value, says = _loading_kwargs(evil_path)[key]
    source = {"kind": "timm", "name": "test_resnet", "kwargs": {key: value}}
    crafted = _with_source(saved, tmp_path / "crafted.pt", source)
    for call in (dynconvert.load, dynconvert.io.read):
        with pytest.raises(DynconvertError) as info:
            call(crafted)
        message = str(info.value)
        assert "\n" not in message and info.value.usage
        assert f"{crafted} was refused: its recorded source sets timm kwarg {key!r}" in message
        assert says in message and "nothing was built or loaded" in message
    with pytest.raises(DynconvertError, match=f"kwarg {key!r}"):  # not even with model=
        dynconvert.load(crafted, model=timm.create_model("test_resnet"))
    assert not opened


@pytest.mark.parametrize("command", ["convert", "inspect", "export", "finetune --resume"])
@pytest.mark.parametrize("key", REFUSED_KEYS)
def test_cli_refuses_a_file_whose_kwargs_load_a_file(
    saved, tmp_path, data, evil, capsys, command, key
):
    evil_path, _, opened = evil
    value, says = _loading_kwargs(evil_path)[key]
    source = {"kind": "timm", "name": "test_resnet", "kwargs": {key: value}}
    crafted = _with_source(saved, tmp_path / "crafted.pt", source)
    code = main([str(a) for a in _cli_args(command, crafted, tmp_path, data, evil_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1 and err.endswith("\n"), err
    (line,) = err.splitlines()
    assert line.startswith(f"error: {crafted} was refused: its recorded source sets timm kwarg")
    assert repr(key) in line and says in line
    assert not opened
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.pt", "evil.pth"]


@pytest.mark.parametrize("name", ["hf-hub:attacker/model", "local-dir:/tmp/attacker"])
def test_hub_or_folder_name_in_a_file_is_never_fetched(saved, tmp_path, monkeypatch, name):
    built: list[str] = []
    monkeypatch.setattr(timm, "create_model", lambda model_name, **kw: built.append(model_name))
    crafted = _with_source(saved, tmp_path / "hub.pt", {"kind": "timm", "name": name})
    with pytest.raises(DynconvertError) as info:
        dynconvert.load(crafted)
    assert f"{crafted}: the recorded timm name {name!r} names a config to fetch" in str(info.value)
    assert "model=" in str(info.value) and info.value.usage and not built
    monkeypatch.undo()  # the way forward works: the caller builds the architecture
    torch.manual_seed(1)
    loaded = dynconvert.load(crafted, model=timm.create_model("test_resnet"))
    expected = torch.load(saved, weights_only=True)["state_dict"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_custom_class_in_a_file_is_shown_and_never_imported(saved, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_builder.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nNet = build = None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    source = {"kind": "custom", "class": "evil_builder.Net"}
    crafted = _with_source(saved, tmp_path / "custom.pt", source)
    with pytest.raises(DynconvertError, match=r"holds a custom model \(evil_builder.Net\)"):
        dynconvert.load(crafted)
    assert main(["inspect", str(crafted)]) == 0
    assert "custom model evil_builder.Net" in capsys.readouterr().out
    code = main(["export", str(crafted), "--out", str(tmp_path / "m.pt2"), "--no-verify"])
    assert code == 2 and "pass --model" in capsys.readouterr().err
    assert not marker.exists()


def test_save_refuses_a_source_that_load_would_refuse(saved, tmp_path):
    model = dynconvert.load(saved)
    bad = {"kind": "timm", "name": "test_resnet", "kwargs": {"checkpoint_path": "w.pth"}}
    with pytest.raises(DynconvertError, match="kwarg 'checkpoint_path', which loads or fetches"):
        dynconvert.save(model, tmp_path / "m.pt", source=bad)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_classes": 10, "in_chans": 1, "drop_rate": 0.1, "drop_path_rate": 0.05},
        {"img_size": [224, 160], "global_pool": "", "act_layer": "gelu_tanh"},
        {"stem_type": "deep-tiered", "layers": [2, 2, 2, 2], "output_stride": 16},
        {"features_only": True, "out_indices": (1, 2), "no_jit": None},
    ],
)
def test_architecture_kwargs_are_accepted(kwargs):
    assert source_problem({"kind": "timm", "name": "resnet18", "kwargs": kwargs}) is None


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ({"kind": "module", "builder": "os:system"}, "not a dict with kind 'timm' or 'custom'"),
        ("resnet18", "not a dict with kind"),
        ({"kind": "timm", "name": "r", "builder": "os:system"}, "unknown entries ['builder']"),
        ({"kind": "custom", "class": "a\nb"}, "not a one-line name"),
        ({"kind": "timm", "name": 3}, "not a model name"),
        ({"kind": "timm", "name": "r", "kwargs": [("num_classes", 3)]}, "not a dict"),
        ({"kind": "timm", "name": "r", "kwargs": {1: 2}}, "not a string"),
        ({"kind": "timm", "name": "r", "kwargs": {"block_fn": "x"}}, "not an architecture option"),
        ({"kind": "timm", "name": "r", "kwargs": {"layers": [[1], [2]]}}, "a nested list"),
        ({"kind": "timm", "name": "r", "kwargs": {"layers": [1] * 17}}, "a list of 17 values"),
        ({"kind": "timm", "name": "r", "kwargs": {"act_layer": "x" * 65}}, "65 characters"),
        ({"kind": "timm", "name": "r", "kwargs": {"act_layer": "https://x"}}, "path or URL"),
        ({"kind": "timm", "name": "r", "kwargs": {"norm_layer": {"a": 1}}}, "a dict (only"),
        (
            {"kind": "timm", "name": "r", "kwargs": dict.fromkeys(ARCHITECTURE_KWARGS, 1)},
            f"(at most {MAX_KWARGS})",
        ),
    ],
)
def test_sources_out_of_bounds_are_named(source, says):
    assert says in source_problem(source)


# -- every torch.load reads weights only -----------------------------------------------------


def _unsafe_torch_loads(code: str) -> list[int]:
    """Line numbers of ``torch.load`` calls without ``weights_only=True``, and of imports that
    would hide one from this scan (``from torch import load``)."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            found += [node.lineno for alias in node.names if alias.name == "load"]
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
            "torch.load",
            "torch.serialization.load",
        ):
            weights_only = {k.arg: k.value for k in node.keywords}.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(node.lineno)
    return found


def test_every_torch_load_in_the_package_passes_weights_only_true():
    calls = unsafe = 0
    for file in sorted(PACKAGE.rglob("*.py")):
        code = file.read_text(encoding="utf-8")
        calls += code.count("torch.load(")
        lines = _unsafe_torch_loads(code)
        assert not lines, f"{file.relative_to(PACKAGE)}: torch.load without weights_only=True"
        unsafe += len(lines)
    assert calls >= 2 and unsafe == 0  # the scan saw the package's loads (files.py, zoo)


@pytest.mark.parametrize(
    "code",
    [
        "torch.load(p)",
        "torch.load(p, weights_only=False)",
        "torch.load(p, weights_only=flag)",
        "torch.serialization.load(p)",
        "from torch import load",
    ],
)
def test_the_weights_only_scan_finds_unsafe_loads(code):
    assert _unsafe_torch_loads(f"import torch\n{code}\n") == [2]
    assert _unsafe_torch_loads("import torch\ntorch.load(p, weights_only=True)\n") == []


@pytest.mark.parametrize("path", ["load", "convert", "inspect", "export", "finetune --resume"])
def test_every_load_path_reads_weights_only(saved, data, tmp_path, monkeypatch, capsys, path):
    (tmp_path / "code").mkdir()
    monkeypatch.syspath_prepend(str(write_tinynet(tmp_path / "code")))
    fast = ["--batch-size", "4", "--input-size", "16", "--no-progress", "--model", "tinynet:tiny"]
    if path == "finetune --resume":  # a run to resume from, before loads are recorded
        first = ["finetune", "--data", data, "--out", tmp_path / "ft.pt", "--epochs", "1", *fast]
        assert main([str(a) for a in first]) == 0, capsys.readouterr().err
    calls: list[tuple[str, dict]] = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((str(f), dict(kwargs)))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    if path == "load":
        dynconvert.load(saved)
        expected = {str(saved)}
    else:
        args = {
            "convert": [saved, "--out", tmp_path / "again.pt"],
            "inspect": ["inspect", saved],
            "export": ["export", saved, "--out", tmp_path / "m.pt2", "--no-verify"],
            "finetune --resume": [
                "finetune",
                tmp_path / "ft.pt",
                "--data",
                data,
                "--resume",
                tmp_path / "ft.ckpt",
                "--out",
                tmp_path / "ft2.pt",
                "--epochs",
                "2",
                *fast,
            ],
        }[path]
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        expected = {str(args[0] if path == "convert" else args[1])}
        if path == "finetune --resume":
            expected.add(str(tmp_path / "ft.ckpt"))
    assert expected <= {f for f, _ in calls}
    assert all(kwargs.get("weights_only") is True for _, kwargs in calls), calls
