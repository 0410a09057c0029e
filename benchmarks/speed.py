"""Measured inference speed-up of a depth-pruned model over its dense base, as a markdown table.

The same measurement as ``evop bench`` (see :mod:`evop.eval.speed` for exactly what is timed),
as a script. The pruned model is either a checkpoint directory or made in memory from the dense
one by a pattern (``--pattern``, the one-line form ``"4,5,6,16,17,18/30"``). Both run on
identical prompts, alternating run by run::

    python benchmarks/speed.py runs/demo/pruned-model --base evop-assets:smollm2
    python benchmarks/speed.py --base evop-assets:smollm2 --pattern 4,5,6,16,17,18/30 --runs 5
    python benchmarks/speed.py --base meta-llama/Llama-3.1-8B --pattern 20,22,24,25,26,27,28,29/32 \\
        --device cuda --dtype bfloat16 --prompt-len 512 --new-tokens 128 --batch-size 8 --json speed.json
"""

from __future__ import annotations

import sys

from evop.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
