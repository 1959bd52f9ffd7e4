"""Reports: how much of the teacher a student keeps, at what size and speed.

A report compares runs (teacher, distilled students, a no-KD baseline, ...). Each run is a
dict::

    {"name": "student-kd", "role": "teacher" | "student" | "baseline",
     "run_dir": path or None, "metrics": {name: value}, "params": int,
     "size_bytes": int, "latency_ms": {"bs1": ms, "bs32": ms}}

Only ``name`` and ``metrics`` are required. Metric names come from the runs, so any model
family plugs in; every metric is read as higher-is-better except the error rates in
``LOWER_IS_BETTER`` (WER, CER), whose retention is reference ÷ run. Runs with speech tasks get a
per-task table (text VQA, spoken VQA, captioning CIDEr, ASR WER / CER) with each run's retention. ``write_report`` writes
``report.json``, ``report.md`` and, when training logs exist, ``loss_curves.png``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from mmdistill.evaluate.bench import human_bytes

__all__ = ["build_report", "load_run_summary", "plot_loss_curves", "render_markdown", "render_table", "write_report"]

EVAL_FILE = "eval.json"
LOWER_IS_BETTER = {"wer", "cer"}  # error rates: retention = reference ÷ run (teacher WER / student WER)
# (metric, task) rows of the per-task table, shown when a run has a speech task (wer or spoken_vqa_accuracy)
TASK_ROWS = [
    ("text_vqa_accuracy", "VQA, text questions (accuracy %)"),
    ("spoken_vqa_accuracy", "VQA, spoken questions (accuracy %)"),
    ("cider", "captioning (CIDEr-D)"),
    ("wer", "speech recognition (WER %, lower is better)"),
    ("cer", "speech recognition (CER %, lower is better)"),
]
LOG_FILE = "metrics.jsonl"
# Numeric keys of a metrics.jsonl line that are not loss parts. Keys ending in "_s"
# (seconds, per-second throughput) are skipped too.
NOT_LOSS_PARTS = {"step", "loss", "lr", "epoch", "grad_norm"}
# Dashed line styles that tell the parts of one run apart (the run's colour is shared).
PART_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]


# ----------------------------------------------------------------------------- runs in


def load_run_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``run_dir/eval.json`` (written by the evaluator) into a run dict for a report.

    ``name`` defaults to the folder name and ``role`` to ``"student"`` when the file has
    none; ``run_dir`` is set to the folder, so its ``metrics.jsonl`` can be plotted.
    """
    run_dir = Path(run_dir)
    path = run_dir / EVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {EVAL_FILE} in this folder; evaluate the run first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'metrics' object")
    return {
        "name": data.get("name") or run_dir.name,
        "role": data.get("role") or "student",
        "run_dir": str(run_dir),
        "metrics": data["metrics"],
        "params": data.get("params"),
        "size_bytes": data.get("size_bytes"),
        "latency_ms": data.get("latency_ms") or {},
        **({"chance": data["chance"]} if isinstance(data.get("chance"), dict) else {}),
        **({"headline": data["headline"]} if isinstance(data.get("headline"), dict) else {}),
        **({"training": training} if (training := _training(run_dir)) else {}),
        **{k: data[k] for k in BREAKDOWNS if isinstance(data.get(k), dict)},
        **({"zeroshot_labels": {k: data["zeroshot_labels"][k] for k in ("labels", "confusion") if k in data["zeroshot_labels"]}}
           if isinstance(data.get("zeroshot_labels"), dict) and "confusion" in data["zeroshot_labels"] else {}),
    }


TRAIN_FILE = "train_summary.json"


def _training(run_dir: Path) -> dict[str, float]:
    """Wall time, steps, samples/s and peak RSS of a run, from its train_summary.json ({} when absent)."""
    path = run_dir / TRAIN_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        warnings.warn(f"{path}: not valid JSON, training figures left out", stacklevel=3)
        return {}
    keys = ("train_seconds", "steps", "samples_per_s", "peak_rss_bytes")
    return {k: float(data[k]) for k in keys if _is_number(data.get(k))}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


BREAKDOWNS = {"per_instruction": "instruction", "per_direction": "direction"}  # eval.json sections a report tabulates


