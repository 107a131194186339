"""Issue 4 research: start the K kernels from K experts trained on clusters of the data.

Every run that kept accuracy left the router near uniform (docs/results.md): random zero-sum
kernel differences give it no direction the data prefers. This script tests kernels that
already differ in useful directions, in the spirit of "branch-train-mix":

1. k-means (K clusters) of the trained ResNet-20's pooled features over the training set;
2. K static copies fine-tuned, each on its own cluster only (``--branch-epochs``);
3. a dynamic model whose kernel k in every dynamic conv is expert k's conv, everything else
   (stem, norms, head) the experts' mean; the router starts uniform, so the converted model
   computes the "soup" of the experts;
4. the recipe's fine-tuning of that model (``--epochs``), and with ``--static-soup`` the same
   fine-tuning of the static soup, its fair static control.

    python benchmarks/cifar10_branch_mix.py --branch-epochs 2 --epochs 3 --static-soup
    python benchmarks/cifar10_branch_mix.py --subset 2000 --branch-epochs 1 --epochs 1  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import Subset

import dynconvert
from dynconvert.layers import DynamicConvNd

from cifar10_resnet20 import (  # isort: skip  (the benchmark beside this script)
    DEFAULT_ARCHIVES,
    DEFAULT_CACHE,
    DEFAULT_RECIPE,
    DEFAULT_WEIGHTS,
    CifarTensors,
    apply_overrides,
    cifar_resnet20,
    correct_count,
    decoded_split,
    load_settings,
)


@torch.no_grad()
def pooled_features(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """The head's input (global-pooled last stage) for every image, L2-normalised."""
    plain = CifarTensors(images, labels, augment=False)
    captured = []
    hook = model.linear.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    model.eval()
    for start in range(0, len(labels), 1000):
        model(torch.stack([plain[i][0] for i in range(start, min(start + 1000, len(labels)))]))
    hook.remove()
    return torch.nn.functional.normalize(torch.cat(captured), dim=1)


def spherical_kmeans(features: torch.Tensor, k: int, seed: int, steps: int = 50) -> torch.Tensor:
    """Cluster index of every row (cosine k-means, seeded start)."""
    generator = torch.Generator().manual_seed(seed)
    centers = features[torch.randperm(len(features), generator=generator)[:k]].clone()
    for _ in range(steps):
        assign = (features @ centers.T).argmax(1)
        for c in range(k):
            if (assign == c).any():
                centers[c] = torch.nn.functional.normalize(features[assign == c].mean(0), dim=0)
    return (features @ centers.T).argmax(1)


def quiet_finetune(model: torch.nn.Module, data, options: dict) -> None:
    with warnings.catch_warnings():  # static experts and the static soup are static on purpose
        warnings.filterwarnings("ignore", message="model has no dynamic layers")
        dynconvert.finetune(model, data, None, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--branch-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=None, help="training images (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--static-soup", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(DEFAULT_RECIPE)
    apply_overrides(settings, args.overrides)
    recipe = {**settings["finetune"], **{k: v for k, v in settings["data"].items() if k != "path"}}
    recipe = {k: v for k, v in recipe.items() if k != "distill"}
    x_train, y_train = decoded_split(DEFAULT_ARCHIVES, DEFAULT_CACHE, "train")
    x_val, y_val = decoded_split(DEFAULT_ARCHIVES, DEFAULT_CACHE, "val")
    if args.subset:
        keep = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))
        x_train, y_train = x_train[keep[: args.subset]], y_train[keep[: args.subset]]
    train = CifarTensors(x_train, y_train, augment=True)
    original = cifar_resnet20(DEFAULT_WEIGHTS)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    started = time.time()

    # 1. Clusters of the data, as the trained model sees it.
    assign = spherical_kmeans(pooled_features(original, x_train, y_train), args.k, args.seed)
    log["cluster_classes"] = [
        torch.bincount(y_train[assign == c], minlength=10).tolist() for c in range(args.k)
    ]
    print("clusters (images per class):", log["cluster_classes"], flush=True)

    # 2. Branch: one static expert per cluster.
    experts = []
    for c in range(args.k):
        expert = copy.deepcopy(original)
        members = torch.nonzero(assign == c).flatten().tolist()
        options = dict(recipe, epochs=args.branch_epochs, seed=args.seed + c, progress=False,
                       verbose=False, warmup_epochs=0.15 * args.branch_epochs)  # fmt: skip
        quiet_finetune(expert, Subset(train, members), options)
        experts.append(expert)
        log.setdefault("expert_correct", []).append(correct_count(expert, x_val, y_val))
        print(f"expert {c}: {log['expert_correct'][-1]} correct", flush=True)

    # 3. Mix: the experts' mean everywhere, their own kernels in the dynamic convs.
    soup = copy.deepcopy(original)
    states = [e.state_dict() for e in experts]
    soup.load_state_dict(
        {
            name: torch.stack([s[name].float() for s in states]).mean(0).to(value.dtype)
            for name, value in soup.state_dict().items()
        }
    )
    convert_options = {"k": args.k, "skip_stem": True, **settings["convert"], "noise": 0.0}
    dynamic, _ = dynconvert.convert(
        copy.deepcopy(soup), example_input=torch.zeros(2, 3, 32, 32), **convert_options
    )
    with torch.no_grad():
        for name, module in dynamic.named_modules():
            if isinstance(module, DynamicConvNd):
                for c, expert in enumerate(experts):
                    module.weight[c].copy_(expert.get_submodule(name).weight)
    log["soup_correct"] = correct_count(soup, x_val, y_val)
    log["dynamic_start_correct"] = correct_count(dynamic, x_val, y_val)
    print(f"soup {log['soup_correct']}, dynamic start {log['dynamic_start_correct']}", flush=True)

    # 4. Fine-tune with the recipe (and the static soup the same way).
    options = dict(recipe, epochs=args.epochs, seed=args.seed, progress=False, verbose=False)
    torch.manual_seed(args.seed)
    quiet_finetune(dynamic, train, options)
    log["dynamic_correct"] = correct_count(dynamic, x_val, y_val)
    print(f"dynamic fine-tuned {log['dynamic_correct']}", flush=True)
    if args.static_soup:
        torch.manual_seed(args.seed)
        quiet_finetune(soup, train, options)
        log["static_soup_correct"] = correct_count(soup, x_val, y_val)
        print(f"static soup fine-tuned {log['static_soup_correct']}", flush=True)
    log["seconds"] = round(time.time() - started)
    if args.json:
        args.json.write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
