"""Aggregation of a seeded ablation matrix (presets x seeds) into the write-up's table and tests.

With one run per preset, a difference between presets mixes the method with training noise. From
the ``per_case.csv`` of several seeds per preset (``tools/evaluate.py``) this module builds:

* the write-up's table (presets x T1 / T1CE / T2 / FLAIR), each cell mean ± sd over seeds of the
  per-seed means over test cases (:func:`dgseg.evaluation.report.summarize`);
* per cell a 95 % percentile-bootstrap CI over test cases of the seed-averaged per-case Dice
  (Efron & Tibshirani 1993, ch. 13);
* a paired comparison of every preset with each baseline: per test case (matched by id) the
  difference of the seed-averaged Dice, with a bootstrap CI that resamples cases (the same draw
  for both presets) and each preset's seeds (:func:`paired_bootstrap`); a CI excluding 0 is
  marked.

Everything is a pure function of the records; :func:`write_study` writes the files.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dgseg.atomic import atomic_write_text
from dgseg.constants import MODALITIES, REGIONS
from dgseg.evaluation.report import COLUMN_TITLES, format_table, summarize, write_csv, write_json
from dgseg.viz import plot_study_bars

__all__ = [
    "BASELINES",
    "read_records",
    "case_matrix",
    "paired_bootstrap",
    "compare",
    "aggregate",
    "format_markdown",
    "table_rows",
    "paired_rows",
    "write_study",
]

# Baselines every preset is compared with: source only, and its spatial augmentation alone (all
# Bezier / GRL / VFFC presets add flips and rotations, which no-aug lacks).
BASELINES = ("segresnet_t2_noaug", "segresnet_t2_spatial")
_DICE_KEYS = ("dice_mean",) + tuple(f"dice_{r}" for r in REGIONS)
_ID_KEYS = ("model", "checkpoint", "column", "inputs", "case_id")


def read_records(path: str | Path, *, preset: str, seed: int) -> list[dict[str, Any]]:
    """Rows of one run's ``per_case.csv`` as records labelled ``preset`` / ``seed<seed>``.

    ``model`` becomes the preset and ``checkpoint`` the seed (the keys
    :func:`dgseg.evaluation.report.summarize` groups by); metric columns become floats.
    """
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rec: dict[str, Any] = {}
            for k, v in row.items():
                if k in _ID_KEYS or k is None:
                    rec[k] = v
                else:
                    try:
                        rec[k] = float(v)
                    except (TypeError, ValueError):
                        rec[k] = v
            rec.update(model=preset, checkpoint=f"seed{seed}", preset=preset, seed=int(seed))
            out.append(rec)
    return out


def case_matrix(
    records: Iterable[Mapping[str, Any]], preset: str, column: str, key: str = "dice_mean"
) -> tuple[list[str], list[str], np.ndarray]:
    """(seeds, case ids, values (n_seeds, n_cases)) of ``preset`` on test ``column``.

    Only cases that every seed of the preset scored are kept (sorted by id).
    """
    by_seed: dict[str, dict[str, float]] = {}
    for r in records:
        if r["model"] == preset and r["column"] == column:
            by_seed.setdefault(str(r["checkpoint"]), {})[str(r["case_id"])] = float(r[key])
    if not by_seed:
        return [], [], np.zeros((0, 0))
    seeds = sorted(by_seed)
    cases = sorted(set.intersection(*(set(d) for d in by_seed.values())))
    values = np.array([[by_seed[s][c] for c in cases] for s in seeds], dtype=np.float64)
    return seeds, cases, values.reshape(len(seeds), len(cases))


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    resample_seeds: bool = True,
) -> dict[str, Any]:
    """Bootstrap CI of the mean over cases of ``mean_seeds(a) - mean_seeds(b)``.

    Args:
        a, b: (seeds, cases) scores of two presets on the same cases, same column order.
        resample_seeds: also draw each preset's seeds with replacement in every replicate, so the
            interval reflects training noise, not only the choice of test cases. With one seed
            per preset this is the plain paired case bootstrap.

    Returns:
        ``{"mean_diff", "ci": [lo, hi], "excludes_zero", "n_cases", "n_seeds": [na, nb],
        "per_seed_a", "per_seed_b"}`` (per-seed means over cases of each preset).
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b need the same cases, got {a.shape[1]} and {b.shape[1]}")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and alpha in (0, 1), got {n_boot}, {alpha}")
    n = a.shape[1]
    if n == 0 or a.shape[0] == 0 or b.shape[0] == 0:
        return {
            "mean_diff": math.nan,
            "ci": [math.nan, math.nan],
            "excludes_zero": False,
            "n_cases": n,
            "n_seeds": [a.shape[0], b.shape[0]],
            "per_seed_a": [],
            "per_seed_b": [],
        }
    diff = a.mean(0) - b.mean(0)  # (n_cases,) per-case paired difference
    rng = np.random.default_rng(seed)
    cases = rng.integers(0, n, size=(n_boot, n))  # shared draw: the pairing

    def seed_means(x: np.ndarray) -> np.ndarray:  # (n_boot, n_cases) seed-averaged per case
        if not resample_seeds or x.shape[0] == 1:
            return np.broadcast_to(x.mean(0), (n_boot, n))
        pick = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))  # (n_boot, n_seeds)
        return x[pick].mean(1)  # (n_boot, n_seeds, n_cases) -> (n_boot, n_cases)

    d = seed_means(a) - seed_means(b)  # (n_boot, n_cases)
    stats = np.take_along_axis(d, cases, axis=1).mean(1)  # (n_boot,)
    lo, hi = (float(v) for v in np.quantile(stats, [alpha / 2, 1 - alpha / 2]))
    return {
        "mean_diff": float(diff.mean()),
        "ci": [lo, hi],
        "excludes_zero": bool(lo > 0 or hi < 0),
        "n_cases": int(n),
        "n_seeds": [int(a.shape[0]), int(b.shape[0])],
        "per_seed_a": [float(v) for v in a.mean(1)],
        "per_seed_b": [float(v) for v in b.mean(1)],
    }


