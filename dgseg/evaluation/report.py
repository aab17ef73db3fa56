"""Evaluation reports: aggregation over cases and seeds, the write-up's tables, atomic writers.

Per-case records (:func:`dgseg.evaluation.scoring.case_record`) become a summary
(:func:`summarize`): per
checkpoint the mean over cases with a percentile-bootstrap 95% CI over cases (Efron & Tibshirani
1993, ch. 13; seeded, so reproducible); several checkpoints with the same model label (seeds)
become mean ± sample sd over checkpoints, and the row's CI is the bootstrap over cases of the
per-case scores averaged over those checkpoints. Tables always name their columns
(``Mean - WT | TC | ET``; the original printout's column order did not match its values), and
every table carries a footer saying what was scored (:func:`table_footer`). :func:`write_report`
writes ``per_case.csv``, ``summary.json`` and ``table.md`` of ``tools/evaluate.py``;
:mod:`dgseg.evaluation.study` builds the seeded-ablation tables on the same summary.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from dgseg.atomic import atomic_write_text
from dgseg.constants import REGIONS
from dgseg.evaluation.lesion_metrics import LesionRules, get_lesion_rules
from dgseg.evaluation.scoring import COLUMNS, EVAL_RULE, LESION_METRICS, METRIC_SETS, METRICS

__all__ = [
    "COLUMN_TITLES",
    "METRIC_TITLES",
    "bootstrap_ci",
    "summarize",
    "format_cell",
    "format_table",
    "format_ci_table",
    "summary_columns",
    "table_footer",
    "table_title",
    "write_report",
    "write_json",
    "write_csv",
]

# Table headings of the test columns.
COLUMN_TITLES = {
    "t1": "T1",
    "t1ce": "T1CE",
    "t2": "T2",
    "flair": "FLAIR",
    "own": "Own inputs",
    "nifti": "NIfTI",
}
METRIC_TITLES = {
    "dice": "Dice",
    "hd95": "HD95 (mm)",
    "lesion_dice": "Lesion-wise Dice",
    "lesion_hd95": "Lesion-wise HD95 (mm)",
    "lesion_nsd": "Lesion-wise NSD",
}

PathLike = Union[str, "os.PathLike[str]"]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of the mean of ``values`` (resampling cases).

    One case gives a zero-width interval at its value; no case, or ``n_boot = 0`` (no CIs),
    gives ``(nan, nan)``.
    """
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0 = no CIs), got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or n_boot == 0:
        return (math.nan, math.nan)
    if v.size == 1:
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))  # (n_boot, n) resampled case indices
    means = v[idx].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def _metric_keys(metric: str, regions: Sequence[str] = REGIONS) -> list[str]:
    return [f"{metric}_{r}" for r in regions] + [f"{metric}_mean"]


def _finite(values: Iterable[Any]) -> list[float]:
    """The values as floats, NaN left out (lesion-wise 'no lesion anywhere' results)."""
    return [v for v in (float(x) for x in values) if not math.isnan(v)]


