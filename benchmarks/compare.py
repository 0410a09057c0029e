"""EvoP against the baseline search methods, side by side: markdown table plus JSON.

The same measurement as ``evop compare`` (see :mod:`evop.eval.compare`), as a script::

    python benchmarks/compare.py --config configs/compare-demo.yaml            # the README table
    python benchmarks/compare.py --config my-gpu.yaml --sparsities 0.25 --optimum-k 0 \\
        model.name_or_path=meta-llama/Llama-3.1-8B model.device=cuda

Re-running with the same config continues where the last run stopped (``<out>/compare.json``
and the score memos).
"""

from __future__ import annotations

import sys

from evop.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
