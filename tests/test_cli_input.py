"""Bad input to the CLI: one line, the right exit code, checked before any work; ``--debug``
anywhere; ``--model`` for files that hold a custom model."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import timm
import torch
from test_export_cli import assert_one_line_error, run

import dynconvert
from dynconvert import DynconvertError

TIMM_NAME = "test_resnet"  # timm's tiny test model
TINY = "_dynconvert_cli_tinynet"  # the module of the custom model, written per test session
ARCH = f"{TINY}:net"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long names in narrow tables


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    model = timm.create_model(TIMM_NAME, pretrained=False)
    model, report = dynconvert.convert(model, k=2, input_size=(3, 32, 32))
    path = tmp_path_factory.mktemp("timm") / "m.pt"
    dynconvert.save(model, path, report=report)
    return path


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """(the file of a converted custom model, the module that builds its architecture)."""
    folder = tmp_path_factory.mktemp("custom")
    (folder / f"{TINY}.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def net():
            return nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
            )
        """)
    )
    sys.path.insert(0, str(folder))
    try:
        from _dynconvert_cli_tinynet import net

        model, report = dynconvert.convert(net(), k=2, input_size=(3, 16, 16))
        path = folder / "custom.pt"
        dynconvert.save(model, path, report=report)
        assert dynconvert.io.read(path)["source"]["kind"] == "custom"
        yield path, net
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(TINY, None)


