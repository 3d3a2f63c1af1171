"""Variants of the U-Net recipe compared on validation (cellkit.unet.study): seeds pooled, intervals over images,
verdicts with known answers. The trainer is a stand-in that "predicts" label images made to score as planted."""

from types import SimpleNamespace

import numpy as np
import pytest

from cellkit import metrics, unet


def _references(n_images: int = 24, nuclei: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Label images of ``nuclei`` separate 6 x 6 squares each, at random places on a grid."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images):
        labels = np.zeros((64, 64), np.int32)
        for k, cell in enumerate(rng.choice(16, nuclei, replace=False), start=1):
            row, col = divmod(int(cell), 4)
            labels[row * 16 + 4: row * 16 + 10, col * 16 + 4: col * 16 + 10] = k
        images.append(labels)
    return images


REFERENCES = _references()
IDS = [f"img{i}" for i in range(len(REFERENCES))]


def _missing(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``labels`` with each nucleus dropped with probability ``share``."""
    out = labels.copy()
    for k in range(1, int(labels.max()) + 1):
        if rng.random() < share:
            out[out == k] = 0
    return out


class _Trainer:
    """Scores a config by the share of nuclei it "misses": ``missing[config.base_filters]``, redrawn per seed."""

    def __init__(self, missing: dict[int, float]):
        self.missing = missing
        self.calls = []

    def __call__(self, train, val, test, config, name, seed, **options):
        self.calls.append((name, seed, options))
        rng = np.random.default_rng(seed * 1000 + config.base_filters)
        preds = [_missing(labels, self.missing[config.base_filters], rng) for labels in REFERENCES]
        scores = metrics.segmentation_scores(preds, REFERENCES, IDS)
        fit = SimpleNamespace(seconds=60.0 * config.base_filters, epochs_run=2, best_epoch=2)
        return SimpleNamespace(val_scores=scores, fit=fit, config=config)


def _study(missing: dict[int, float], seeds=(1, 2)):
    trainer = _Trainer(missing)
    return unet.SeededVariants("train", "val", seeds=seeds, trainer=trainer, tune=False), trainer


def test_pooling_runs_counts_every_nucleus_of_every_run():
    rng = np.random.default_rng(3)
    a = metrics.segmentation_scores([_missing(g, 0.5, rng) for g in REFERENCES], REFERENCES, IDS)
    perfect = metrics.segmentation_scores(REFERENCES, REFERENCES, IDS)
    one = metrics.pooled_over_runs([a])
    assert one["f1"] == pytest.approx(a["f1"]) and one["seg"] == pytest.approx(a["seg"])
    both = metrics.pooled_over_runs([a, perfect])
    tp = a["tp"] + perfect["tp"]
    assert both["f1"] == pytest.approx(2 * tp / (2 * tp + a["fp"] + a["fn"]))
    assert both["seg"] == pytest.approx((a["seg"] + perfect["seg"]) / 2)  # the same nuclei in both runs
    assert both["n_runs"] == 2 and both["n_images"] == len(REFERENCES)
    interval = metrics.segmentation_intervals(both, n_resamples=200)["seg"]
    assert interval.low <= both["seg"] <= interval.high
    with pytest.raises(ValueError, match="same images"):
        metrics.pooled_over_runs([a, metrics.segmentation_scores(REFERENCES[1:], REFERENCES[1:], IDS[1:])])


def test_a_variant_against_itself_is_not_resolved_and_a_planted_difference_is_found():
    study, trainer = _study({4: 0.0, 8: 0.0, 16: 0.5})
    study.train("full", unet.UNetConfig(base_filters=16, epochs=1))  # misses half the nuclei
    study.train("same", unet.UNetConfig(base_filters=16, epochs=1))  # equal config: reused, not trained again
    study.train("better", unet.UNetConfig(base_filters=8, epochs=1))
    assert study.n_trained == 4 and [c[:2] for c in trainer.calls] == [("full", 1), ("full", 2), ("better", 1),
                                                                        ("better", 2)]
    assert trainer.calls[0][2] == {"tune": False}  # options reach every run
    itself = study.difference("full", "same", "seg", n_resamples=200)
    assert itself.estimate == 0 and itself.contains(0)
    planted = study.difference("better", "full", "f1", n_resamples=500)
    assert planted.low > 0.2  # perfect against half the nuclei missed
    verdicts = unet.ablation_verdicts(study, "better", {"full": "a planted loss", "better": "nothing"},
                                      n_resamples=200)
    assert verdicts.loc["a planted loss", "seg verdict"] == "it helps"
    assert verdicts.loc["nothing", "seg verdict"] == "not resolved"
    headline = unet.ablation_headline(verdicts)
    assert headline["without_a_planted_loss_seg_loss"] == verdicts.loc["a planted loss", "full - variant seg"]
    low, high = headline["without_a_planted_loss_seg_loss_ci"]
    assert 0 < low <= headline["without_a_planted_loss_seg_loss"] <= high
    assert set(headline) == {"without_a_planted_loss_seg_loss", "without_a_planted_loss_seg_loss_ci",
                             "without_nothing_seg_loss", "without_nothing_seg_loss_ci"}
    assert unet.improvement_verdict(metrics.Interval(-0.1, -0.2, -0.05, 0.95, 10, 100)) == "removing it is better"


def test_the_table_shows_each_seed_and_the_pooled_interval():
    study, _ = _study({8: 0.3})
    study.train("a", unet.UNetConfig(base_filters=8, epochs=1))
    table = study.table(n_resamples=200)
    row = table.loc["a"]
    seeds = [row["seg seed 1"], row["seg seed 2"]]
    assert seeds[0] != seeds[1]  # the stand-in redraws per seed
    assert row["seg low"] <= row["val seg"] <= row["seg high"]
    assert row["seg seed range"] == pytest.approx(abs(seeds[0] - seeds[1]))
    assert row["train min"] == pytest.approx(8.0) and row["epochs (best)"] == "2 (2), 2 (2)"
    curve = unet.curve_table(study, {"a": {"learning rate": 0.002}}, "seg", n_resamples=200)
    assert curve.loc["a", "learning rate"] == 0.002 and curve.loc["a", "seed min"] == min(seeds)


def test_choose_keeps_the_cheaper_variant_when_the_difference_is_not_resolved():
    study, _ = _study({4: 0.1, 8: 0.1, 16: 0.6})  # w4 and w8 miss as many nuclei, in different draws
    for filters in (4, 8, 16):
        study.train(f"w{filters}", unet.UNetConfig(base_filters=filters, epochs=1))
    cost = {"w4": 1.0, "w8": 2.0, "w16": 3.0}
    assert study.difference("w4", "w8", "seg", n_resamples=300).contains(0)
    chosen, why = unet.choose(study, ["w4", "w8", "w16"], cost, "seg", n_resamples=300)
    assert chosen == "w4"  # the cheapest of the variants not resolved from the best
    w4_best = study.pooled("w4")["seg"] >= study.pooled("w8")["seg"]
    assert why.startswith("w4 has the highest") if w4_best else why.endswith("so the cheaper w4 is kept")
    chosen, why = unet.choose(study, ["w8", "w16"], cost, "seg", n_resamples=300)
    assert chosen == "w8" and "highest" in why
    with pytest.raises(ValueError, match="at least one seed"):
        unet.SeededVariants("train", "val", seeds=())
