"""``python -m structlora reproduce|ledger ...``: the reproduction's command line (``[repro]`` extra).

The method itself never imports the reproduction; this entry point only runs when asked for.
"""
import sys

from structlora.repro.cli import main

if __name__ == "__main__":
    sys.exit(main())
