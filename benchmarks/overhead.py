#!/usr/bin/env python
"""Overhead of StructLoRA vs peft LoRA (paper Table 7): the command-line face of `structlora.repro.bench`.

    .venv/bin/python benchmarks/overhead.py --quick      # see --help; the same as python -m structlora.repro.bench
"""
from structlora.repro.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
