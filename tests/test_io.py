"""dynconvert.save / dynconvert.load: weights-only files, exact round trips, clear errors."""

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dynconvert
from dynconvert import DynconvertError
from dynconvert.io import CONVERSION_ATTR, FORMAT, VERSION, read
from dynconvert.sources import build_timm_model

TIMM_NAME = "test_resnet"  # timm's tiny test model: converts in about a second
SIZE = (3, 64, 64)


class Net(nn.Module):
    """A user model: a stem, a block called twice (shared), a 1d branch, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Conv1d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(self.block(self.stem(x)))
        x = self.mix(x.flatten(2)).mean(-1)
        return self.head(x)


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def timm_saved(tmp_path_factory):
    """A converted timm model, its reference output, the report and the saved file."""
    torch.manual_seed(0)
    model = build_timm_model(TIMM_NAME, num_classes=7)
    _randomise_bn(model)
    model, report = dynconvert.convert(model, k=3, ratio=0.5, input_size=SIZE)
    model.eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path_factory.mktemp("io") / "model.pt"
    dynconvert.save(model, path, report=report)
    return model, report, path, x, ref


def test_file_is_weights_only_with_metadata(timm_saved):
    model, report, path, _, _ = timm_saved
    data = torch.load(path, weights_only=True)
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["source"] == {"kind": "timm", "name": TIMM_NAME, "kwargs": {"num_classes": 7}}
    assert data["config"] == report.config and data["config"]["k"] == 3
    assert data["converted"] == report.converted_names and data["converted"]
    assert set(data["versions"]) == {"torch", "timm", "dynconvert"}
    assert data["versions"]["timm"] == timm.__version__
    assert data["state_dict"].keys() == model.state_dict().keys()
    assert data["report"]["rows"] == report.to_dict()["rows"]


def test_timm_round_trip_is_exact(timm_saved):
    model, _, path, x, ref = timm_saved
    loaded = dynconvert.load(path).eval()
    assert type(loaded) is type(model)
    assert loaded is not model
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    layers = [n for n, m in loaded.named_modules() if isinstance(m, dynconvert.DynamicConvNd)]
    assert layers == timm_saved[1].converted_names


def test_file_saved_before_routers_had_a_protocol_still_loads(timm_saved, tmp_path):
    """Earlier files name the router class KernelAttention and record no variant."""
    _, _, path, x, ref = timm_saved
    data = torch.load(path, weights_only=True)
    del data["config"]["variant"]
    for row in data["architecture"]:
        if row[1] == "SoftmaxRouter":
            row[1] = "KernelAttention"
    assert any(row[1] == "KernelAttention" for row in data["architecture"])
    assert any(key.endswith(".attention.fc1.weight") for key in data["state_dict"])
    old = tmp_path / "old.pt"
    torch.save(data, old)
    loaded = dynconvert.load(old).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert getattr(loaded, CONVERSION_ATTR)["config"]["variant"] == "dy"


def test_loaded_model_saves_again_with_its_options(timm_saved, tmp_path):
    _, report, path, x, ref = timm_saved
    loaded = dynconvert.load(path)
    again = dynconvert.save(loaded, tmp_path / "again.pt")  # no report: the recorded one
    data = read(again)
    assert data["config"] == report.config and data["config_inferred"] is False
    assert data["report"]["rows"] == report.to_dict()["rows"]
    with torch.no_grad():
        assert torch.equal(dynconvert.load(again).eval()(x), ref)


def test_plain_timm_model_without_report(tmp_path):
    model = timm.create_model(TIMM_NAME, num_classes=4)  # not built by dynconvert
    dynconvert.convert(model, k=2, ratio=0.5, input_size=SIZE)
    model.eval()
    x = torch.randn(1, *SIZE)
    path = dynconvert.save(model, tmp_path / "m.pt")
    data = read(path)
    # the name comes from pretrained_cfg (architecture.tag); num_classes differs from the default
    name = f"{model.pretrained_cfg['architecture']}.{model.pretrained_cfg['tag']}"
    assert data["source"] == {"kind": "timm", "name": name, "kwargs": {"num_classes": 4}}
    assert data["config_inferred"] is True
    assert (data["config"]["k"], data["config"]["ratio"]) == (2, 0.5)
    with torch.no_grad():
        assert torch.equal(dynconvert.load(path).eval()(x), model(x))


def test_custom_model_round_trip_keeps_sharing(tmp_path):
    model = Net()
    _randomise_bn(model)
    model, report = dynconvert.convert(model, k=4, input_size=(3, 12, 12))
    assert "mix" in report.converted_names and "block.0" in report.converted_names
    model.eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    path = dynconvert.save(model, tmp_path / "net.pt", report=report)
    assert read(path)["source"] == {"kind": "custom", "class": f"{Net.__module__}.Net"}

    with pytest.raises(DynconvertError, match=r"custom model .*Net.*model=") as exc:
        dynconvert.load(path)
    _one_line(exc)

    loaded = dynconvert.load(path, model=Net()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    # a model passed already converted at the saved names is loaded as it is
    reloaded = dynconvert.load(path, model=loaded)
    assert reloaded.block[0] is loaded.block[0]


def test_save_rejects_unconverted_model_and_foreign_report(tmp_path, timm_saved):
    with pytest.raises(DynconvertError, match="no dynamic convolutions") as exc:
        dynconvert.save(Net(), tmp_path / "plain.pt")
    _one_line(exc)
    model, _ = dynconvert.convert(Net(), input_size=(3, 8, 8))
    with pytest.raises(DynconvertError, match=r"lists .* as converted"):
        dynconvert.save(model, tmp_path / "x.pt", report=timm_saved[1])
    assert list(tmp_path.iterdir()) == []


def test_converted_twice_needs_one_report(tmp_path):
    model = timm.create_model(TIMM_NAME)
    dynconvert.convert(model, include="layer1.*", input_size=SIZE)
    _, second = dynconvert.convert(model, include="layer2.*", input_size=SIZE)
    with pytest.raises(DynconvertError, match=r"layer1\..* not in the report") as exc:
        dynconvert.save(model, tmp_path / "m.pt", report=second)
    _one_line(exc)
    assert list(tmp_path.iterdir()) == []


def test_float64_model_round_trip(tmp_path):
    model = build_timm_model(TIMM_NAME).double()
    model, report = dynconvert.convert(model, k=2, input_size=SIZE)
    model.eval()
    x = torch.randn(1, *SIZE, dtype=torch.float64)
    path = dynconvert.save(model, tmp_path / "m.pt", report=report)
    assert read(path)["dtype"] == "float64"
    loaded = dynconvert.load(path).eval()
    assert next(loaded.parameters()).dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_wrong_source_is_a_clear_error(tmp_path, timm_saved):
    model, _, _, _, _ = timm_saved
    source = {"kind": "timm", "name": TIMM_NAME, "kwargs": {}}  # lost num_classes=7
    path = dynconvert.save(model, tmp_path / "m.pt", source=source)
    with pytest.raises(DynconvertError, match=r"shape mismatch .*7.*1000.*model=") as exc:
        dynconvert.load(path)
    _one_line(exc)


# -- files that are not (good) dynconvert saves ----------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_not_run(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "version": VERSION, "x": _Evil(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(
        DynconvertError, match=r"refused.*posix\.system.*nothing was executed"
    ) as exc:
        dynconvert.load(path)
    _one_line(exc)
    assert not marker.exists()


def _write_bad_files(folder: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": os.urandom(4096),
        "text": b"hello, this is not a model\n",
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    return paths


def test_missing_truncated_and_corrupt_files(tmp_path, timm_saved):
    expected = {
        "truncated": "truncated or corrupt",
        "empty": "empty or truncated",
        "garbage": "corrupt",
        "text": "corrupt",
    }
    for name, path in _write_bad_files(tmp_path, timm_saved[2]).items():
        with pytest.raises(DynconvertError, match=expected[name]) as exc:
            dynconvert.load(path)
        assert str(path) in _one_line(exc)
    with pytest.raises(DynconvertError, match="does not exist") as exc:
        dynconvert.load(tmp_path / "nope.pt")
    _one_line(exc)
    with pytest.raises(DynconvertError, match="is a folder"):
        dynconvert.load(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"fc.weight": torch.zeros(2, 2)}, "plain state dict"),
        ({"format": "dynconvert.finetune-checkpoint/1"}, "finetune-checkpoint/1 file"),
        ({"weights": [1, 2]}, "without the dynconvert marker"),
        (torch.zeros(3), "holds a Tensor"),
        ({"format": FORMAT, "version": VERSION + 1}, "newer dynconvert"),
        ({"format": FORMAT, "version": VERSION, "source": {}, "config": {}}, "damaged"),
    ],
)
def test_not_a_dynconvert_file(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(DynconvertError, match=message) as exc:
        dynconvert.load(path)
    _one_line(exc)


# -- atomic writes --------------------------------------------------------------------------


def test_output_folder_missing_or_not_a_folder(tmp_path, timm_saved):
    model, report = timm_saved[0], timm_saved[1]
    with pytest.raises(DynconvertError, match="does not exist") as exc:
        dynconvert.save(model, tmp_path / "missing" / "m.pt", report=report)
    _one_line(exc)
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(DynconvertError, match="is not a folder"):
        dynconvert.save(model, regular / "m.pt", report=report)
    with pytest.raises(DynconvertError, match="is a folder"):
        dynconvert.save(model, tmp_path, report=report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unwritable_folder(tmp_path, timm_saved, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permissions: simulate what others see
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if Path(p) == folder else real_access(p, mode)
        )
    try:
        with pytest.raises(DynconvertError, match="not writable") as exc:
            dynconvert.save(timm_saved[0], folder / "m.pt", report=timm_saved[1])
        _one_line(exc)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, timm_saved, monkeypatch):
    model, report, _, x, ref = timm_saved
    path = tmp_path / "m.pt"
    dynconvert.save(model, path, report=report)
    before = path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        dynconvert.save(model, path, report=report)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert path.read_bytes() == before
    assert zipfile.is_zipfile(path)
    with torch.no_grad():
        assert torch.equal(dynconvert.load(path).eval()(x), ref)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_load_records_conversion_on_model(timm_saved):
    _, report, path, _, _ = timm_saved
    recorded = getattr(dynconvert.load(path), CONVERSION_ATTR)
    assert recorded["converted"] == report.converted_names
    assert recorded["config"] == report.config


@pytest.mark.parametrize("kwargs", [{"global_pool": "max"}, {"output_stride": 16}])
def test_timm_model_built_with_other_arguments_is_not_silently_rebuilt(tmp_path, kwargs):
    """Same weight shapes, other function: load names the difference instead of guessing."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, **kwargs).eval()
    model, report = dynconvert.convert(model, k=2, input_size=SIZE)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        ref = model(x)
    path = dynconvert.save(model, tmp_path / "m.pt", report=report)
    with pytest.raises(DynconvertError, match="is not the saved architecture") as info:
        dynconvert.load(path)
    assert "model=" in _one_line(info)
    again = timm.create_model("resnet18", pretrained=False, num_classes=10, **kwargs)
    with torch.no_grad():
        assert torch.equal(dynconvert.load(path, model=again).eval()(x), ref)


