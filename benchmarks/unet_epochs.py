"""How many epochs the default U-Net needs: the default recipe trained for each length, scored on the DSB 2018
validation split, and each longer training compared with the shortest by a paired bootstrap over the validation
images. Run by hand, not by the tests (on 2 CPU cores 13 min per 20 epochs with bfloat16, longer in float32):

    python benchmarks/unet_epochs.py                           # 20 and 40 epochs, seed 42, in models/epochs_study/
    python benchmarks/unet_epochs.py --epochs 10 20 40 --out-dir /scratch/epochs

Only the training and validation splits are read: the post-processing of each model is chosen on validation, as
`cellkit train unet` does, and the test split is left for the final model. Each length is trained once (one seed),
so the intervals cover the variation over validation images, not over trainings; a difference whose interval holds
0 is "not resolved". The cosine schedule decays to 0 at the last epoch of each length, so a shorter training is
its own run, not an early snapshot of a longer one. A model already in the output folder is scored, not retrained.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def trained_model(epochs: int, out_dir: Path, data, seed: int) -> Path:
    """The default recipe trained for ``epochs`` on ``data.train`` (validation: ``data.val``), saved in ``out_dir``;
    an existing file is reused."""
    from cellkit import unet

    path = out_dir / f"unet_{epochs}_epochs.keras"
    if not path.exists():
        config = replace(unet.UNetConfig(), epochs=epochs)
        run = unet.train_unet(data.train, data.val, None, config=config, seed=seed, progress="epoch",
                              name=f"{epochs} epochs", measure_throughput=False)
        run.data["split"] = data.split
        run.save(path)
    return path


def validation_row(path: Path, val) -> tuple[dict, dict]:
    """(a table row: training time and validation F1, AP, SEG with intervals; the per-image validation scores)."""
    from cellkit import metrics, saving, unet

    run = unet.evaluate_saved_unet(path, val)
    fit = saving.read_record(path)["fit"]
    row = {"model": path.name, "epochs": fit["epochs_run"], "best_epoch": fit["best_epoch"],
           "train_minutes": fit["seconds"] / 60, "train_cpu_minutes": fit["cpu_seconds"] / 60,
           "postprocess": run.config.postprocess}
    for score, interval in metrics.segmentation_intervals(run.val_scores).items():
        row[f"val_{score}"] = interval.to_dict()
    return row, run.val_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 40], help="training lengths (default 20 40)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split, crops and weights (default 42)")
    parser.add_argument("--out-dir", type=Path, default=Path("models/epochs_study"),
                        help="models and the record (default models/epochs_study, beside the models git ignores)")
    args = parser.parse_args()

    from cellkit import datasets, metrics

    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = datasets.load_segmentation_data("dsb2018", args.seed)
    print(f"data: {data.source}: {len(data.train)} train, {len(data.val)} validation images ({data.split})")
    rows, scores = [], []
    for epochs in sorted(args.epochs):
        row, val_scores = validation_row(trained_model(epochs, args.out_dir, data, args.seed), data.val)
        rows.append(row)
        scores.append(val_scores)
        print(f"{epochs} epochs ({row['train_minutes']:.1f} min, best epoch {row['best_epoch']}): "
              + ", ".join(f"val {s} {metrics.Interval(**row[f'val_{s}'])}" for s in ("f1", "ap", "seg")))
    differences = []
    for row, val_scores in zip(rows[1:], scores[1:], strict=True):
        difference = {"longer": row["epochs"], "shorter": rows[0]["epochs"]}
        for score in ("f1", "ap", "seg"):
            interval = metrics.scores_difference(val_scores, scores[0], score)
            difference[score] = {**interval.to_dict(), "verdict": interval.verdict(
                (f"{row['epochs']} epochs", f"{rows[0]['epochs']} epochs"))}
            print(f"{row['epochs']} minus {rows[0]['epochs']} epochs, validation {score}: {interval}: "
                  f"{difference[score]['verdict']}")
        differences.append(difference)
    record = args.out_dir / "epochs_study.json"
    record.write_text(json.dumps({"seed": args.seed, "data": data.source, "split": data.split, "runs": rows,
                                  "differences": differences}, indent=1))
    print(f"wrote {record}")


if __name__ == "__main__":
    main()