def _task_lines(report: dict[str, Any], line) -> list[str]:
    """The per-task table (a row per task: each run's value and, for the others, retention vs the reference) when
    some run has a speech task; else nothing."""
    runs = report["runs"]
    if not any(k in run["metrics"] for run in runs for k in ("wer", "spoken_vqa_accuracy")):
        return []
    ref = next(run for run in runs if run["name"] == report["reference"])
    others = [run for run in runs if run is not ref]
    header = ["task", ref["name"], *[c for run in others for c in (run["name"], f"{run['name']} retention")]]
    parts = ["Per task (retention = run ÷ reference; for WER / CER reference ÷ run):", "", line(header), line(["---"] * len(header))]
    for key, task in TASK_ROWS:
        if not any(key in run["metrics"] for run in runs):
            continue
        cells = [task, _num(ref["metrics"].get(key))]
        for run in others:
            kept = run.get("retention", {}).get(key)
            cells += [_num(run["metrics"].get(key)), _num(None if kept is None else kept * 100, "{:.1f}%")]
        parts.append(line(cells))
    return parts + [""]


def _class_accuracy(zs: dict[str, Any]) -> dict[str, float | None]:
    """Per class top-1 accuracy (percent) from a confusion matrix (rows: true class); None for a class with no images."""
    out: dict[str, float | None] = {}
    for i, name in enumerate(zs["labels"]):
        row = zs["confusion"][i]
        out[name] = 100.0 * row[i] / sum(row) if sum(row) else None
    return out


def _zeroshot_lines(report: dict[str, Any], line) -> list[str]:
    """Zero-shot on the user's labels side by side: a row per class, a column per run with per-class top-1 accuracy
    (runs whose eval used the same label list), and the confusion matrices when they were plotted."""
    runs = [run for run in report["runs"] if run.get("zeroshot_labels")]
    if not runs:
        return []
    labels = runs[0]["zeroshot_labels"]["labels"]
    same = [run for run in runs if run["zeroshot_labels"]["labels"] == labels]
    acc = {run["name"]: _class_accuracy(run["zeroshot_labels"]) for run in same}
    parts = ["Zero-shot on the labels, per class (top-1 %, from each run's confusion matrix):", "", line(["class", *acc]), line(["---"] * (len(acc) + 1))]
    parts += [line([name, *(_num(acc[run][name]) for run in acc)]) for name in labels]
    skipped = [run["name"] for run in runs if run not in same]
    if skipped:
        parts += ["", f"Not in this table (another label list): {', '.join(skipped)}."]
    parts.append("")
    if report.get("zeroshot_plot"):
        parts += [f"![zero-shot confusion matrices]({report['zeroshot_plot']})", ""]
    return parts


