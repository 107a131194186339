"""Coverage of dynconvert.convert over timm: converted/total convs, skip reasons, exactness, time.

For each architecture (``pretrained=False``, small input): randomise BatchNorm statistics and
affine parameters, record eval- and train-mode outputs, convert, and compare
(max |after − before| / max |before|, which must stay ≤ 1e-4). Prints a rich table per model
and a summary: convs converted exactly / total, and the reasons for the rest.

    HF_HUB_OFFLINE=1 python benchmarks/timm_coverage.py            # the full list
    HF_HUB_OFFLINE=1 python benchmarks/timm_coverage.py --fast     # the CI subset
    HF_HUB_OFFLINE=1 python benchmarks/timm_coverage.py resnet18 vit_tiny_patch16_224

``tests/test_convert_timm.py`` imports :data:`CASES` and :func:`check` from here.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
from torch import nn

import dynconvert

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    size: int = 64
    create: dict[str, Any] = field(default_factory=dict)
    convert: dict[str, Any] = field(default_factory=dict)
    fast: bool = True  # part of the CI subset
    # Train-mode BatchNorm over batch × (tiny) spatial values is ill-conditioned with very few
    # values (two values normalise to ±1); models that end at 1×1 tokens need a larger batch.
    batch: int = 2
    channels: int = 3

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)


def _vit(name: str, family: str, size: int = 64, fast: bool = True) -> Case:
    # a plain ViT's only conv is the patch embedding, which is also its stem
    return Case(name, family, size, {"img_size": size}, {"skip_stem": False}, fast=fast)


CASES: list[Case] = [
    # ResNet / ResNeXt / SE
    Case("resnet10t", "resnet"),
    Case("resnet18", "resnet", fast=False),
    Case("resnext26ts", "resnet"),
    Case("legacy_seresnet18", "resnet"),
    Case("skresnet18", "resnet"),
    Case("ecaresnet26t", "resnet", fast=False),
    Case("seresnext26d_32x4d", "resnet", fast=False),
    Case("resnetv2_50", "resnet", fast=False),
    # BiT ResNetV2 (StdConv2d), narrowed to stay small
    Case(
        "resnetv2_50x1_bit", "resnetv2", create={"channels": [128, 128, 256, 256], "stem_chs": 32}
    ),
    Case("resnetv2_50x1_bit", "resnetv2", fast=False),
    # RegNet
    Case("regnetx_002", "regnet"),
    Case("regnety_002", "regnet"),
    Case("regnetz_005", "regnet"),
    # EfficientNet / MobileNet
    Case("efficientnet_b0", "efficientnet"),
    Case("tf_efficientnet_b0", "efficientnet"),  # Conv2dSame
    Case("efficientnet_cc_b0_4e", "efficientnet"),  # CondConv2d
    Case("mixnet_s", "efficientnet"),  # MixedConv2d
    Case("tf_mixnet_s", "efficientnet", fast=False),
    Case("mobilenetv2_050", "mobilenet"),
    Case("mobilenetv3_small_050", "mobilenet"),
    Case("tf_mobilenetv3_small_minimal_100", "mobilenet"),
    Case("mnasnet_050", "mobilenet"),
    Case("lcnet_050", "mobilenet"),
    Case("tinynet_e", "efficientnet"),
    Case("fbnetc_100", "mobilenet", fast=False),
    Case("hardcorenas_a", "mobilenet", fast=False),
    # ConvNeXt
    Case("convnext_atto", "convnext"),
    Case("convnextv2_atto", "convnext"),
    # DenseNet
    Case("densenet121", "densenet"),
    Case("densenetblur121d", "densenet", fast=False),
    # VGG: its head is a 7×7 conv with 100M weights; kept static to stay small
    Case("vgg11", "vgg", convert={"exclude": ["pre_logits.*"]}),
    Case("vgg11_bn", "vgg", convert={"exclude": ["pre_logits.*"]}, fast=False),
    # DLA
    Case("dla46_c", "dla", batch=4),
    Case("dla34", "dla", fast=False),
    # HRNet
    Case("hrnet_w18_small", "hrnet"),
    # RepVGG / MobileOne
    Case("repvgg_a0", "repvgg"),
    Case("mobileone_s0", "mobileone", batch=4, fast=False),
    # CSP / Darknet
    Case("cs3darknet_s", "csp"),
    Case("cspresnet50", "csp", fast=False),
    Case("darknet17", "csp", fast=False),
    # GhostNet
    Case("ghostnet_050", "ghostnet"),
    Case("ghostnetv2_100", "ghostnet", fast=False),
    # Res2Net / ResNeSt
    Case("res2net50_14w_8s", "res2net", batch=4, fast=False),
    Case("resnest14d", "resnest"),
    # NFNet
    Case("nf_regnet_b0", "nfnet"),
    Case("nf_resnet26", "nfnet"),  # ScaledStdConv2d
    Case("dm_nfnet_f0", "nfnet", fast=False),  # ScaledStdConv2dSame
    Case("nfnet_l0", "nfnet", fast=False),
    # hybrids with conv stems
    Case("coatnet_0_rw_224", "coatnet", 64, {"img_size": 64}, fast=False),
    Case("coatnet_nano_rw_224", "coatnet", 64, {"img_size": 64}),
    Case("mobilevit_xxs", "mobilevit"),
    Case("mobilevitv2_050", "mobilevit"),
    Case("levit_128s", "levit", 64, {"img_size": 64}, batch=8),
    Case("levit_conv_128s", "levit", 64, {"img_size": 64}, batch=8),
    Case("efficientvit_b0", "efficientvit"),
    Case("efficientvit_m0", "efficientvit", 64, {"img_size": 64}, batch=8),
    Case("edgenext_xx_small", "edgenext"),
    Case("fastvit_t8", "fastvit", fast=False),
    # plain ViTs: the patch embedding conv
    _vit("vit_tiny_patch16_224", "vit"),
    _vit("deit_tiny_patch16_224", "vit", fast=False),
    # ViT hybrid: a BiT ResNetV2 backbone with StdConv2dSame
    Case("vit_small_r26_s32_224", "vit", 64, {"img_size": 64}, fast=False),
    # more families
    Case("rexnet_100", "rexnet", batch=8, fast=False),
    Case("ese_vovnet19b_dw", "vovnet", fast=False),
    Case("selecsls42b", "selecsls", batch=8, fast=False),
    Case("gernet_s", "byobnet", fast=False),
    Case("hgnetv2_b0", "hgnet"),
    Case("repghostnet_050", "ghostnet", fast=False),
    Case("inception_next_atto", "inception"),
    Case("inception_v3", "inception", 160, batch=8, fast=False),
    Case("xception41", "xception", fast=False),
    Case("dpn48b", "dpn", fast=False),
    Case("starnet_s050", "starnet"),
    Case("poolformerv2_s12", "metaformer", fast=False),
    Case("tresnet_m", "tresnet", fast=False),
]


def randomise_norms(model: nn.Module, seed: int = 1) -> None:
    """Random BatchNorm statistics and affine parameters, and no zero- or tiny-init gains.

    Zero-initialised gains (NFNet's last conv gain, skip-init, zero biases) and tiny layer
    scales (ConvNeXt's 1e-6) would hide whole residual branches from the comparison.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and p.abs().max() < 1e-3:
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif p.dim() <= 1 or name.rsplit(".", 1)[-1] in ("gain", "gamma"):
                    p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _flat(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().flatten(1)
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat(o) for o in out], dim=1)


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval- and train-mode outputs; the train forward's BatchNorm updates are undone."""
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.eval()
        out_eval = _flat(model(x))
        model.train()
        torch.manual_seed(123)  # same dropout / drop-path draws before and after
        out_train = _flat(model(x))
    model.load_state_dict(state)
    model.eval()
    return {"eval": out_eval, "train": out_train}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@dataclass
class Result:
    case: Case
    report: Any
    errors: dict[str, float]
    seconds: float

    @property
    def exact(self) -> bool:
        return all(e <= TOLERANCE for e in self.errors.values())


def check(case: Case) -> Result:
    torch.manual_seed(0)
    return check_model(timm.create_model(case.name, pretrained=False, **case.create), case)


def check_model(model: nn.Module, case: Case) -> Result:
    """Convert ``model`` (built for ``case``) in place; compare its outputs with the original's."""
    randomise_norms(model)
    x = torch.randn(case.batch, *case.input_size, generator=torch.Generator().manual_seed(2))
    before = outputs(model, x)
    start = time.perf_counter()
    converted, report = dynconvert.convert(model, input_size=case.input_size, **case.convert)
    seconds = time.perf_counter() - start
    assert converted is model
    after = outputs(model, x)
    errors = {mode: rel_err(after[mode], before[mode]) for mode in before}
    return Result(case, report, errors, seconds)


def skipped_reasons(case: Case) -> dict[str, int]:
    """Why each conv of a model with nothing convertible was skipped (the model is unchanged)."""
    from dynconvert.convert.config import ConvertConfig
    from dynconvert.convert.discover import discover
    from dynconvert.convert.select import decide

    model = timm.create_model(case.name, pretrained=False, **case.create)
    config = ConvertConfig(input_size=case.input_size, **case.convert)
    counts: dict[str, int] = {}
    for decision in decide(model, discover(model, case.input_size).sites, config):
        counts[decision.reason] = counts.get(decision.reason, 0) + 1
    return counts


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: the whole list)")
    parser.add_argument("--fast", action="store_true", help="only the CI subset")
    parser.add_argument("--tables", action="store_true", help="print each model's conv table")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = [c for c in CASES if (not args.fast or c.fast)]
    if args.models:
        known = {c.name: c for c in CASES}
        cases = [known.get(n, Case(n, "other")) for n in args.models]

    console = Console(width=160)
    summary = Table(title="timm coverage of dynconvert.convert (k=4)")
    for col in ("model", "family", "traced", "converted/total", "eval err", "train err",
                "exact", "convert s", "skip reasons"):  # fmt: skip
        summary.add_column(col)
    results: list[Result] = []
    failures: list[tuple[str, str]] = []
    nothing: list[tuple[str, str]] = []  # models with no convertible conv
    for case in cases:
        try:
            result = check(case)
        except dynconvert.DynconvertError as exc:
            nothing.append((case.name, str(exc), skipped_reasons(case)))
            console.print(f"{case.name}: {exc}", markup=False)
            continue
        except Exception as exc:  # keep going: the summary lists the failures
            failures.append((case.name, f"{type(exc).__name__}: {exc}"[:200]))
            console.print(f"[red]{case.name}: {type(exc).__name__}: {exc}"[:300])
            continue
        results.append(result)
        totals = result.report.totals
        reasons = "; ".join(f"{n}× {r}" for r, n in result.report.skip_reasons().items())
        summary.add_row(
            case.name,
            case.family,
            "yes" if result.report.traced else "no",
            f"{totals['converted']}/{totals['convs']}",
            f"{result.errors['eval']:.1e}",
            f"{result.errors['train']:.1e}",
            "[green]yes[/]" if result.exact else "[red]NO[/]",
            f"{result.seconds:.2f}",
            reasons,
        )
        if args.tables:
            result.report.print(console)
        console.print(
            f"{case.name}: {totals['converted']}/{totals['convs']} converted, "
            f"err eval {result.errors['eval']:.1e} train {result.errors['train']:.1e}, "
            f"{result.seconds:.2f}s"
        )
    console.print(summary)

    exact_convs = sum(r.report.totals["converted"] for r in results if r.exact)
    all_convs = sum(r.report.totals["convs"] for r in results)
    all_convs += sum(sum(counts.values()) for _, _, counts in nothing)
    reasons: dict[str, int] = {}
    for _, _, counts in nothing:
        for reason, n in counts.items():
            reasons[reason] = reasons.get(reason, 0) + n
    for r in results:
        for reason, n in r.report.skip_reasons().items():
            reasons[reason] = reasons.get(reason, 0) + n
    console.print(
        f"\n{len(results)} models checked, {sum(r.exact for r in results)} exact; "
        f"{len(nothing)} with nothing to convert, {len(failures)} failed to run. "
        f"Convs converted exactly: {exact_convs}/{all_convs} "
        f"({100 * exact_convs / max(1, all_convs):.1f}%)."
    )
    console.print("Skipped convs by reason:")
    for reason, n in sorted(reasons.items(), key=lambda item: -item[1]):
        console.print(f"  {n:5d}  {reason}", markup=False)
    for name, message, _ in nothing:
        console.print(f"  nothing converted: {name}: {message}", markup=False)
    for name, message in failures:
        console.print(f"  failed: {name}: {message}", markup=False)


if __name__ == "__main__":
    main()
