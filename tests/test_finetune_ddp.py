"""DDP: the same fine-tuning under ``torchrun --nproc_per_node 2`` (gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from test_finetune import make_data_dir, write_tinynet

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import dynconvert
    from tinynet import tiny

    data, out = sys.argv[1], sys.argv[2]
    model = tiny()
    result = dynconvert.finetune(
        model, data, epochs=2, batch_size=4, lr=0.05, input_size=16, seed=0,
        temperature_start=5.0, checkpoint=os.path.join(out, "run.ckpt"), progress=False,
    )
    rank = int(os.environ["RANK"])
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"params": params, "history": result.history}, os.path.join(out, f"rank{rank}.pt"))
""")


def test_two_gloo_processes_train_identical_parameters_and_rank0_writes(tmp_path):
    data = make_data_dir(tmp_path / "data", per_class=6)
    code = write_tinynet(tmp_path)
    (tmp_path / "train_ddp.py").write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "train_ddp.py"),
            str(data),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
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
    # 18 images over 2 ranks at batch 4: 3 iterations per rank and epoch
    assert ckpt["iteration"] == 6
    correct = ckpt["history"][0]["val_top1"] * 9 / 100  # 9 val images, each counted once
    assert abs(correct - round(correct)) < 1e-9
    assert sorted(p.name for p in out.iterdir()) == ["rank0.pt", "rank1.pt", "run.ckpt"]
    assert (done.stdout + done.stderr).count("epoch 1:") == 1  # only rank 0 prints
