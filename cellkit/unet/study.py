"""Comparing variants of the U-Net recipe (notebook 07): each configuration trained once per seed, scored on the
validation images only, with bootstrap intervals over those images and the spread over seeds.

>>> from cellkit import unet
>>> study = unet.SeededVariants(train, val, seeds=(42, 43), measure_throughput=False, tune=False)
>>> study.train("full", unet.UNetConfig(base_filters=8, epochs=2))
>>> study.train("- 3 classes", unet.UNetConfig(base_filters=8, epochs=2, n_classes=1))
>>> study.difference("full", "- 3 classes", "seg")        # paired over the validation images, seeds pooled
>>> study.table(["full", "- 3 classes"])                    # one row per variant: intervals and seeds

A run never sees the test images: the study chooses, and the test split is read once, for the final model, outside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from cellkit import metrics
from cellkit.datasets import SegmentationSet
from cellkit.unet.config import UNetConfig
from cellkit.unet.train import UNetRun, train_unet


class Variants(Mapping[str, UNetRun]):
    """Named runs of U-Net variants on one split, each configuration trained once: a variant whose
    :class:`UNetConfig` equals (``==``, every field) one already trained reuses that run instead of training it
    again (notebook 07: the full model with a learning rate that another study also tries is trained once).

    Parameters
    ----------
    train, val, test : the SegmentationSets every variant is trained, tuned and scored on (``test`` None: none).
    trainer : called as ``trainer(train, val, test, config=config, name=name, **options)`` and returning a
        :class:`UNetRun`; default :func:`train_unet` (tests pass a stand-in).
    **options : further keyword arguments of ``trainer``, the same for every variant (``seed``, ``precision``,
        ``progress``, ``keep_test_predictions``, ...).

    A read-only mapping of name -> :class:`UNetRun` in the order the variants were added; names that share a run
    map to the same object.
    """

    def __init__(self, train: SegmentationSet, val: SegmentationSet, test: SegmentationSet | None = None,
                 trainer: Callable[..., UNetRun] | None = None, **options: Any) -> None:
        self.data = (train, val, test)
        self.trainer = trainer or train_unet
        self.options = options
        self._runs: dict[str, UNetRun] = {}
        self._trained: list[tuple[UNetConfig, str, UNetRun]] = []  # each configuration trained: its first name, run

    def trained_as(self, config: UNetConfig) -> str | None:
        """The name of the variant an equal configuration was trained for, or None if none was."""
        return next((name for done, name, _ in self._trained if done == config), None)

    def train(self, name: str, config: UNetConfig) -> UNetRun:
        """The run of ``config``, kept under ``name``: that of an equal configuration trained before, or a new one."""
        run = next((run for done, _, run in self._trained if done == config), None)
        if run is None:
            run = self.trainer(*self.data, config=config, name=name, **self.options)
            self._trained.append((replace(config), name, run))  # a copy: the caller may change its config later
        self._runs[name] = run
        return run

    def add(self, name: str, run: UNetRun) -> UNetRun:
        """Keep a run made elsewhere (e.g. a saved model, :func:`evaluate_saved_unet`) under ``name``; it is never
        reused for a configuration to train."""
        self._runs[name] = run
        return run

    @property
    def n_trained(self) -> int:
        """How many variants were actually trained."""
        return len(self._trained)

    def __getitem__(self, name: str) -> UNetRun:
        return self._runs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._runs)

    def __len__(self) -> int:
        return len(self._runs)


class SeededVariants:
    """Variants of a recipe, each trained with every seed of ``seeds`` on the same training images and scored on
    the same validation images (no test set: choices are made here, the test split is read elsewhere, once).

    Each seed has its own :class:`Variants`, so within a seed an equal configuration is trained once. A variant's
    validation scores pool its seeds (:func:`cellkit.metrics.pooled_over_runs`): its F1 and SEG count every
    seed's nuclei, and its intervals and paired differences resample validation images, each image carrying all
    its seeds' counts. The seeds' own scores are kept beside them, so their spread shows what a reseed changes.

    ``options`` go to the trainer of every run (default :func:`train_unet`), e.g. ``tune=False`` to score every
    variant with the same default post-processing.
    """

    def __init__(self, train: SegmentationSet, val: SegmentationSet, seeds: Sequence[int],
                 trainer: Callable[..., UNetRun] | None = None, **options: Any) -> None:
        if not seeds:
            raise ValueError("a seeded study needs at least one seed")
        self.seeds = tuple(int(seed) for seed in seeds)
        self._by_seed = {seed: Variants(train, val, None, trainer=trainer, seed=seed, **options)
                         for seed in self.seeds}
        self._names: list[str] = []

    def train(self, name: str, config: UNetConfig) -> list[UNetRun]:
        """The runs of ``config`` under ``name``, one per seed (reusing an equal configuration's runs)."""
        runs = [variants.train(name, config) for variants in self._by_seed.values()]
        if name not in self._names:
            self._names.append(name)
        return runs

    @property
    def names(self) -> list[str]:
        """The variants trained, in order."""
        return list(self._names)

    @property
    def n_trained(self) -> int:
        """Runs actually trained (configurations times seeds, reused ones not counted)."""
        return sum(variants.n_trained for variants in self._by_seed.values())

    def runs(self, name: str) -> list[UNetRun]:
        """The runs of variant ``name``, one per seed in the order of :attr:`seeds`."""
        return [self._by_seed[seed][name] for seed in self.seeds]

    def seed_scores(self, name: str, score: str) -> list[float]:
        """Validation ``score`` of each run of ``name``, one per seed in the order of :attr:`seeds`."""
        return [run.val_scores[score] for run in self.runs(name)]

    def train_minutes(self, name: str) -> float:
        """Mean wall time of training one run of ``name``, in minutes."""
        return float(np.mean([run.fit.seconds for run in self.runs(name)])) / 60

    def pooled(self, name: str) -> dict[str, Any]:
        """Validation scores of ``name`` pooled over its seeds (:func:`cellkit.metrics.pooled_over_runs`)."""
        return metrics.pooled_over_runs([run.val_scores for run in self.runs(name)])

    def intervals(self, name: str, **options: Any) -> dict[str, metrics.Interval]:
        """F1 and AP at IoU 0.5 and SEG of ``name`` on validation, seeds pooled, with bootstrap intervals over the
        validation images (``options``: of :func:`cellkit.metrics.bootstrap_interval`)."""
        return metrics.segmentation_intervals(self.pooled(name), **options)

    def difference(self, a: str, b: str, score: str = "seg", **options: Any) -> metrics.Interval:
        """Validation ``score`` of variant ``a`` minus that of ``b``, seeds pooled, with its paired bootstrap
        interval over the validation images."""
        return metrics.scores_difference(self.pooled(a), self.pooled(b), score, **options)

    def table(self, names: Sequence[str] | None = None, scores: Sequence[str] = ("f1", "seg"),
              **options: Any) -> pd.DataFrame:
        """One row per variant (default: all, in order): for each score the estimate with seeds pooled, its 95 %
        interval over validation images (``<score> low``, ``<score> high``), each seed's value
        (``<score> seed <s>``) and the seeds' range; then the mean training minutes and epochs of a run."""
        rows = []
        for name in names or self._names:
            row: dict[str, Any] = {"variant": name}
            intervals = self.intervals(name, **options)
            for score in scores:
                row.update({f"val {score}": intervals[score].estimate, f"{score} low": intervals[score].low,
                            f"{score} high": intervals[score].high})
                values = self.seed_scores(name, score)
                row.update({f"{score} seed {seed}": value for seed, value in zip(self.seeds, values, strict=True)})
                row[f"{score} seed range"] = float(np.ptp(values))
            row["train min"] = self.train_minutes(name)
            row["epochs (best)"] = ", ".join(f"{run.fit.epochs_run} ({run.fit.best_epoch})" for run in self.runs(name))
            rows.append(row)
        return pd.DataFrame(rows).set_index("variant")


def ablation_verdicts(study: SeededVariants, full: str, removed: Mapping[str, str],
                      scores: Sequence[str] = ("seg", "f1"), **options: Any) -> pd.DataFrame:
    """What each improvement is worth in the company of the others (report 002's figure 15): for each variant of
    ``removed`` (variant name -> the improvement it removes), the validation score of ``full`` minus that of the
    variant, with its paired interval over validation images, and the verdict: ``it helps`` when the whole
    interval is above 0, ``removing it is better`` when below, ``not resolved`` when it holds 0."""
    rows = []
    for name, improvement in removed.items():
        row: dict[str, Any] = {"improvement removed": improvement, "variant": name}
        for score in scores:
            difference = study.difference(full, name, score, **options)
            row.update({f"full - variant {score}": difference.estimate, f"{score} low": difference.low,
                        f"{score} high": difference.high, f"{score} verdict": improvement_verdict(difference)})
        rows.append(row)
    return pd.DataFrame(rows).set_index("improvement removed")


def ablation_headline(verdicts: pd.DataFrame, score: str = "seg") -> dict[str, Any]:
    """The record's headline numbers of an ablation (:func:`ablation_verdicts`): for each improvement,
    ``without_<improvement>_<score>_loss`` (full minus the variant without it; spaces become ``_``) and the same
    key with ``_ci`` holding its [low, high] interval, the keys ``notebooks/results.yml`` reads."""
    headline: dict[str, Any] = {}
    for improvement, row in verdicts.iterrows():
        key = f"without_{str(improvement).replace(' ', '_')}_{score}_loss"
        headline[key] = float(row[f"full - variant {score}"])
        headline[f"{key}_ci"] = [float(row[f"{score} low"]), float(row[f"{score} high"])]
    return headline


def improvement_verdict(difference: metrics.Interval) -> str:
    """The verdict on an improvement from the interval of (with it) - (without it)."""
    if difference.low > 0:
        return "it helps"
    if difference.high < 0:
        return "removing it is better"
    return "not resolved"


def curve_table(study: SeededVariants, settings: Mapping[str, Mapping[str, Any]], score: str = "seg",
                **options: Any) -> pd.DataFrame:
    """Scores against hyperparameters (report 002's figures 12 and 13): one row per variant of ``settings``
    (variant name -> its hyperparameter values, e.g. ``{"learning rate": 2e-4}``), with those values as columns,
    the validation ``score`` with seeds pooled and its interval over images, each seed's value, and the seeds'
    minimum and maximum (the spread the figure draws)."""
    rows = []
    for name, values in settings.items():
        interval = study.intervals(name, **options)[score]
        seeds = study.seed_scores(name, score)
        rows.append({"variant": name, **values, f"val {score}": interval.estimate, "low": interval.low,
                     "high": interval.high, "seed min": min(seeds), "seed max": max(seeds),
                     **{f"seed {seed}": value for seed, value in zip(study.seeds, seeds, strict=True)},
                     "train min": study.train_minutes(name)})
    return pd.DataFrame(rows).set_index("variant")


def choose(study: SeededVariants, names: Sequence[str], cost: Mapping[str, float], score: str = "seg",
           **options: Any) -> tuple[str, str]:
    """The variant to keep among ``names`` on validation: the best by ``score`` (seeds pooled), unless a cheaper
    one (lower ``cost``, e.g. training seconds) is not resolved from it, in which case the cheapest such one.
    Returns (the name, one sentence saying why)."""
    best = max(names, key=lambda name: study.pooled(name)[score])
    tied = [name for name in names if name == best or study.difference(best, name, score, **options).low <= 0]
    cheapest = min(tied, key=lambda name: cost[name])
    if cheapest == best:
        return best, f"{best} has the highest validation {score.upper()}" + (
            "" if len(tied) == 1 else f" and is the cheapest of those it is not resolved from ({', '.join(tied)})")
    difference = study.difference(best, cheapest, score, **options)
    return cheapest, (f"{best} has the highest validation {score.upper()}, but {best} - {cheapest} is {difference}, "
                      f"not resolved, so the cheaper {cheapest} is kept")