def compare(
    records: Sequence[Mapping[str, Any]],
    baseline: str,
    presets: Sequence[str],
    *,
    columns: Sequence[str] = MODALITIES,
    keys: Sequence[str] = _DICE_KEYS,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Paired comparisons ``preset - baseline`` per test column and Dice key (cases matched)."""
    out = []
    for preset in presets:
        if preset == baseline:
            continue
        for column in columns:
            for key in keys:
                sa, ca, va = case_matrix(records, preset, column, key)
                sb, cb, vb = case_matrix(records, baseline, column, key)
                if not ca or not cb:
                    continue  # a run missing, or a column the preset is not tested on
                common = sorted(set(ca) & set(cb))
                ia = [ca.index(c) for c in common]
                ib = [cb.index(c) for c in common]
                res = paired_bootstrap(va[:, ia], vb[:, ib], n_boot=n_boot, alpha=alpha, seed=seed)
                res.update(
                    preset=preset,
                    baseline=baseline,
                    column=column,
                    key=key,
                    n_cases_only_one=len(set(ca) ^ set(cb)),
                )
                out.append(res)
    return out


def aggregate(
    records: Sequence[Mapping[str, Any]],
    *,
    presets: Optional[Sequence[str]] = None,
    baselines: Sequence[str] = BASELINES,
    columns: Sequence[str] = MODALITIES,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """Table summary (mean ± sd over seeds, CIs over cases) and paired comparisons.

    Args:
        records: per-case records of every run (see :func:`read_records`).
        presets: row order (default: first-seen order in ``records``).
        baselines: presets every other preset is compared with (absent ones are skipped).

    Returns:
        JSON-serialisable ``{"presets", "columns", "baselines", "n_boot", "alpha", "seed",
        "summary" (dgseg.evaluation.report.summarize), "seeds": {preset: [seed names]},
        "comparisons": [paired_bootstrap results with preset, baseline, column, key]}``.
    """
    records = list(records)
    seen = list(dict.fromkeys(r["model"] for r in records))
    presets = [p for p in (presets or seen) if p in seen]
    order = {p: k for k, p in enumerate(presets)}
    rows = sorted((r for r in records if r["model"] in order), key=lambda r: order[r["model"]])
    summary = summarize(rows, n_boot=n_boot, alpha=alpha, seed=seed)
    seeds = {m["model"]: list(m["checkpoints"]) for m in summary["models"]}
    comparisons = []
    for base in baselines:
        if base in seeds:
            comparisons += compare(
                rows, base, presets, columns=columns, n_boot=n_boot, alpha=alpha, seed=seed
            )
    return {
        "presets": presets,
        "columns": list(columns),
        "baselines": [b for b in baselines if b in seeds],
        "n_boot": n_boot,
        "alpha": alpha,
        "seed": seed,
        "seeds": seeds,
        "summary": summary,
        "comparisons": comparisons,
    }


def _cell(stat: Mapping[str, Any], digits: int = 3) -> str:
    lo, hi = stat["ci"]
    return f"{stat['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _diff_cell(c: Mapping[str, Any]) -> str:
    lo, hi = c["ci"]
    mark = " *" if c["excludes_zero"] else ""
    return f"{c['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def format_markdown(
    result: Mapping[str, Any],
    *,
    footer: Sequence[str] = (),
    title: str = "Cross-modality ablation study",
) -> str:
    """The study as markdown: Dice and HD95 tables, CIs, paired comparisons, footer."""
    summary, columns = result["summary"], result["columns"]
    pct = f"{100 * (1 - result['alpha']):.0f} %"
    n_seeds = sorted({len(s) for s in result["seeds"].values()})
    lines = [f"# {title}", ""]
    lines.append(
        format_table(
            summary,
            metric="dice",
            style="markdown",
            columns=columns,
            title=f"Dice, mean ± sd over seeds ({', '.join(map(str, n_seeds))} per preset)",
        )
    )
    lines.append(
        format_table(
            summary,
            metric="hd95",
            style="markdown",
            columns=columns,
            title="HD95 (mm), mean ± sd over seeds",
        )
    )
    lines += [
        f"**Mean Dice (of WT, TC, ET) with {pct} bootstrap CI over test cases** "
        "(per-case scores averaged over seeds)",
        "",
    ]
    lines.append("| Preset | " + " | ".join(COLUMN_TITLES.get(c, c) for c in columns) + " |")
    lines.append("|" + "|".join("---" for _ in range(len(columns) + 1)) + "|")
    for m in summary["models"]:
        cells = [_cell(m["columns"][c]["dice_mean"]) if c in m["columns"] else "x" for c in columns]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    lines.append("")
    for base in result["baselines"]:
        comps = [
            c for c in result["comparisons"] if c["baseline"] == base and c["key"] == "dice_mean"
        ]
        if not comps:
            continue
        lines += [
            f"**Paired difference in mean Dice: preset − {base}** (mean over test cases "
            f"of the seed-averaged per-case difference, {pct} bootstrap CI over cases and "
            "seeds; * = CI excludes 0)",
            "",
        ]
        lines.append("| Preset | " + " | ".join(COLUMN_TITLES.get(c, c) for c in columns) + " |")
        lines.append("|" + "|".join("---" for _ in range(len(columns) + 1)) + "|")
        for preset in result["presets"]:
            by_col = {c["column"]: c for c in comps if c["preset"] == preset}
            if by_col:
                cells = [_diff_cell(by_col[c]) if c in by_col else "x" for c in columns]
                lines.append(f"| {preset} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"{f}  " for f in footer]
    return "\n".join(lines).rstrip() + "\n"


def table_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (preset, column, metric, mean, sd, ci_lo, ci_hi, n_seeds, n_cases) for CSV."""
    rows = []
    for m in result["summary"]["models"]:
        for column, col in m["columns"].items():
            for key, stat in col.items():
                if not isinstance(stat, dict) or "sd" not in stat:
                    continue
                rows.append(
                    {
                        "preset": m["model"],
                        "column": column,
                        "metric": key,
                        "mean": stat["mean"],
                        "sd": stat["sd"],
                        "ci_lo": stat["ci"][0],
                        "ci_hi": stat["ci"][1],
                        "n_seeds": col["n_checkpoints"],
                        "n_cases": col["n_cases"],
                    }
                )
    return rows


def paired_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows of the paired comparisons for CSV."""
    return [
        {
            "preset": c["preset"],
            "baseline": c["baseline"],
            "column": c["column"],
            "metric": c["key"],
            "mean_diff": c["mean_diff"],
            "ci_lo": c["ci"][0],
            "ci_hi": c["ci"][1],
            "excludes_zero": c["excludes_zero"],
            "n_cases": c["n_cases"],
            "n_seeds": f"{c['n_seeds'][0]}/{c['n_seeds'][1]}",
        }
        for c in result["comparisons"]
    ]


def write_study(
    result: Mapping[str, Any], folder: str | Path, *, footer: Sequence[str] = ()
) -> dict[str, Path]:
    """Write study.md, study_table.csv, study_paired.csv, study.json and (with matplotlib)
    study.png into ``folder``; returns the paths written (``"png"`` absent without matplotlib)."""
    folder = Path(folder)
    paths = {
        "md": atomic_write_text(folder / "study.md", format_markdown(result, footer=footer)),
        "table_csv": write_csv(folder / "study_table.csv", table_rows(result)),
        "paired_csv": write_csv(folder / "study_paired.csv", paired_rows(result)),
        "json": write_json(folder / "study.json", {**result, "footer": list(footer)}),
    }
    try:
        paths["png"] = plot_study_bars(result, folder / "study.png", titles=COLUMN_TITLES)
    except ImportError:
        pass
    return paths
