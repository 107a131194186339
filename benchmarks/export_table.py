"""Verification table for the export closing note: format x model x batch size, max error.

Each model (random init, converted with k=4, random routers and BatchNorm statistics, as in
``tests/export_models.py``) is exported to every format and verified at batch sizes 1, 3, 8.
Prints a Markdown table with the max abs error, the max |output| and their ratio (the check is
ratio <= 1e-4), and the export and verification seconds::

    HF_HUB_OFFLINE=1 python benchmarks/export_table.py [--models mixed resnet18 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from export_models import MODELS, build, input_size

import dynconvert
from dynconvert.export import FORMATS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = parser.parse_args()
    lines = [
        "| format | model | batch | max abs error | max abs output | relative | export s | verify s"
        " |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model = build(name)
            for fmt in args.formats:
                path = Path(folder) / f"{name}{FORMATS[fmt].suffix}"
                result = dynconvert.export(
                    model, path, fmt, input_size=input_size(name), show=False
                )
                for row in result.rows:
                    lines.append(
                        f"| {fmt} | {name} | {row['batch']} | {row['max_abs_error']:.2e} | "
                        f"{row['max_abs_output']:.2e} | {row['relative_error']:.2e} | "
                        f"{result.export_seconds:.1f} | {result.verify_seconds:.1f} |"
                    )
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
