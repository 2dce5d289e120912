"""The claims ledger: one JSON file per (notebook, tier), collected into ``results/CLAIMS.md``.

Each reproduction notebook ends with a list of :class:`Claim` objects built from its measured
numbers (verdicts come from :func:`structlora.repro.stats.decide`, never typed by hand) and calls::

    write_claims("01_main_results", TIER, claims)       # -> results/claims/01_main_results.<tier>.json

``python -m structlora reproduce`` ends with :func:`build_ledger`, which collects the files of one
tier (``cpu`` by default) into ``results/CLAIMS.md`` (a markdown table) and ``results/claims.csv``.
The tier is part of every file name, so a smoke run never overwrites cpu-tier claims.
(~410 lines: the Claim record, its builders and the ledger that renders them change together.)

The primary families and their family-wise decision (`decide_family`) are `structlora.repro.claim_families`;
their names are re-exported here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from .._io import atomic_write
from .claim_families import MECHANISM, SAME_COMPARISON, decide_family, primary_families

__all__ = [
    "claim_line",
    "Claim",
    "collapse_status",
    "write_claims",
    "read_claims",
    "build_ledger",
    "format_diff",
    "claim_from_test",
    "VERDICTS",
    "TIERS",
    "MECHANISM",
    "decide_family",
    "primary_families",
    "SAME_COMPARISON",
]

VERDICTS = ("reproduced", "smaller than claimed", "not reproduced", "inconclusive", "undecidable at this scale",
            "untestable (arms identical)", "skipped", "pending")

TIERS = ("smoke", "cpu", "gpu", "paper")

def _num(x) -> float | None:
    """float or None (NaN/inf/None -> None), so JSON stays valid."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def format_diff(diff: float | None, std: float | None = None, ci_low: float | None = None,
                ci_high: float | None = None, digits: int = 1) -> str:
    """``"+0.8 ± 1.2 (95% CI [-1.1, 2.7])"``; parts that are None/NaN are left out."""
    diff, std, ci_low, ci_high = map(_num, (diff, std, ci_low, ci_high))
    if diff is None:
        return "n/a"
    s = f"{diff:+.{digits}f}"
    if std is not None:
        s += f" ± {std:.{digits}f}"
    if ci_low is not None and ci_high is not None:
        s += f" (95% CI [{ci_low:.{digits}f}, {ci_high:.{digits}f}])"
    return s


