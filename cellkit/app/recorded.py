"""Recorded results for the Performance and Compare tabs: notebook records and the JSON beside models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellkit.app.models import find_models, read_json


@dataclass
class ClassifierResult:
    """One classifier's test (or validation) report with where it came from."""

    name: str
    source: str
    profile: str
    data: str
    report: dict[str, Any]
    part: str = "test"
    history: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"result": self.name, "accuracy": _round(self.report.get("accuracy")),
                "macro-F1": _round(self.report.get("macro_f1")), "ROC AUC": _round(self.report.get("auc_ovr")),
                "images": self.report.get("n"), "split": self.part, "profile": self.profile, "data": self.data,
                "source": self.source}

    def per_class(self) -> dict[str, dict[str, float]]:
        return self.report.get("per_class") or {}


def _round(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, int | float) else value


def _is_report(node: Any) -> bool:
    return isinstance(node, dict) and {"per_class", "confusion_matrix", "accuracy"} <= set(node)


def _reports_in(node: Any, trail: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every dict under ``node`` that holds a classification report under ``test`` (or, lacking a test
    split, ``validation``), with the keys leading to it."""
    found = []
    if isinstance(node, dict):
        for part in ("test", "validation"):
            if _is_report(node.get(part)):
                found.append((trail, node))
                break
        for key, value in node.items():
            if key not in ("test", "validation"):
                found += _reports_in(value, (*trail, str(key)))
    return found


def _provenance(record: dict[str, Any]) -> tuple[str, str]:
    """(profile, data) of a notebook's metrics.json; synthetic stand-in data is named as such."""
    names = sorted({d.get("name", "?") for d in (record.get("datasets") or {}).values()})
    data = "SYNTHETIC stand-in" if record.get("synthetic_data") else ", ".join(names) or "-"
    return str(record.get("profile", "?")), data


def _result(name: str, source: str, profile: str, data: str, node: dict[str, Any]) -> ClassifierResult:
    part = "test" if _is_report(node.get("test")) else "validation"
    history = node.get("history") or (node.get("fit") or {}).get("history") or {}
    return ClassifierResult(name, source, profile, data, node[part], part, history)


def classifier_results(figures_dir: str | Path, models_dir: str | Path) -> list[ClassifierResult]:
    """Classifier reports recorded by notebook runs (``figures/*/metrics.json``) and trained models
    (``models/*.json``), in that order."""
    results = []
    for path in sorted(Path(figures_dir).glob("*/metrics.json")):
        record = read_json(path) or {}
        profile, data = _provenance(record)
        for trail, node in _reports_in(record.get("metrics") or {}):
            name = f"{path.parent.name}: {'/'.join(trail) or 'model'}"
            results.append(_result(name, f"figures/{path.parent.name}/metrics.json", profile, data, node))
    for entry in find_models(models_dir)[0]:
        if entry.kind == "classifier" and _reports_in(entry.record):
            data = (entry.record.get("data") or {}).get("source") or entry.info.trained_on or "-"
            source = f"models/{entry.path.with_suffix('.json').name}"
            results.append(_result(f"{entry.path.name} ({entry.info.model})", source, "cellkit train classifier",
                                   data, entry.record))
    return results


def segmentation_results(figures_dir: str | Path, models_dir: str | Path) -> list[dict[str, Any]]:
    """U-Net scores at IoU 0.5 and SEG from notebook headlines and ``models/*.json``, one row each."""
    rows = []
    for path in sorted(Path(figures_dir).glob("*/metrics.json")):
        record = read_json(path) or {}
        headline = record.get("headline") or {}
        if "f1_iou50" in headline:
            profile, data = _provenance(record)
            rows.append({"result": f"{path.parent.name}: best U-Net", "F1": _round(headline.get("f1_iou50")),
                         "AP": _round(headline.get("ap_iou50")), "SEG": _round(headline.get("seg")),
                         "profile": profile, "data": data, "source": f"figures/{path.parent.name}/metrics.json"})
    for entry in find_models(models_dir)[0]:
        test = entry.record.get("test") if entry.kind == "unet" else None
        if isinstance(test, dict):
            rows.append({"result": entry.path.name, "F1": _round(test.get("f1")), "AP": _round(test.get("ap")),
                         "SEG": _round(test.get("seg")), "profile": "cellkit train unet",
                         "data": (entry.record.get("data") or {}).get("source") or "-",
                         "source": f"models/{entry.path.with_suffix('.json').name}"})
    return rows


def per_class_f1(results: list[ClassifierResult]):
    """A DataFrame of per-class F1 (rows: classes of the first result, columns: results)."""
    import pandas as pd

    columns = {r.name: {c: s.get("f1") for c, s in r.per_class().items()} for r in results}
    return pd.DataFrame(columns).round(3)


def default_pair(results: list[ClassifierResult]) -> tuple[str, str]:
    """The two results the Compare tab opens with: the best non-ViT model and a ViT if one is recorded
    (report 000's comparison), else the two best by accuracy."""
    ranked = sorted(results, key=lambda r: -(r.report.get("accuracy") or 0))
    vit = [r for r in ranked if "vit" in r.name.lower()]
    cnn = [r for r in ranked if "vit" not in r.name.lower()]
    pair = [cnn[0], vit[0]] if cnn and vit else ranked[:2]
    names = [r.name for r in pair] + [r.name for r in ranked][: 2 - len(pair)]
    return (names[0], names[-1]) if names else ("", "")