def summarize(
    records: Iterable[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
    regions: Sequence[str] = REGIONS,
    lesion_rules: Union[str, LesionRules, None] = None,
) -> dict[str, Any]:
    """Aggregate per-case records into the summary behind the tables (JSON-serialisable).

    ``metrics`` lists the metrics to aggregate (default the per-case Dice and HD95; see
    :data:`METRIC_SETS`), ``regions`` the region names of the records. NaN per-case values are
    left out of means and CIs (``n_cases`` still counts every case). With lesion-wise metrics,
    the summary records the :class:`dgseg.evaluation.lesion_metrics.LesionRules` used
    (``lesion_rules``).

    Records need the keys ``model`` (row label; checkpoints sharing it are seeds of one model),
    ``checkpoint``, ``column``, ``inputs``, ``case_id`` and the metric keys of
    :func:`case_record`. Returns::

        {"n_boot", "alpha", "seed", "rule",
         "models": [{"model", "checkpoints": [..], "columns": {column: {
             "inputs", "n_cases", "n_checkpoints",
             "per_checkpoint": [{"checkpoint", "n_cases",
                                 "<metric>_<region>": {"mean", "ci"}}],
             "<metric>_<region>": {"mean", "sd", "ci"}}}}]}

    where ``<region>`` runs over WT, TC, ET and ``mean`` (the mean of the three), ``sd`` is the
    sample sd over checkpoints (0 for one), and the row ``ci`` bootstraps over cases the per-case
    values averaged over the checkpoints.
    """
    rows = list(records)
    models: dict[str, dict[str, Any]] = {}
    for r in rows:  # first-seen order of models, checkpoints and cases
        m = models.setdefault(r["model"], {"checkpoints": [], "columns": {}})
        if r["checkpoint"] not in m["checkpoints"]:
            m["checkpoints"].append(r["checkpoint"])
        m["columns"].setdefault(r["column"], []).append(r)
    unknown = [m for m in metrics if m not in METRIC_TITLES]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected names from {tuple(METRIC_TITLES)}")
    keys = [k for metric in metrics for k in _metric_keys(metric, regions)]

    out_models = []
    for name, m in models.items():
        columns: dict[str, Any] = {}
        for column in [c for c in COLUMNS if c in m["columns"]] + [
            c for c in m["columns"] if c not in COLUMNS
        ]:
            col_rows = m["columns"][column]
            by_ckpt: dict[str, dict[str, Mapping[str, Any]]] = {}
            for r in col_rows:
                by_ckpt.setdefault(r["checkpoint"], {})[r["case_id"]] = r
            per_ckpt = []
            for ckpt, cases in by_ckpt.items():
                entry: dict[str, Any] = {"checkpoint": ckpt, "n_cases": len(cases)}
                for k in keys:
                    v = _finite(c[k] for c in cases.values())
                    entry[k] = {
                        "mean": float(np.mean(v)) if v else math.nan,
                        "ci": list(bootstrap_ci(v, n_boot=n_boot, alpha=alpha, seed=seed)),
                    }
                per_ckpt.append(entry)
            # Cases present for every checkpoint (all of them unless --max-cases differed).
            first = next(iter(by_ckpt.values()))
            common = [c for c in first if all(c in d for d in by_ckpt.values())]
            summary: dict[str, Any] = {
                "inputs": col_rows[0]["inputs"],
                "n_cases": len(common),
                "n_checkpoints": len(per_ckpt),
                "per_checkpoint": per_ckpt,
            }
            for k in keys:
                means = np.array(_finite(e[k]["mean"] for e in per_ckpt))
                pooled = [
                    np.mean(v)
                    for v in (_finite(by_ckpt[ck][c][k] for ck in by_ckpt) for c in common)
                    if v
                ]
                summary[k] = {
                    "mean": float(means.mean()) if means.size else math.nan,
                    "sd": float(means.std(ddof=1)) if means.size > 1 else 0.0,
                    "ci": list(bootstrap_ci(pooled, n_boot=n_boot, alpha=alpha, seed=seed)),
                }
            columns[column] = summary
        out_models.append({"model": name, "checkpoints": m["checkpoints"], "columns": columns})
    out = {"n_boot": n_boot, "alpha": alpha, "seed": seed, "rule": EVAL_RULE, "models": out_models}
    if (
        tuple(metrics) != METRICS or tuple(regions) != REGIONS
    ):  # per-case summaries keep their shape
        out["metrics"] = list(metrics)
        out["regions"] = list(regions)
    if any(m in LESION_METRICS for m in metrics):
        rules = get_lesion_rules(lesion_rules)
        out["lesion_rules"] = {**dataclasses.asdict(rules), "text": rules.describe()}
    return out


def _fmt(value: float, sd: float, n: int, digits: int) -> str:
    s = f"{value:.{digits}f}"
    return f"{s}±{sd:.{digits}f}" if n > 1 else s


def format_cell(
    col: Optional[Mapping[str, Any]], *, metric: str = "dice", regions: Sequence[str] = REGIONS
) -> str:
    """``Mean - WT | TC | ET`` for one summary column (``mean±sd`` over several checkpoints).

    ``None`` (combination not evaluated) gives ``x``. ``metric`` is any of :data:`METRIC_SETS`
    ``["all"]``; ``regions`` the summary's regions (more than three for the 2024 region set).
    """
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {tuple(METRIC_TITLES)}, got {metric!r}")
    if col is None:
        return "x"
    digits = 1 if metric.endswith("hd95") else 2
    n = int(col["n_checkpoints"])
    parts = [
        _fmt(col[f"{metric}_{k}"]["mean"], col[f"{metric}_{k}"]["sd"], n, digits)
        for k in ("mean", *regions)
    ]
    return f"{parts[0]} - " + " | ".join(parts[1:])


def table_footer(
    summary: Mapping[str, Any], *, split: str = "test", extra: Sequence[str] = ()
) -> list[str]:
    """Lines printed under every table: columns, input rule, case counts, CI method."""
    n_cases = sorted({c["n_cases"] for m in summary["models"] for c in m["columns"].values()})
    n_ckpt = sorted({c["n_checkpoints"] for m in summary["models"] for c in m["columns"].values()})
    regions = list(summary.get("regions", REGIONS))
    metrics = list(summary.get("metrics", METRICS))
    case_only = regions == list(REGIONS) and metrics == list(METRICS)
    if case_only:  # the per-case tables. line
        lines = [
            "Cells: Mean - WT | TC | ET (mean = average of the three regions); Dice, HD95 in "
            "mm; BraTS empty-mask rules."
        ]
    else:
        lines = [
            f"Cells: Mean - {' | '.join(regions)} (mean = average of the {len(regions)} "
            f"regions, NaN left out); HD95 in mm."
        ]
        if any(m in METRICS for m in metrics):
            lines.append(
                "Per-case metrics: Dice and HD95 with the BraTS 2021 empty-mask "
                "rules (both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 373.13 mm)."
            )
    if "lesion_rules" in summary:
        lines.append(summary["lesion_rules"]["text"])
    lines += [
        EVAL_RULE,
        f"Split '{split}', cases per cell: {', '.join(map(str, n_cases)) or '0'}; checkpoints per "
        f"row: {', '.join(map(str, n_ckpt)) or '0'} (several: mean±sd over checkpoints). "
        + (
            f"Bootstrap {100 * (1 - summary['alpha']):.0f}% CIs over cases "
            f"(B={summary['n_boot']}, seed {summary['seed']}) in summary.json."
            if summary["n_boot"]
            else "No bootstrap CIs (B=0)."
        ),
    ]
    return lines + list(extra)


def summary_columns(summary: Mapping[str, Any]) -> list[str]:
    """Columns present in a summary: :data:`COLUMNS` order first, then any others."""
    present: list[str] = []
    for m in summary["models"]:
        present += [c for c in m["columns"] if c not in present]
    return [c for c in COLUMNS if c in present] + [c for c in present if c not in COLUMNS]


def format_table(
    summary: Mapping[str, Any],
    *,
    metric: str = "dice",
    style: str = "text",
    columns: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    footer: Sequence[str] = (),
) -> str:
    """The write-up's table: rows = models, columns = test modalities, named columns.

    Args:
        summary: output of :func:`summarize`.
        metric: "dice" or "hd95".
        style: "markdown" (pipes inside cells escaped as ``\\|``) or "text" (aligned columns
            separated by two spaces, for the terminal).
        columns: which test columns, default every column any model has, in :data:`COLUMNS` order.
        title, footer: optional lines above / below the table.
    """
    if style not in ("text", "markdown"):
        raise ValueError(f"style must be 'text' or 'markdown', got {style!r}")
    if metric not in METRIC_TITLES:
        raise ValueError(f"metric must be one of {tuple(METRIC_TITLES)}, got {metric!r}")
    if columns is None:
        columns = summary_columns(summary)
    label = METRIC_TITLES[metric]
    regions = tuple(summary.get("regions", REGIONS))
    spec = "Mean - " + " | ".join(regions)
    names = [COLUMN_TITLES.get(c, c) for c in columns]
    body = [
        [m["model"]]
        + [format_cell(m["columns"].get(c), metric=metric, regions=regions) for c in columns]
        for m in summary["models"]
    ]
    lines: list[str] = []
    if style == "markdown":
        if title:
            lines += [f"**{title}**", ""]
        header = [label] + [f"{n}: " + spec.replace("|", "\\|") for n in names]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in body:
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        if footer:
            lines.append("")
            lines += [f"{f}  " for f in footer]  # two spaces: markdown line break
    else:
        head1 = [label] + names
        head2 = [""] + [spec] * len(names)
        widths = [max(len(r[i]) for r in [head1, head2, *body]) for i in range(len(head1))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        if title:
            lines.append(title)
        lines += [line(head1), line(head2), "  ".join("-" * w for w in widths)]
        lines += [line(r) for r in body]
        for f in footer:  # terminal: wrap the long rule text at 100 columns
            lines += textwrap.wrap(f, width=100) or [""]
    return "\n".join(lines) + "\n"


def write_json(path: PathLike, obj: Any) -> Path:
    """Indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """CSV with the union of the rows' keys as header (first-seen order), atomic."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in fields})
    return atomic_write_text(path, buf.getvalue())


def format_ci_table(summary: dict[str, Any], metric: str = "dice", title: str = "Dice") -> str:
    """Markdown: mean Dice of the regions with its bootstrap CI, per model and column."""
    cols = summary_columns(summary)
    pct = f"{100 * (1 - summary['alpha']):.0f}%"
    lines = [
        f"**Mean of {title} with {pct} bootstrap CI over cases**",
        "",
        "| Model | " + " | ".join(COLUMN_TITLES.get(c, c) for c in cols) + " |",
        "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|",
    ]
    for m in summary["models"]:
        cells = []
        for c in cols:
            col = m["columns"].get(c)
            if col is None:
                cells.append("x")
            else:
                d = col[f"{metric}_mean"]
                cells.append(f"{d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]")
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_title(metric: str, lesion_rules: Union[str, LesionRules, None] = None) -> str:
    """What a table shows: per-case or lesion-wise (with the rule set), and the metric."""
    if metric in METRIC_SETS["case"]:
        return f"Per-case {METRIC_TITLES[metric]} (BraTS 2021 rules)"
    return f"{METRIC_TITLES[metric]} (rules '{get_lesion_rules(lesion_rules).name}')"


def write_report(
    records: Sequence[Mapping[str, Any]],
    out: PathLike,
    *,
    metric_set: str = "case",
    lesion_rules: Union[str, LesionRules, None] = None,
    regions: Optional[Sequence[str]] = None,
    n_boot: int = 2000,
    seed: int = 0,
    split: str = "test",
    scored: Optional[str] = None,
    settings: Optional[Mapping[str, Any]] = None,
    footer: Sequence[str] = (),
) -> str:
    """``per_case.csv``, ``summary.json`` and ``table.md`` of an evaluation in ``out``.

    Args:
        records: :func:`dgseg.evaluation.scoring.case_record` rows with ``model``, ``checkpoint``,
            ``column``, ``inputs`` and ``case_id``.
        metric_set: "case", "lesion" or "all" (:data:`dgseg.evaluation.scoring.METRIC_SETS`): one
        table
            per metric of the set.
        regions: region names of the records (default WT, TC, ET).
        split: the manifest split, recorded in the summary; ``scored`` names what the footer
            says was scored (default ``split``; e.g. "raw files").
        settings: the command's settings, recorded in the summary.
        footer: extra footer lines (window, processes, scored volume).

    Returns:
        The text tables for the terminal, the footer under the last one.
    """
    metrics = METRIC_SETS[metric_set]
    summary = summarize(
        records,
        n_boot=n_boot,
        seed=seed,
        metrics=metrics,
        lesion_rules=lesion_rules,
        **({"regions": regions} if regions else {}),
    )
    summary["split"] = split
    summary["metric_set"] = metric_set  # case | lesion | all: what the tables show
    summary["settings"] = dict(settings or {})
    lines = table_footer(summary, split=split if scored is None else scored, extra=footer)
    titles = {m: table_title(m, lesion_rules) for m in metrics}
    text = "\n".join(
        format_table(
            summary,
            metric=m,
            style="text",
            title=titles[m],
            footer=lines if k == len(metrics) - 1 else (),
        )
        for k, m in enumerate(metrics)
    )
    md = ["# Cross-modality evaluation", ""]
    md += [format_table(summary, metric=m, style="markdown", title=titles[m]) for m in metrics]
    if n_boot:
        md.append(format_ci_table(summary, metric=metrics[0], title=titles[metrics[0]]))
    md += [f"{f}  " for f in lines]
    out = Path(out)
    write_csv(out / "per_case.csv", list(records))
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    return text