# -- --debug anywhere, with the root cause -------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "missing.pt", "--debug"],
        ["resnet_nope", "--debug", "--dry-run"],
        ["--debug", "resnet_nope", "--dry-run"],
    ],
)
def test_debug_is_accepted_anywhere(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 2
    assert "Traceback" in err and "No such option" not in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_debug_shows_the_cause_hidden_by_from_none(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  epochs: [1\n")
    args = [TIMM_NAME, "--no-pretrained", "--dry-run", "--recipe", recipe, "--data", tmp_path]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert_one_line_error(err, "not valid YAML")
    code, _, err = run(capsys, *args, "--debug")
    assert code == 2
    assert "yaml.parser.ParserError" in err  # the original error, not only the re-worded one


# -- --model: files that hold a custom model -----------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{file}", "--format", "torchscript", "--out", "{out}"],
        ["bench", "{file}"],
        ["{file}", "--out", "{out}"],
    ],
)
def test_custom_model_file_without_model_says_use_model(custom, tmp_path, capsys, command):
    path, _ = custom
    out = tmp_path / "out.ts"
    args = [a.format(file=path, out=out) for a in command]
    code, _, err = run(capsys, *args)
    assert code == 2
    line = assert_one_line_error(err, str(path), "custom model", "--model")
    assert "dynconvert.load(" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:.*torch.jit.load:FutureWarning")
def test_export_with_model_writes_a_verified_file(custom, tmp_path, capsys):
    path, net = custom
    out = tmp_path / "m.ts"
    code, stdout, err = run(capsys, "export", path, "--model", ARCH, "--out", out,
                            "--input-size", "3,16,16")  # fmt: skip
    assert code == 0, err
    assert "verified at batch sizes 1, 3, 8" in stdout
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = dynconvert.load(path, model=net()).eval()(x)
        got = torch.jit.load(str(out))(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_convert_of_a_custom_file_with_model_saves_it_again(custom, tmp_path, capsys):
    path, net = custom
    out = tmp_path / "again.pt"
    code, stdout, err = run(capsys, path, "--model", ARCH, "--out", out)
    assert code == 0, err
    assert f"saved {out}" in stdout
    again, original = dynconvert.load(out, model=net()), dynconvert.load(path, model=net())
    expected = original.state_dict()
    assert again.state_dict().keys() == expected.keys()
    for name, value in again.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_bench_with_model_measures_peak_memory_in_fresh_processes(custom, tmp_path, capsys):
    """The measuring subprocesses import the --model module the test put on sys.path."""
    path, _ = custom
    report = tmp_path / "b.json"
    code, _, err = run(capsys, "bench", path, "--model", ARCH, "-b", "2", "--input-size",
                       "3,16,16", "--rounds", "1", "--json", report)  # fmt: skip
    assert code == 0, err
    result = json.loads(report.read_text())
    assert result["input"] == [3, 16, 16] and set(result["train_ms"]) == {"static", "dynamic"}
    assert set(result["peak_bytes"]) == {"static", "dynamic"}
    assert all(peak >= 0 for peak in result["peak_bytes"].values())


def test_inspect_rebuilds_a_file_without_report_with_model(custom, tmp_path, capsys):
    path, _ = custom
    payload = torch.load(path, weights_only=True)
    payload["report"] = None  # an older writer: inspect must build the model to list layers
    bare = tmp_path / "bare.pt"
    torch.save(payload, bare)
    code, _, err = run(capsys, "inspect", bare)
    assert code == 2
    assert_one_line_error(err, "--model")
    code, stdout, err = run(capsys, "inspect", bare, "--model", ARCH)
    assert code == 0, err
    assert "custom model" in stdout and "converted" in stdout


def test_model_given_for_a_timm_name_says_drop_it(tmp_path, capsys):
    for command in ([TIMM_NAME, "--dry-run"], ["inspect", TIMM_NAME], ["bench", TIMM_NAME]):
        code, _, err = run(capsys, *command, "--model", "pkg.mod:fn")
        assert code == 2
        assert_one_line_error(err, "drop --model")


# -- export --opset ------------------------------------------------------------------------


def test_opset_above_the_installed_onnx_is_refused_first(timm_file, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    highest = onnx.defs.onnx_opset_version()
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", timm_file, "--format", "onnx", "--opset", highest + 1,
                       "--out", out, "--input-size", "3,32,32")  # fmt: skip
    assert code == 2
    assert_one_line_error(err, f"opset {highest + 1}", f"18 to {highest}")
    assert list(tmp_path.iterdir()) == []


def test_export_api_refuses_an_opset_above_the_installed_onnx(timm_file, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    highest = onnx.defs.onnx_opset_version()
    model = dynconvert.load(timm_file)
    with pytest.raises(DynconvertError, match=f"18 to {highest}") as caught:
        dynconvert.export(model, tmp_path / "m.onnx", "onnx", input_size=(3, 32, 32),
                          opset=highest + 1, show=False)  # fmt: skip
    assert caught.value.usage
    with pytest.raises(DynconvertError, match="opset 17"):  # and below the exporter's floor
        dynconvert.export(model, tmp_path / "m.onnx", "onnx", input_size=(3, 32, 32),
                          opset=17, show=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# -- hf-hub: names offline -----------------------------------------------------------------

HUB_NAME = "hf-hub:timm/resnet18.a1_in1k"


def test_hf_hub_model_offline_says_the_hub_is_needed(capsys):
    from dynconvert.sources.timm_models import _hub_config_cached

    if _hub_config_cached(HUB_NAME):
        pytest.skip("the config is in the local hub cache")
    for flags in (["--no-pretrained"], []):
        code, _, err = run(capsys, HUB_NAME, "--dry-run", *flags)
        assert code == 1
        line = assert_one_line_error(err, "needs the Hugging Face hub", "resnet18.a1_in1k")
        assert "LocalEntryNotFoundError" not in line


def test_hf_hub_model_with_a_cached_config_still_suggests_no_pretrained(monkeypatch, capsys):
    import dynconvert.sources.timm_models

    monkeypatch.setattr(dynconvert.sources.timm_models, "_hub_config_cached", lambda name: True)
    code, _, err = run(capsys, HUB_NAME, "--dry-run")
    assert code == 1
    assert_one_line_error(err, "cannot download pretrained weights", "--no-pretrained")


# -- output paths and inputs before any work -----------------------------------------------


def test_bench_checks_the_json_path_before_measuring(tmp_path, monkeypatch, capsys):
    import dynconvert.cli.bench_cmd as bench_cmd

    def never(*args, **kwargs):
        raise AssertionError("measured before the output path was checked")

    monkeypatch.setattr(bench_cmd, "_measure", never)
    code, _, err = run(capsys, "bench", TIMM_NAME, "--json", tmp_path / "nodir" / "b.json")
    assert code == 1
    assert_one_line_error(err, "cannot write", "nodir")


def test_convert_refuses_an_input_size_the_model_cannot_take(tmp_path, capsys):
    out = tmp_path / "m.pt"
    code, _, err = run(capsys, TIMM_NAME, "--no-pretrained", "--k", "2",
                       "--input-size", "5,32,32", "--out", out)  # fmt: skip
    assert code == 2
    assert_one_line_error(err, TIMM_NAME, "cannot take inputs of size (5, 32, 32)", "--input-size")
    assert list(tmp_path.iterdir()) == []
    code, stdout, err = run(capsys, TIMM_NAME, "--no-pretrained", "--k", "2",
                            "--input-size", "3,32,32", "--out", out)  # fmt: skip
    assert code == 0, err
    assert "at input 3×32×32" in stdout and out.exists()


# -- exit codes and messages for missing inputs --------------------------------------------


def test_missing_inputs_are_usage_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cases = [
        ([TIMM_NAME, "--no-pretrained", "--dry-run", "--checkpoint", "missing.pth"],
         ["checkpoint missing.pth does not exist"]),
        (["bench", "missing.pt"], ["missing.pt does not exist"]),
        (["bench", "data"], ["data is a folder", "not a dynconvert file or a timm model name"]),
        (["data", "--dry-run"], ["data is a folder"]),
        (["inspect", "data"], ["data is a folder"]),
    ]  # fmt: skip
    for args, fragments in cases:
        code, _, err = run(capsys, *args)
        assert code == 2, args
        line = assert_one_line_error(err, *fragments)
        assert "unknown timm model" not in line


def test_no_arguments_prints_the_help(capsys):
    code, out, err = run(capsys)
    assert code in (0, 2)
    text = out + err
    assert "Usage: dynconvert" in text and "Commands:" in text and "inspect" in text
    assert not any(line.startswith("error") for line in text.splitlines())


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--no-pretrained"], "--no-pretrained applies"),
        (["--no-skip-stem", "--pretrained"], "--pretrained, --no-skip-stem apply"),
    ],
)
def test_refused_flags_are_named_as_typed(timm_file, tmp_path, capsys, flags, named):
    code, _, err = run(capsys, timm_file, *flags, "--out", tmp_path / "x.pt")
    assert code == 2
    assert_one_line_error(err, named, "already converted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{file}", "--json", "{file}"],
        ["export", "{file}", "--format", "torchscript", "--out", "{file}"],
        ["{file}", "--out", "{file}"],
        ["{file}", "--out", "{other}", "--json", "{file}"],
        ["{other}", "--checkpoint", "{file}", "--out", "{file}"],
        ["bench", "{file}", "--json", "{file}"],
    ],
    ids=["inspect-json", "export-out", "convert-out", "convert-json", "checkpoint", "bench"],
)
def test_an_output_that_is_an_input_file_is_refused(timm_file, tmp_path, capsys, args):
    file = tmp_path / "m.pt"
    file.write_bytes(timm_file.read_bytes())
    values = {"file": str(file), "other": str(tmp_path / "n.pt")}
    if args[0] == "{other}":
        values["other"] = TIMM_NAME
    code, _, err = run(capsys, *(a.format(**values) for a in args))
    assert code == 2
    assert_one_line_error(err, f"cannot write {file}: it is the input file")
    assert file.read_bytes() == timm_file.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_finetune_outputs_that_are_inputs_are_refused(custom, tmp_path, capsys):
    file, _ = custom
    model = tmp_path / "m.pt"
    model.write_bytes(file.read_bytes())
    data = tmp_path / "data"  # never read: the outputs are checked first
    for flags in (["--out", model], ["--out", tmp_path / "o.pt", "--checkpoint", model]):
        code, _, err = run(capsys, "finetune", model, "--model", ARCH, "--data", data, *flags)
        assert code == 2
        assert_one_line_error(err, f"cannot write {model}: it is the input file")
    assert model.read_bytes() == file.read_bytes()


