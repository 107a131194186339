"""DDP: the same fine-tuning under ``torchrun --nproc_per_node 2`` (gloo, CPU).

One torchrun trains 2 epochs straight, then 1 epoch and a resume to 2 epochs (constant lr and
an explicit temperature length, so the 1-epoch run is the first half of the 2-epoch one);
another runs the one-command pipeline ``dynconvert MODEL --data DIR ...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from finetune_helpers import make_data_dir, write_tinynet

import dynconvert
from dynconvert import DynconvertError

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    import dynconvert
    from tinynet import tiny

    data, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")  # one group for the three runs (the trainer joins it)
    rank = dist.get_rank()
    common = dict(
        batch_size=4, lr=0.05, min_lr=0.05, input_size=16, seed=0, temperature_start=5.0,
        temperature_epochs=2, progress=False,
    )
    model = tiny()
    result = dynconvert.finetune(
        model, data, epochs=2, checkpoint=os.path.join(out, "run.ckpt"), **common
    )
    rng_after = torch.get_rng_state()  # untouched since the last checkpoint
    half = os.path.join(out, "half.ckpt")
    dynconvert.finetune(tiny(), data, epochs=1, checkpoint=half, verbose=False, **common)
    resumed = tiny()
    dynconvert.finetune(
        resumed, data, epochs=2, resume=half, checkpoint=os.path.join(out, "resumed.ckpt"),
        verbose=False, **common,
    )
    torch.save(
        {
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "state": model.state_dict(),
            "resumed": resumed.state_dict(),
            "history": result.history,
            "rng_after": rng_after,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()
""")


def environment(code: Path | None = None) -> dict[str, str]:
    path = f"{code}{os.pathsep}" if code else ""
    return {
        **os.environ,
        "PYTHONPATH": f"{path}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def torchrun(*args: str | Path, env: dict[str, str], log_dir: Path | None = None):
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", *logs, *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_data_dir(root / "data", per_class=6)
    code = write_tinynet(root)
    (root / "train_ddp.py").write_text(SCRIPT)
    out = root / "out"
    out.mkdir()
    done = torchrun(root / "train_ddp.py", data, out, env=environment(code))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, data, code, out, done


def test_two_gloo_processes_train_identical_parameters_and_rank0_writes(ddp_runs):
    _, _, _, out, done = ddp_runs
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    for rank in ranks:
        losses = [h["train_loss"] for h in rank["history"]]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for key in ("train_loss", "train_top1", "val_top1"):  # reduced over ranks
        assert [h[key] for h in ranks[0]["history"]] == [h[key] for h in ranks[1]["history"]]
    ckpt = torch.load(out / "run.ckpt", weights_only=True)
    assert ckpt["world"] == 2 and ckpt["epoch"] == 2
    assert all(torch.equal(ckpt["model"][k], v) for k, v in ranks[0]["params"].items())
    # 18 images over 2 ranks at batch 4: 4 + 4 per rank and epoch, and the lone ninth
    # dropped (a batch of one cannot train BatchNorm)
    assert ckpt["iteration"] == 4
    correct = ckpt["history"][0]["val_top1"] * 9 / 100  # 9 val images, each counted once
    assert abs(correct - round(correct)) < 1e-9
    names = sorted(p.name for p in out.iterdir())
    expected = ["half.ckpt", "rank0.pt", "rank1.pt", "resumed.ckpt", "run.ckpt"]
    assert names == expected  # and no stray temporary files
    assert (done.stdout + done.stderr).count("epoch 1:") == 1  # only rank 0 prints


def test_checkpoint_keeps_each_ranks_rng_and_resume_matches_uninterrupted_run(ddp_runs):
    _, _, _, out, _ = ddp_runs
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    rng = torch.load(out / "run.ckpt", weights_only=True)["rng"]
    assert len(rng) == 2
    for r in (0, 1):  # entry r is rank r's own state (seeded seed + rank: they differ)
        assert torch.equal(rng[r]["torch"], ranks[r]["rng_after"])
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # resumed after epoch 1 == straight through; with rank 0's RNG on rank 1 (the old way)
    # rank 1's dropout masks, hence the gradients, would differ
    for rank in ranks:
        for key, value in rank["state"].items():
            diff = (rank["resumed"][key].double() - value.double()).abs().max()
            assert diff <= 1e-6, key


def test_resume_with_another_number_of_processes_warns_or_refuses_mid_epoch(
    ddp_runs, tmp_path, monkeypatch
):
    _, data, code, out, _ = ddp_runs
    monkeypatch.syspath_prepend(str(code))
    from tinynet import tiny

    options = dict(batch_size=4, lr=0.05, min_lr=0.05, input_size=16, seed=0, progress=False)
    options.update(temperature_start=5.0, temperature_epochs=2, verbose=False)
    ckpt = tmp_path / "one.ckpt"
    with pytest.warns(UserWarning, match="written by 2 processes, this run has 1"):
        result = dynconvert.finetune(
            tiny(), data, epochs=2, resume=out / "half.ckpt", checkpoint=ckpt, **options
        )
    assert len(result.history) == 2 and torch.isfinite(
        torch.tensor(result.history[1]["train_loss"])
    )
    state = torch.load(ckpt, weights_only=True)
    assert state["world"] == 1 and state["iteration"] == 10  # 18 images at batch 4, 2 epochs
    assert state["scheduler"]["last_epoch"] == 10  # rescaled: 3 + 5 without it
    assert len(state["rng"]) == 1
    mid = torch.load(out / "half.ckpt", weights_only=True)
    mid["batch"] = 1
    torch.save(mid, tmp_path / "mid.ckpt")
    with pytest.raises(DynconvertError, match="saved mid-epoch by 2 processes"):
        dynconvert.finetune(tiny(), data, epochs=2, resume=tmp_path / "mid.ckpt", **options)


def test_pipeline_under_torchrun_writes_and_prints_on_rank0_only(tmp_path):
    data = make_data_dir(tmp_path / "data", per_class=4)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.pt"
    done = torchrun(
        "-m", "dynconvert", "test_resnet", "--no-pretrained", "--k", "2", "--data", data,
        "--epochs", "1", "--batch-size", "4", "--input-size", "32", "--num-classes", "3",
        "--out", out, "--no-progress", "--channels-last",  # a warning on CPU
        env=environment(), log_dir=tmp_path / "logs",
    )  # fmt: skip
    logs = {
        r: "".join(p.read_text() for p in sorted((tmp_path / "logs").rglob(f"{r}/std*.log")))
        for r in (0, 1)
    }
    assert done.returncode == 0, done.stderr[-3000:] + logs[0][-2000:] + logs[1][-2000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.ckpt", "model.pt"]  # no temps
    model = dynconvert.load(out)
    ckpt = torch.load(out_dir / "model.ckpt", weights_only=True)
    assert ckpt["world"] == 2
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    for marker in (f"saved {out}", "after fine-tuning", "convs converted", "channels_last"):
        assert marker in logs[0], marker
    for marker in ("saved", "after fine-tuning", "convs converted", "epoch 1", "Warning"):
        assert marker not in logs[1], (marker, logs[1][-2000:])