@dataclass
class Claim:
    """One claim of the paper, checked against our measured numbers.

    claim_id    short unique id within the notebook, e.g. ``"T1.sst2.structlora>lora"``
    notebook    notebook stem, e.g. ``"01_main_results"``
    claim       the claim in words
    paper_value what the paper reports, e.g. ``"+1.4 (Table 1)"``
    ours        what we measured, e.g. ``"+0.8 ± 1.2 (95% CI [-1.1, 2.7])"`` (see :func:`format_diff`)
    ours_value  the measured number (diff mean) or None
    ci_low/ci_high  95% CI of ``ours_value`` or None
    n           number of paired seeds (or runs) behind the number
    tier        ``smoke`` | ``cpu`` | ``gpu``
    verdict     from :func:`structlora.repro.stats.decide` (or ``"skipped"`` when nothing ran)
    note        free text: scale caveats, stand-ins, why skipped
    p, paper_diff   the test's p-value and the paper's difference (the ledger re-decides primary claims
                with Holm-adjusted p from them)
    arms_identical  the manipulation check failed (the two arms predicted the same)
    seeds_required  the power analysis' seeds for a half-width of half the paper's effect (or None)
    same_as     the claim this one repeats when the data make it the same comparison (e.g. the best
                other PEFT method chosen on validation is LoRA: the same runs as StructLoRA vs LoRA);
                the ledger points to it instead of counting it (static repeats: `SAME_COMPARISON`)
    margin      the verdict's margin when it is not half the paper's effect (0 for a claim of direction
                only); the ledger's Holm re-decision uses it too
    """

    claim_id: str
    notebook: str
    claim: str
    paper_value: str
    ours: str
    ours_value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    tier: str
    verdict: str
    note: str = ""
    p: float | None = None
    paper_diff: float | None = None
    arms_identical: bool = False
    seeds_required: int | None = None
    same_as: str = ""
    margin: float | None = None

    def __post_init__(self):
        self.ours_value = _num(self.ours_value)
        self.ci_low = _num(self.ci_low)
        self.ci_high = _num(self.ci_high)
        try:
            self.n = int(self.n)
        except (TypeError, ValueError):
            self.n = 0
        self.paper_value = str(self.paper_value)
        self.p, self.paper_diff, self.margin = _num(self.p), _num(self.paper_diff), _num(self.margin)
        self.arms_identical = bool(self.arms_identical)
        self.seeds_required = None if self.seeds_required is None else int(self.seeds_required)
        self.ours = str(self.ours)
        self.same_as = "" if self.same_as is None or self.same_as != self.same_as else str(self.same_as)
        if self.verdict not in VERDICTS:
            raise ValueError(f"Claim {self.claim_id!r}: verdict {self.verdict!r} not in {VERDICTS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _get(row, key, default=None):
    if row is None:
        return default
    if hasattr(row, "get"):
        return row.get(key, default)
    return getattr(row, key, default)


def claim_from_test(claim_id: str, notebook: str, tier: str, claim: str, test, paper_diff: float | None,
                    paper_value: str | None = None, note: str = "", digits: int = 1,
                    degenerate: str = "", arms_identical: bool = False, seeds_required: int | None = None,
                    seeds_cap: int | None = None, margin: float | None = None, same_as: str = "",
                    pending: int = 0, unfunded: str = "") -> Claim:
    """A :class:`Claim` from one row of :func:`structlora.repro.stats.paired_test` (a dict / Series / namedtuple
    with ``diff_mean``, ``ci_low``, ``ci_high``, ``p``, ``n`` and optionally ``diff_std``).

    The verdict is :func:`structlora.repro.stats.decide` of the measured numbers against ``paper_diff``
    (``margin`` overrides its half-effect margin: 0 for a claim of direction only, "> 0" in the paper;
    with the manipulation check ``arms_identical``, also read from the test row, and the power
    analysis: ``seeds_required``, or computed by `stats.seeds_needed` from the row's ``diff_std`` when
    ``seeds_cap`` is given; more than the cap makes the claim *undecidable at this scale*; a claim of
    direction only has no effect to plan for and runs to the cap: once there, the seeds are those a
    difference of the observed size needs for its 95% interval to exclude 0, so a difference that stays
    non-significant at the cap is *undecidable at this scale* too);
    ``test=None`` (nothing ran) gives verdict ``"skipped"`` with ``note`` saying why, or ``"pending"``
    when ``pending`` runs of the notebook have no record (records-only mode: `grid.pending_count` of its
    grid's frame), or *undecidable at this scale* when ``unfunded`` says why the registered budget did not
    run it (`plan.Plan.unfunded_note`); a claim made while runs are pending says so in its note (its seeds may be partial). A non-empty
    ``degenerate`` (why the comparison tests nothing, e.g. every run of both methods collapsed to one
    class, see :func:`structlora.repro.stats.single_class_runs`) makes the verdict ``"inconclusive"`` whatever
    the numbers say, and is prepended to the note.
    """
    from .stats import decide

    pv = paper_value if paper_value is not None else (format_diff(paper_diff, digits=digits)
                                                      if paper_diff is not None else "n/a")
    if pending:
        note = (f"partial: {pending} run(s) of this notebook have no record yet "
                "(python -m structlora reproduce --train-pending); " + note).rstrip("; ")
    if test is None:
        verdict = "undecidable at this scale" if unfunded else "pending" if pending else "skipped"
        return Claim(claim_id, notebook, claim, pv, "not run", None, None, None, 0, tier, verdict,
                     "; ".join(x for x in (unfunded, note) if x))
    d, lo, hi, p = (_num(_get(test, k)) for k in ("diff_mean", "ci_low", "ci_high", "p"))
    n = _get(test, "n", 0)
    std = _num(_get(test, "diff_std", _get(test, "std")))
    arms_identical = bool(arms_identical or _get(test, "arms_identical", False))
    direction_only = margin is not None and margin == 0
    if seeds_required is None and seeds_cap is not None and std is not None and paper_diff:
        from .stats import seeds_needed

        if not direction_only:
            seeds_required = seeds_needed(std, paper_diff, max_n=10 * seeds_cap)
        elif n and int(n) >= seeds_cap and d is not None:
            # "> 0" with no number: no effect to plan for, so the claim runs to the cap; there, the seeds
            # a difference of the observed size would need for its 95% interval to exclude 0
            seeds_required = seeds_needed(std, d, fraction=1.0, max_n=10 * seeds_cap)
    v = "inconclusive" if degenerate else decide(d, lo, hi, p, paper_diff, arms_identical=arms_identical,
                                                     seeds_required=seeds_required, seeds_cap=seeds_cap,
                                                     margin=margin)
    if seeds_required is not None and v == "undecidable at this scale":
        need = (f"more than {10 * seeds_cap}" if seeds_required > 10 * seeds_cap else str(seeds_required))
        why = (f"direction only: at the cap the interval still includes 0; a difference of the observed size "
               f"({format_diff(d, digits=digits)}) needs {need} paired seeds to exclude 0"
               if direction_only else f"needs {need} paired seeds")
        note = f"{why} (cap {seeds_cap}); " + note
    note = "; ".join(x for x in (degenerate, note) if x)
    return Claim(claim_id, notebook, claim, pv, format_diff(d, std, lo, hi, digits=digits), d, lo, hi,
                 int(n or 0), tier, v, note, p=p, paper_diff=paper_diff, arms_identical=arms_identical,
                 seeds_required=seeds_required, same_as=same_as, margin=margin)


def claim_line(c: Claim, note: bool = False) -> str:
    """One markdown bullet of a notebook's closing summary: id, claim, paper, ours, n, verdict (and note)."""
    line = f"- **{c.claim_id}** — {c.claim}: paper {c.paper_value}; ours {c.ours} (n={c.n}) → **{c.verdict}**"
    return line + (f" ({c.note})" if note and c.note else "")


def collapse_status(runs: pd.DataFrame, column: str = "single_class") -> tuple[str, str]:
    """``(degenerate, note)`` for :func:`claim_from_test` from the runs behind one comparison.

    ``runs`` has a boolean ``column`` (see :func:`structlora.repro.stats.single_class_runs`). When every run
    predicts a single class the comparison tests nothing (``degenerate`` says so); when some do, the
    note counts them and the verdict stays the statistics' own.
    """
    n, k = len(runs), int(runs[column].sum()) if len(runs) else 0
    if n and k == n:
        return f"all {n} runs of both methods predict a single class (this budget does not train them)", ""
    return "", (f"{k} of {n} runs predict a single class" if k else "")


def _claims_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "claims"


def write_claims(notebook: str, tier: str, claims: Iterable[Claim], root: str | os.PathLike = "results") -> Path:
    """Write ``<root>/claims/<notebook>.<tier>.json`` atomically and return its path."""
    claims = list(claims)
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r} not in {TIERS}")
    ids = [c.claim_id for c in claims]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate claim ids: {dup}")
    for c in claims:
        if c.tier != tier:
            raise ValueError(f"claim {c.claim_id!r} has tier {c.tier!r}, expected {tier!r}")
        if c.notebook != notebook:
            raise ValueError(f"claim {c.claim_id!r} has notebook {c.notebook!r}, expected {notebook!r}")
    payload = {
        "notebook": notebook,
        "tier": tier,
        "claims": [c.to_dict() for c in claims],
    }
    path = _claims_dir(root) / f"{notebook}.{tier}.json"
    atomic_write(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def read_claims(root: str | os.PathLike = "results", tier: str | None = "cpu") -> pd.DataFrame:
    """All claims of one tier (``None``: every tier) as a DataFrame, plus a ``written`` column."""
    rows = []
    d = _claims_dir(root)
    pattern = f"*.{tier}.json" if tier else "*.json"
    for p in sorted(d.glob(pattern)) if d.exists() else []:
        try:
            payload = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:  # a broken file should not hide the others
            print(f"[claims] skipping unreadable {p}: {e}")
            continue
        for c in payload.get("claims", []):
            rows.append(dict(c))
    cols = [f.name for f in dataclasses.fields(Claim)]
    df = pd.DataFrame(rows, columns=cols)
    if len(df):
        df = df.sort_values(["notebook", "claim_id"], kind="stable").reset_index(drop=True)
    return df


def _verdict_rule() -> str:
    """The rule the ledger prints: the docstring of `stats.decide`, the one rule every verdict uses."""
    import inspect

    from .stats import decide

    return inspect.cleandoc(decide.__doc__ or "")


def _md_escape(s) -> str:
    s = "" if s is None or (isinstance(s, float) and math.isnan(s)) else str(s)
    return s.replace("|", "\\|").replace("\n", " ")


def _figures_for(root: Path, notebook: str, tier: str) -> list[Path]:
    fig_dir = root / "figures"
    if not fig_dir.exists():
        return []
    return sorted(fig_dir.glob(f"{notebook}_*.{tier}.png"))


_VERDICT_MARK = {"reproduced": "✅ reproduced", "smaller than claimed": "🔽 smaller than claimed",
                 "not reproduced": "❌ not reproduced", "inconclusive": "❔ inconclusive", "skipped": "⏭ skipped",
                 "pending": "⏳ pending"}


def _fmt_interval(lo: float, hi: float) -> str:
    return "" if lo != lo or hi != hi else f"[{lo:.1f}, {hi:.1f}]"


def _primary_summary(df: pd.DataFrame) -> list[str]:
    """The ledger's first tables: per primary family, every claim with its family-wise interval, the
    seeds the plan gives it and those run (``n``), the seeds the power analysis asks for
    (``seeds_required``), its Holm-adjusted p and its verdict."""
    out: list[str] = []
    for name in ("headline", "mechanism"):
        prim = df[df["family"] == name] if len(df) else df
        if not len(prim):
            continue
        m = prim["m"].dropna()
        out += [f"## Primary family: {name} (Bonferroni family-wise intervals, m = {int(m.iloc[0]) if len(m) else 0})", "",
                "| claim id | paper | ours (95% CI) | family-wise CI | seeds planned | seeds run | seeds needed "
                "| p (Holm) | verdict |", "|---|---|---|---|---:|---:|---:|---|---|"]
        for r in prim.itertuples(index=False):
            need = r.seeds_required if r.seeds_required == r.seeds_required and r.seeds_required is not None else None
            ph = "" if r.p_holm != r.p_holm else f"{r.p_holm:.3g}"
            shown = "" if need is None else str(int(need))
            if need is not None and f"more than {int(need) - 1} " in str(r.note):   # seeds_needed's max_n + 1
                shown = f"> {int(need) - 1}"
            planned = "" if r.seeds_planned is None or r.seeds_planned != r.seeds_planned else str(int(r.seeds_planned))
            out.append(f"| {_md_escape(r.claim_id)} | {_md_escape(r.paper_value)} | {_md_escape(r.ours)} | "
                       f"{_fmt_interval(r.ci_fw_low, r.ci_fw_high)} | {planned} | {int(r.n)} | {shown} | {ph} | "
                       f"{_VERDICT_MARK.get(r.verdict, r.verdict)} |")
        out.append("")
    return out


def build_ledger(root: str | os.PathLike = "results", tier: str | None = None) -> pd.DataFrame:
    """Collect ``<root>/claims/*.<tier>.json`` into ``<root>/CLAIMS.md`` and ``<root>/claims.csv``.

    ``tier=None`` means the cpu tier (the reference tier of the collection); a smoke-tier ledger
    goes to ``CLAIMS.smoke.md`` / ``claims.smoke.csv`` so it never replaces the cpu one.
    Returns the ledger DataFrame.
    """
    root = Path(root)
    tier = tier or "cpu"
    df = decide_family(read_claims(root, tier=tier), primary_families(tier))
    suffix = "" if tier == "cpu" else f".{tier}"
    csv_path = root / f"claims{suffix}.csv"
    md_path = root / f"CLAIMS{suffix}.md"
    root.mkdir(parents=True, exist_ok=True)

    tmp_csv = df.to_csv(index=False)
    atomic_write(csv_path, tmp_csv)

    counted = df[~df["verdict"].astype(str).str.startswith("see ")] if len(df) else df
    counts = counted["verdict"].value_counts().to_dict() if len(counted) else {}
    lines = [
        "# Claims ledger",
        "",
        f"Tier: **{tier}** · {len(counted)} distinct claims"
        + (" · " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) if counts else ""),
        "",
        "Generated by `python -m structlora reproduce` from `results/claims/*." + tier + ".json` "
        "(one file per notebook, written by the notebook's last cells). Do not edit by hand.",
        "",
    ]
    lines += _primary_summary(df)
    lines += [
        "## Verdict rule",
        "",
        "Every verdict is computed by `structlora.repro.stats.decide` from the measured numbers. The two "
        "pre-registered primary families (headline: `params/cpu/plan.yml`; mechanism: `claims.MECHANISM`) "
        "are decided from Bonferroni family-wise intervals (confidence 1 - 0.05/m), so every verdict branch "
        "holds with family-wise error <= 0.05 (Holm-adjusted p shown for reference); every other claim is "
        "exploratory (raw 95% interval). A repeated comparison points to its claim.",
        "",
    ]
    lines += ["> " + ln if ln else ">" for ln in _verdict_rule().splitlines()]
    lines += [
        "",
        "`ours` is StructLoRA minus the baseline in accuracy points (mean ± std over paired seeds, "
        "95% CI of the paired t-test) unless the claim says otherwise; `n` is the number of paired seeds. "
        "Our models are small stand-ins (MiniLM-L6, SmolLM2-135M, a tiny ViT) trained for short budgets, "
        "so a claim that is *not reproduced* here says what happens at our scale, not that the paper is wrong.",
        "",
    ]
    if not len(df):
        lines += [f"_No claims found for tier `{tier}` under `{_claims_dir(root)}`._", ""]
    for nb, g in df.groupby("notebook", sort=True):
        lines += [f"## {nb}", ""]
        executed = root / "executed" / f"{nb}.{tier}.ipynb"
        links = []
        if executed.exists():
            links.append(f"[executed notebook](executed/{executed.name})")
        links += [f"[{p.stem}](figures/{p.name})" for p in _figures_for(root, nb, tier)]
        if links:
            lines += ["Artifacts: " + " · ".join(links), ""]
        lines += [
            "| claim id | family | claim | paper | ours | n | p (Holm) | verdict | note |",
            "|---|---|---|---|---|---:|---|---|---|",
        ]
        for r in g.itertuples(index=False):
            vtxt = _VERDICT_MARK.get(r.verdict, r.verdict)
            ph = "" if r.p_holm != r.p_holm else f"{r.p_holm:.3g}"
            lines.append(
                f"| {_md_escape(r.claim_id)} | {r.family} | {_md_escape(r.claim)} | {_md_escape(r.paper_value)} | "
                f"{_md_escape(r.ours)} | {int(r.n)} | {ph} | {vtxt} | {_md_escape(r.note)} |"
            )
        lines.append("")
    atomic_write(md_path, "\n".join(lines))
    return df