def test_bench_of_a_saved_file_refuses_k(timm_file, capsys):
    code, _, err = run(capsys, "bench", timm_file, "--k", "2")
    assert code == 2
    assert_one_line_error(err, "saved dynconvert model with its own K; --k applies to timm")


@pytest.mark.parametrize(("typed", "meant"), [("inspct", "inspect"), ("Export", "export")])
def test_a_mistyped_command_is_named_not_converted(capsys, typed, meant):
    code, _, err = run(capsys, typed, "resnet18", "--out", "x.pt")
    assert code == 2
    assert_one_line_error(err, f"unknown command {typed!r}; did you mean {meant!r}?")


def test_convert_builds_your_own_model_from_package_module_function(custom, tmp_path, capsys):
    _, net = custom
    weights = tmp_path / "w.pth"
    torch.save(net().state_dict(), weights)
    out = tmp_path / "own.pt"
    code, stdout, err = run(capsys, ARCH, "--checkpoint", weights, "--input-size", "3,16,16",
                            "--k", "3", "--out", out)  # fmt: skip
    assert code == 0, err
    assert "model=<your architecture>" in stdout
    model = dynconvert.load(out, model=net())
    reference = net()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
    assert model[2].k == 3
    code, _, err = run(capsys, ARCH, "--pretrained", "--out", tmp_path / "p.pt")
    assert code == 2
    assert_one_line_error(err, "--pretrained applies to timm model names")


def test_a_saved_model_given_as_checkpoint_is_named(timm_file, capsys):
    code, _, err = run(capsys, TIMM_NAME, "--checkpoint", timm_file, "--dry-run")
    assert code == 2
    assert_one_line_error(err, "is a saved dynconvert model, already converted; give it as MODEL")


@pytest.mark.parametrize("command", ["inspect", "export"])
def test_an_exported_file_given_as_model_is_named(timm_file, tmp_path, capsys, command):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read")
    args = [command, onnx_file] + (["--out", tmp_path / "x.pt2"] if command == "export" else [])
    code, _, err = run(capsys, *args)
    assert code != 0
    assert_one_line_error(err, "looks like an exported onnx file", "give the .pt file")


def test_warnings_print_as_one_line_and_with_debug_as_python_does():
    import warnings

    from dynconvert.cli import _plain_warnings

    with _plain_warnings(True):
        assert warnings.formatwarning("to know", UserWarning, "loop.py", 3) == "warning: to know\n"
    with _plain_warnings(False):  # --debug
        assert "loop.py:3: UserWarning: to know" in warnings.formatwarning(
            "to know", UserWarning, "loop.py", 3
        )


def test_a_missing_file_named_like_a_command_is_missing_not_mistyped(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "finetuned.pt", "--out", tmp_path / "x.pt")
    assert code == 2
    assert_one_line_error(err, "finetuned.pt does not exist")
    code, _, err = run(capsys, "finetuned.pt", "--out", tmp_path / "x.pt")
    assert code == 2 and "unknown command" not in err