def plot_confusions(report: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """One confusion matrix per run that has one (rows: true class, columns: predicted, normalised per row), side by
    side with a shared colour scale. Returns whether a PNG was written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [run for run in report["runs"] if run.get("zeroshot_labels")]
    if not runs:
        return False
    n = max(len(run["zeroshot_labels"]["labels"]) for run in runs)
    side = 1.2 + 0.35 * n
    fig = Figure(figsize=(side * len(runs), side + 0.6))
    FigureCanvasAgg(fig)
    for i, run in enumerate(runs, 1):
        zs = run["zeroshot_labels"]
        rows = [[c / max(sum(r), 1) for c in r] for r in zs["confusion"]]
        ax = fig.add_subplot(1, len(runs), i)
        ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
        k = len(zs["labels"])
        ax.set_xticks(range(k), zs["labels"], rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(k), zs["labels"] if i == 1 else [""] * k, fontsize=6)
        top1 = run["metrics"].get("zeroshot_top1")
        ax.set_title(f"{run['name']}" + (f": top-1 {top1:.1f}%" if isinstance(top1, (int, float)) else ""), fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        if i == 1:
            ax.set_ylabel("true", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def _breakdown_lines(report: dict[str, Any], line) -> list[str]:
    """One table per breakdown that some run has: a row per instruction (or direction), a column per run and metric."""
    parts: list[str] = []
    for section, what in BREAKDOWNS.items():
        runs = [run for run in report["runs"] if run.get(section)]
        if not runs:
            continue
        keys = _ordered_union([run[section] for run in runs])
        columns = [(run, m) for m in ("ndcg@10", "top3_overlap") for run in runs if any(m in d for d in run[section].values())]
        header = [what, "queries", *[f"{run['name']} {m}" for run, m in columns]]
        parts += [f"Per {what}:", "", line(header), line(["---"] * len(header))]
        for key in keys:
            n = next((run[section][key].get("n") for run in runs if key in run[section]), None)
            cells = [_num(run[section].get(key, {}).get(m)) for run, m in columns]
            parts.append(line([str(key), "—" if n is None else str(int(n)), *cells]))
        parts.append("")
    return parts


def _clean_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate run dicts and return copies with every field present."""
    if not runs:
        raise ValueError("a report needs at least one run")
    cleaned, seen = [], set()
    for i, run in enumerate(runs):
        name = run.get("name") if isinstance(run, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"run {i}: needs a non-empty string 'name'")
        if name in seen:
            raise ValueError(f"run {name!r}: two runs share this name; names must be unique")
        seen.add(name)
        metrics = run.get("metrics")
        if not isinstance(metrics, dict):
            raise ValueError(f"run {name!r}: 'metrics' must be a dict of metric name -> number")
        for key, value in metrics.items():
            if not _is_number(value):
                raise ValueError(f"run {name!r}: metric {key!r} is {value!r}, expected a number")
        latency = run.get("latency_ms") or {}
        if not isinstance(latency, dict) or not all(_is_number(v) for v in latency.values()):
            raise ValueError(f"run {name!r}: 'latency_ms' must be a dict like {{'bs1': ms, 'bs32': ms}}")
        for key in ("params", "size_bytes"):
            if run.get(key) is not None and not _is_number(run[key]):
                raise ValueError(f"run {name!r}: {key!r} is {run[key]!r}, expected a number")
        run_dir = run.get("run_dir")
        cleaned.append(
            {
                "name": name,
                "role": run.get("role") or "student",
                "run_dir": None if run_dir is None else str(run_dir),
                "metrics": {k: float(v) for k, v in metrics.items()},
                "params": run.get("params"),
                "size_bytes": run.get("size_bytes"),
                "latency_ms": {k: float(v) for k, v in latency.items()},
                # the metrics of random scores on the same items (rerankers), where the floor is far from 0
                "chance": {k: float(v) for k, v in (run.get("chance") or {}).items() if _is_number(v)},
                # rerankers: metrics per instruction / direction, {key: {metric: value, "n": queries}}
                **{b: run[b] for b in BREAKDOWNS if isinstance(run.get(b), dict)},
                # the evaluator's choice of headline metric for this gallery: {"metric": key, "why": sentence}
                **({"headline": run["headline"]} if isinstance(run.get("headline"), dict) else {}),
                # dual encoders evaluated on the user's labels: {"labels": [...], "confusion": [[...]]}
                **({"zeroshot_labels": run["zeroshot_labels"]} if _confusion_ok(run.get("zeroshot_labels")) else {}),
                # train_summary.json: wall time, steps, samples/s, peak RSS
                "training": run.get("training") or {},
            }
        )
    return cleaned


def _confusion_ok(zs: Any) -> bool:
    """A zero-shot section with a square confusion matrix over its labels."""
    if not isinstance(zs, dict) or not isinstance(zs.get("labels"), list) or not isinstance(zs.get("confusion"), list):
        return False
    n = len(zs["labels"])
    return len(zs["confusion"]) == n and all(isinstance(r, list) and len(r) == n for r in zs["confusion"])


def _pick(runs: list[dict[str, Any]], key: str, what: str) -> dict[str, Any]:
    """The run named ``key``, else the single run whose role is ``key``."""
    for run in runs:
        if run["name"] == key:
            return run
    by_role = [run for run in runs if run["role"] == key]
    if len(by_role) == 1:
        return by_role[0]
    names = ", ".join(run["name"] for run in runs)
    if by_role:
        raise ValueError(f"{what} {key!r}: several runs have role {key!r}; name one of: {names}")
    raise ValueError(f"{what} {key!r}: no run has this name or role (runs: {names})")


def _ordered_union(dicts: list[dict[str, Any]]) -> list[str]:
    """Keys of all dicts, in order of first appearance (a stable column order)."""
    return list(dict.fromkeys(key for d in dicts for key in d))


# ----------------------------------------------------------------------------- the report


def build_report(
    runs: Sequence[dict[str, Any]],
    *,
    title: str,
    baseline: str | None = None,
    reference: str = "teacher",
    headline: str | None = None,
) -> dict[str, Any]:
    """Compute the content of ``report.json`` without writing anything.

    ``headline``: the metric the summary sentences and the retention column use; None takes the
    reference run's own choice (``eval.json``'s ``headline``, e.g. zero-shot accuracy when captions
    repeat), else ``mean_R@1``; the report keeps the evaluator's reason beside it.

    ``reference`` and ``baseline`` name a run, or a role held by exactly one run; with
    ``baseline=None`` the single run with role ``"baseline"`` (if any) is the baseline.

    Every run other than the reference gains:
      - ``retention``: {metric: run value ÷ reference value}, for metrics where the
        reference value is > 0;
      - ``speedup``: {latency key: reference ms ÷ run ms} for keys both runs have;
      - ``size_ratio``: run params ÷ reference params (None when either is unknown).
    """
    runs = _clean_runs(runs)
    ref = _pick(runs, reference, "reference")
    chosen = ref.get("headline") or {}
    if headline is None:
        headline = chosen.get("metric") or "mean_R@1"
    why = chosen.get("why") if chosen.get("metric") == headline else None
    if baseline is not None:
        base = _pick(runs, baseline, "baseline")
    else:
        baselines = [run for run in runs if run["role"] == "baseline"]
        base = baselines[0] if len(baselines) == 1 else None

    for run in runs:
        if run is ref:
            continue
        run["retention"] = {
            k: (ref["metrics"][k] / v if k in LOWER_IS_BETTER else v / ref["metrics"][k])
            for k, v in run["metrics"].items()
            if ref["metrics"].get(k, 0.0) > 0 and (v > 0 or k not in LOWER_IS_BETTER)
        }
        run["speedup"] = {
            k: ref["latency_ms"][k] / v for k, v in run["latency_ms"].items() if k in ref["latency_ms"] and v > 0
        }
        run["size_ratio"] = run["params"] / ref["params"] if run["params"] and ref["params"] else None

    report = {
        "title": title,
        "reference": ref["name"],
        "baseline": base["name"] if base else None,
        "headline": headline,
        "headline_why": why,
        "metric_names": _ordered_union([run["metrics"] for run in runs]),
        "latency_keys": _ordered_union([run["latency_ms"] for run in runs]),
        "runs": runs,
    }
    report["summary"] = _summary_lines(report)
    return report


def _summary_lines(report: dict[str, Any]) -> list[str]:
    """One sentence per compared run: headline retention, gap to the baseline, size and speed."""
    runs = {run["name"]: run for run in report["runs"]}
    ref, headline = runs[report["reference"]], report["headline"]
    base = runs.get(report["baseline"]) if report["baseline"] else None
    ref_label = "the teacher" if ref["role"] == "teacher" else ref["name"]
    base_label = "the baseline" if base and base["role"] == "baseline" else (base["name"] if base else "")

    lines = []
    for run in report["runs"]:
        if run is ref or run is base or headline not in run.get("retention", {}):
            continue
        line = f"{run['name']} keeps {run['retention'][headline] * 100:.1f}% of {ref_label}'s {headline}"
        if base is not None and headline in base["metrics"]:
            gap = run["metrics"][headline] - base["metrics"][headline]
            verb = "beats" if gap >= 0 else "trails"
            line += f" and {verb} {base_label} by {abs(gap):.2f} points"
        line += "."
        extras = []
        if run["size_ratio"] is not None:
            extras.append(f"has {run['size_ratio'] * 100:.1f}% of {ref_label}'s parameters")
        if run["speedup"]:
            key, value = next(iter(run["speedup"].items()))
            extras.append(f"runs {value:.2f}× as fast at {key}")
        if extras:
            line += " It " + " and ".join(extras) + "."
        lines.append(line)
    return lines


def _count(n: int | float | None) -> str:
    if n is None:
        return "—"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _table_cells(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) shared by the Markdown and the rich table."""
    keys, headline = report["latency_keys"], report["headline"]
    slash = " / ".join(keys)
    header = ["run", "role", "params", "size on disk", *report["metric_names"]]
    header += [f"latency ms ({slash})" if keys else "latency ms", f"retention ({headline})"]
    header += [f"speed-up ({slash})" if keys else "speed-up"]
    trained = any(run.get("training") for run in report["runs"])
    if trained:
        header += ["train time", "steps", "samples/s", "peak RSS"]

    rows = []
    for run in report["runs"]:
        is_ref = run["name"] == report["reference"]
        retention = 1.0 if is_ref and headline in run["metrics"] else run.get("retention", {}).get(headline)
        speedup = [1.0 if is_ref else run["speedup"].get(k) for k in keys]
        rows.append(
            [
                run["name"],
                run["role"],
                _count(run["params"]),
                "—" if run["size_bytes"] is None else human_bytes(run["size_bytes"]),
                *[_num(run["metrics"].get(m)) for m in report["metric_names"]],
                " / ".join(_num(run["latency_ms"].get(k)) for k in keys) or "—",
                _num(None if retention is None else retention * 100, "{:.1f}%"),
                " / ".join(_num(s, "{:.2f}×") for s in speedup) or "—",
            ]
        )
        if trained:
            t = run.get("training") or {}
            rows[-1] += [
                _duration(t.get("train_seconds")),
                _num(t.get("steps"), "{:.0f}"),
                _num(t.get("samples_per_s"), "{:.1f}"),
                "—" if t.get("peak_rss_bytes") is None else human_bytes(t["peak_rss_bytes"]),
            ]
    return header, rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _legend(report: dict[str, Any], trained: bool) -> list[str]:
    """What each column of the table means."""
    ref = report["reference"]
    lines = [
        "Columns:",
        "- params: parameter count; size on disk: the model folder's files (weights, tokenizer, config).",
        "- metric columns: the family's evaluation on the same held-out records, higher is better"
        + (" except wer / cer (speech recognition error rates, lower is better; their retention is the reference's ÷ the run's)"
           if any(m in LOWER_IS_BETTER for m in report["metric_names"]) else "")
        + (" (R@k in percent; i2t: each distinct image ranks the distinct captions; t2i: each distinct caption ranks the images)."
           if any(m.startswith("i2t_") for m in report["metric_names"]) else "."),
        f"- latency ms: median model time per batch at each batch size (bs1, bs32) or per query / sample; "
        f"speed-up = `{ref}`'s latency ÷ the run's.",
        f"- retention ({report['headline']}): the run's {report['headline']} ÷ `{ref}`'s.",
    ]
    if trained:
        lines.append("- train time: wall time of the training loop; steps: optimizer steps; samples/s: training samples "
                     "per second of that loop; peak RSS: the training process's peak resident memory (model building and data included).")
    return lines + [""]


def render_markdown(report: dict[str, Any], *, loss_curves: str | None = None, retention_plot: str | None = None) -> str:
    """The ``report.md`` text for a report dict from ``build_report``."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    header, rows = _table_cells(report)
    parts = [f"# {report['title']}", "", line(header), line(["---"] * len(header)), *map(line, rows), ""]
    parts += [
        f"Reference: `{report['reference']}`. Retention = run metric ÷ reference metric; "
        f"speed-up = reference latency ÷ run latency.",
        "",
    ]
    chance = next((run["chance"] for run in report["runs"] if run["name"] == report["reference"] and run.get("chance")), None)
    if chance:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in chance.items() if k in report["metric_names"])
        parts += [f"Chance (random scores on the same queries): {shown}.", ""]
    if report.get("headline_why"):
        parts += [f"Headline metric: {report['headline']}, because {report['headline_why']}.", ""]
    if report["summary"]:
        parts += [*report["summary"], ""]
    parts += _legend(report, any(run.get("training") for run in report["runs"]))
    parts += _task_lines(report, line)
    parts += _breakdown_lines(report, line)
    parts += _zeroshot_lines(report, line)
    if retention_plot:
        parts += [f"![{report['headline']} per run]({retention_plot})", ""]
    if loss_curves:
        parts += [f"![loss curves]({loss_curves})", ""]
    return "\n".join(parts)