def test_model_passed_with_other_geometry_is_named_in_the_error(tmp_path):
    model, report = dynconvert.convert(Net(), k=2, input_size=SIZE)
    path = dynconvert.save(model, tmp_path / "net.pt", report=report)
    other = Net()
    other.block[0].dilation, other.block[0].padding = (2, 2), (2, 2)  # same weights, other map
    with pytest.raises(DynconvertError, match=r"block\.0.*dilation") as info:
        dynconvert.load(path, model=other)
    assert "the Net passed as model=" in _one_line(info)


def test_per_layer_strategies_survive_a_round_trip(tmp_path):
    model, report = dynconvert.convert(Net(), k=2, input_size=SIZE)
    model.block[0].strategy = "loop"
    model.mix.strategy = "unfold"
    for kind in ("with report", "without"):
        path = tmp_path / f"{kind}.pt"
        dynconvert.save(model, path, report=report if kind == "with report" else None)
        loaded = dynconvert.load(path, model=Net())
        assert loaded.block[0].strategy == "loop" and loaded.mix.strategy == "unfold", kind


def test_save_refuses_options_that_could_not_rebuild_the_model(tmp_path):
    model, _ = dynconvert.convert(Net(), k=4, input_size=SIZE)
    _, report_k2 = dynconvert.convert(Net(), k=2, input_size=SIZE)
    for options in ({"report": report_k2}, {"config": dynconvert.ConvertConfig(k=2)},
                    {"config": dynconvert.ConvertConfig(k=4, ratio=1.0)}):  # fmt: skip
        with pytest.raises(DynconvertError, match=r"do not fit 'block\.0'"):
            dynconvert.save(model, tmp_path / "m.pt", **options)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, timm_saved, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError ('unexpected pos ...')."""

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DynconvertError, match="free some space") as exc:
        dynconvert.save(timm_saved[0], tmp_path / "m.pt", report=timm_saved[1])
    assert "MiB left" in _one_line(exc)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_inside_torchs_zip_writer_is_an_interrupt_not_a_full_disk(
    tmp_path, timm_saved, monkeypatch
):
    """Ctrl-C mid-save makes torch's writer fail in its clean-up with the full-disk error."""

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part")
        try:
            raise KeyboardInterrupt
        finally:  # what the zip writer's __exit__ does
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dynconvert.save(timm_saved[0], tmp_path / "m.pt", report=timm_saved[1])
    assert list(tmp_path.iterdir()) == []
