"""Command line: ``python -m structlora reproduce --tier cpu|gpu|smoke [--only 02] [--force]``.

Also ``python -m structlora ledger [--tier cpu]`` rebuilds ``results/CLAIMS.md`` from the claim files.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m structlora",
                                     description="StructLoRA reproduction collection")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import reproduce

    p = sub.add_parser("reproduce", help="execute the reproduction notebooks and build results/CLAIMS.md")
    reproduce.add_arguments(p)
    p.set_defaults(func=reproduce.main)

    q = sub.add_parser("ledger", help="rebuild results/CLAIMS.md + results/claims.csv from results/claims/")
    q.add_argument("--tier", choices=reproduce.TIERS, default="cpu")
    q.add_argument("--results", default=None, help="results folder (default: <repo>/results)")

    def _ledger(a) -> int:
        from .claims import build_ledger

        results = a.results or str(reproduce.repo_root() / "results")
        df = build_ledger(results, tier=a.tier)
        print(f"{len(df)} claims -> {results}")
        return 0

    q.set_defaults(func=_ledger)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
