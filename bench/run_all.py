"""Run every benchmark in bench/ and leave their results in bench/results/.

python -m bench.run_all [--quick]
"""

from __future__ import annotations

import sys

from bench import data_layer

BENCHMARKS = {"data_layer": data_layer.main}


def main(argv: list[str] | None = None) -> dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    return {name: fn(argv) for name, fn in BENCHMARKS.items()}


if __name__ == "__main__":
    main()
