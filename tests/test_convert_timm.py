"""The promise over timm: after convert, outputs equal the original's in eval and train mode.

Parametrised over the CI subset of ``benchmarks/timm_coverage.py`` (≥ 40 architectures over
timm's families, ``pretrained=False``, 64×64 inputs, random BatchNorm statistics); the script
runs the full list and prints coverage and conversion times.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timm_coverage

FAST = [case for case in timm_coverage.CASES if case.fast]


def test_the_subset_spans_the_families_of_the_issue():
    families = {case.family for case in FAST}
    wanted = {"resnet", "regnet", "efficientnet", "mobilenet", "convnext", "densenet", "vgg",
              "dla", "hrnet", "repvgg", "csp", "ghostnet", "resnest", "nfnet",
              "coatnet", "mobilevit", "levit", "efficientvit", "vit"}  # fmt: skip
    assert wanted <= families
    assert len(FAST) >= 40


@pytest.mark.parametrize("case", FAST, ids=[case.name for case in FAST])
def test_converted_timm_model_computes_the_same_function(case):
    result = timm_coverage.check(case)
    totals = result.report.totals
    assert totals["converted"] >= 1
    assert totals["converted"] + totals["skipped"] == totals["convs"]
    for mode, err in result.errors.items():
        assert err <= timm_coverage.TOLERANCE, f"{mode}: rel err {err:.2e}"