def render_table(
    runs: Sequence[dict[str, Any]],
    *,
    title: str | None = None,
    baseline: str | None = None,
    reference: str = "teacher",
    headline: str | None = None,
) -> Table:
    """The report table as a ``rich.table.Table`` (what the CLI prints)."""
    header, rows = _table_cells(
        build_report(runs, title=title or "", baseline=baseline, reference=reference, headline=headline)
    )
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    return table


# ----------------------------------------------------------------------------- loss curves


def _read_log(path: Path) -> list[dict[str, Any]]:
    """Training lines (those with a numeric ``step`` and ``loss``) of a metrics.jsonl file.

    A line that is not valid JSON (e.g. the last line of a killed run) is skipped with a
    warning naming the file and line.
    """
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: not valid JSON, skipped", stacklevel=3)
                continue
            if isinstance(record, dict) and _is_number(record.get("step")) and _is_number(record.get("loss")):
                records.append(record)
    return records


def plot_loss_curves(runs: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> bool:
    """Plot loss vs step (solid) and loss parts (dashed/dotted) for runs whose ``run_dir`` has a metrics.jsonl.

    Loss parts are the other numeric keys of a training line, except ``NOT_LOSS_PARTS``
    and keys ending in ``_s``. Runs without logs are skipped. Returns whether a PNG was
    written (False when no run has a log).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logs = []
    for run in runs:
        log = Path(run["run_dir"]) / LOG_FILE if run.get("run_dir") else None
        if log is not None and log.is_file():
            records = _read_log(log)
            if records:
                logs.append((run["name"], records))
    if not logs:
        return False

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: no pyplot, no global backend change
    ax = fig.add_subplot()
    for i, (name, records) in enumerate(logs):
        color = f"C{i % 10}"
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], color=color, label=f"{name}: loss")
        parts = [
            k
            for k in _ordered_union(records)
            if k not in NOT_LOSS_PARTS and not k.endswith("_s") and any(_is_number(r.get(k)) for r in records)
        ]
        for j, part in enumerate(parts):
            points = [(r["step"], r[part]) for r in records if _is_number(r.get(part))]
            style = PART_STYLES[j % len(PART_STYLES)]
            ax.plot(*zip(*points), color=color, linestyle=style, alpha=0.7, label=f"{name}: {part}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def plot_retention(report: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """A bar per run of the headline metric, the reference's value as a dashed line, retention printed on
    each bar. Returns whether a PNG was written (False when fewer than two runs have the metric)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    headline = report["headline"]
    runs = [run for run in report["runs"] if headline in run["metrics"]]
    ref = next((run for run in runs if run["name"] == report["reference"]), None)
    if len(runs) < 2 or ref is None:
        return False
    fig = Figure(figsize=(1.6 * len(runs) + 2, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [run["metrics"][headline] for run in runs]
    colors = ["C0" if run is ref else ("C7" if run["role"] == "baseline" else "C1") for run in runs]
    bars = ax.bar([run["name"] for run in runs], values, color=colors)
    ax.axhline(ref["metrics"][headline], color="k", linestyle="--", linewidth=1, label=f"{ref['name']} ({headline} {ref['metrics'][headline]:.2f})")
    for bar, run in zip(bars, runs):
        kept = 1.0 if run is ref else run.get("retention", {}).get(headline)
        label = f"{run['metrics'][headline]:.1f}" + ("" if kept is None else f"\n{kept * 100:.0f}%")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize="small")
    ax.set_ylabel(headline)
    ax.set_ylim(0, max(values) * 1.25 if max(values) > 0 else 1)
    ax.set_title(f"{headline} per run (bar label: value and retention)")
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------- writing


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    runs: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    title: str,
    baseline: str | None = None,
    reference: str = "teacher",
    headline: str | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and (when logs exist) ``loss_curves.png`` to ``out_dir``.

    See ``build_report`` for how retention, speed-up and size ratio are computed and how
    ``reference`` / ``baseline`` are found. Returns the report dict written to report.json.
    """
    report = build_report(runs, title=title, baseline=baseline, reference=reference, headline=headline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    png = out_dir / "loss_curves.png"
    report["loss_curves"] = png.name if plot_loss_curves(report["runs"], png) else None
    bars = out_dir / "retention.png"
    report["retention_plot"] = bars.name if plot_retention(report, bars) else None
    confusions = out_dir / "zeroshot_confusion.png"
    report["zeroshot_plot"] = confusions.name if plot_confusions(report, confusions) else None
    _write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=True) + "\n")
    _write_text(out_dir / "report.md", render_markdown(report, loss_curves=report["loss_curves"], retention_plot=report["retention_plot"]))
    return report
