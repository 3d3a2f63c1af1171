"""The ``cellkit`` command: a thin layer over the package. Bad input ends with a one-line reason.

Examples
--------
cellkit data list
cellkit data fetch pbc
cellkit run-notebooks --profile smoke --only 01
cellkit train classifier --model cellnet --data pbc28 --out models/cellnet.keras
cellkit evaluate classifier --model models/cellnet.keras --data pbc28 --json scores.json
cellkit classify --model models/cellnet.keras my_cells/ --csv predictions.csv
cellkit train unet --data dsb2018 --classes 3 --out models/unet.keras
cellkit segment --model models/unet.keras --input my_images/ --out masks/ --overlay
cellkit segment --resume --out masks/
cellkit segment --model models/unet.keras --input my_images/ --out masks/ --workers 2
cellkit evaluate segmentation --pred masks/ --gt my_labels/ --json scores.json
cellkit app --models models/
cellkit export --format bioimageio --model models/unet.keras --out unet.bioimageio.zip
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cellkit import outputs

EXIT_BAD_INPUT = 2


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in epilogs on their own lines."""


def _add_command(subparsers: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
                 help_text: str, example: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}", formatter_class=_Formatter
    )
    parser.set_defaults(handler=handler)
    return parser


# --- cellkit data ------------------------------------------------------------------------------------


def _data_list(args: argparse.Namespace) -> int:
    from cellkit import datasets

    for entry in datasets.REGISTRY.values():
        folder = datasets.locate(entry.name)
        where = str(folder) if folder else f"not found (get it with: cellkit data fetch {entry.fetch_name})"
        print(f"{entry.name}: {entry.title}")
        print(f"  found:    {where}")
        print(f"  licence:  {entry.licence}")
        print(f"  source:   {entry.source_url}")
        print(f"  cite:     {entry.citation}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from cellkit import datasets

    missing = [entry for entry in datasets.REGISTRY.values() if datasets.locate(entry.name) is None]
    names = sorted({e.fetch_name for e in missing})
    if missing and args.fetch:
        from cellkit.datasets import fetch

        print(f"real data missing ({', '.join(e.name for e in missing)}): fetching {' '.join(names)}", flush=True)
        try:
            for name in names:
                fetch.fetch(name, progress=not args.quiet)
        except Exception as error:  # noqa: BLE001 - any failure of the download ends in the one line below
            print(f"error: fetching {' '.join(names)} failed ({_one_line(error)}); set CELLKIT_DATA_DIR to a folder "
                  "that holds the datasets (see data/README.md)", file=sys.stderr)
            return 1
        missing = [entry for entry in datasets.REGISTRY.values() if datasets.locate(entry.name) is None]
    for entry in datasets.REGISTRY.values():
        print(f"{entry.name}: {datasets.locate(entry.name) or 'MISSING'}")
    if missing:
        print(
            f"error: real data missing ({', '.join(e.name for e in missing)}); set CELLKIT_DATA_DIR to a folder "
            f"that holds them or run `cellkit data fetch {' '.join(names)}`",
            file=sys.stderr,
        )
        return 1
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cellkit.datasets import fetch

    dest = Path(args.dest) if args.dest else None
    for name in args.names:
        for folder in fetch.fetch(name, dest_dir=dest, progress=not args.quiet, mirror=args.mirror):
            print(f"{name}: built {folder}")
    return 0


# --- cellkit run-notebooks ---------------------------------------------------------------------------


def _run_notebooks(args: argparse.Namespace) -> int:
    from cellkit import notebooks

    paths = notebooks.notebook_paths(args.only)
    print(f"running {len(paths)} notebook(s) in the {args.profile!r} profile")
    results = []
    for path in paths:
        print(f"--> {path.name}", flush=True)
        result = notebooks.run_notebook(path, args.profile, progress=not args.quiet, timeout=args.cell_timeout)
        status = "ok" if result.ok else f"FAILED ({result.error})"
        print(f"<-- {path.name}: {status} in {result.seconds:.1f} s; executed copy: {result.output}", flush=True)
        results.append(result)
    data_words = {True: "SIMULATED stand-in", False: "real", None: "no record"}
    print("\nnotebook                                   seconds  status  data")
    for result in results:
        print(f"{result.notebook:<42} {result.seconds:>7.1f}  {'ok' if result.ok else 'FAILED':<6}  "
              f"{data_words[result.synthetic_data]}")
    simulated = [r.notebook for r in results if r.synthetic_data]
    if simulated:
        print(f"WARNING: {len(simulated)} notebook(s) ran on the simulated stand-in, not the real data: "
              f"{', '.join(simulated)}; their numbers are not the course's (get the data: cellkit data check --fetch)",
              file=sys.stderr)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"error: {len(failed)} notebook(s) failed: {', '.join(r.notebook for r in failed)}", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from cellkit import results

    if args.check:
        problems = results.check(args.profile)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"the records in {results.results_dir(args.profile)} are those of the code in the tree")
    elif args.write:
        print(f"wrote the results table into {results.write_results_table()}")
    else:
        print(results.results_table())
    return 0


# --- cellkit train classifier, evaluate classifier, classify -----------------------------------------


def _progress_mode(args: argparse.Namespace) -> str:
    if getattr(args, "quiet", False):
        return "none"
    return "bar" if sys.stderr.isatty() else "epoch"


def _check_model_out(out: Path, overwrite: bool, inputs: Sequence[str]) -> None:
    """Check a model file to be written, and the JSON beside it, before training (:func:`outputs.check_file`)."""
    from cellkit import saving

    if out.suffix != ".keras":
        raise ValueError(f"{out}: the model file must end in .keras")
    outputs.check_file(out, "--out", overwrite, inputs)
    record = saving.sidecar_path(out)
    if record.exists() and not overwrite and not record.is_dir():
        raise outputs.OutputError(f"{record}: the record that goes beside {out.name} already exists; pass "
                                  "--overwrite to replace both, or choose another --out")
    outputs.check_file(record, "--out", overwrite, inputs)


def _save_model(run: Any, out: Path) -> Path:
    """Save a trained run's model and its JSON under temporary names, then rename both into place (model first):
    an interrupted save leaves the previous files, not half a model."""
    from cellkit import saving

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = outputs.temporary_name(out, keep_suffix=True)
    try:
        run.save(temp)
        os.replace(temp, out)
        os.replace(saving.sidecar_path(temp), saving.sidecar_path(out))
    finally:
        temp.unlink(missing_ok=True)
        saving.sidecar_path(temp).unlink(missing_ok=True)
    return out


def _write_json(out: Path, report: dict[str, Any]) -> None:
    """Write a report as indented JSON through a temporary name and say where."""
    from cellkit import config

    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_text(out, config.to_json(report))
    print(f"wrote {out}")


def _skip_warner(failed: list[Path]) -> Callable[[Path, str], None]:
    """An ``on_error(path, message)`` that prints one warning line per skipped file and remembers the file."""

    def warn(path: Path, message: str) -> None:
        failed.append(path)
        reason = message if message.startswith(str(path)) else f"{path}: {message}"
        print(f"warning: skipped {reason}", file=sys.stderr, flush=True)

    return warn


def _train_classifier(args: argparse.Namespace) -> int:
    from cellkit import classifiers, config, saving

    entry = classifiers.spec(args.model)  # a one-line error for an unknown name, before TensorFlow loads
    size = args.size or entry.input_size
    entry.check_size(size)
    out = Path(args.out) if args.out else config.models_dir() / f"{entry.name}.keras"
    _check_model_out(out, args.overwrite, [args.data])  # before the training, so that no work is lost
    from cellkit import datasets, runtime, training

    data = datasets.load_training_data(args.data, size, args.crop, args.seed)
    print(f"data: {data.source}: {len(data.train)} train, {len(data.val)} validation, "
          f"{len(data.test) if data.test is not None else 0} test images, {len(data.train.class_names)} classes "
          f"({data.split}); inputs {size}x{size}, crop {data.crop or 'largest centred square'}", flush=True)
    if args.threads:
        runtime.set_threads(args.threads)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                 "patience": args.patience, "augment": args.augment, "tta": args.tta,
                 "class_weight": "balanced" if args.balanced else None}
    fit_config = training.FitConfig.for_model(entry.name, **overrides)
    print(f"training {entry.name} ({entry.description}); recipe: {fit_config}", flush=True)
    run = training.train_classifier(entry.name, data.train, data.val, data.test, input_size=size, crop=data.crop,
                                    config=fit_config, precision=args.precision, seed=args.seed,
                                    progress=_progress_mode(args))
    run.data["split"] = data.split
    path = _save_model(run, out)
    summary = run.summary()
    print(f"trained in {summary['train_seconds']:.0f} s ({summary['epochs_run']} epochs, best {summary['best_epoch']}, "
          f"{summary['precision']}), peak memory {summary['peak_rss_mb']:.0f} MiB, "
          f"{summary['images_per_second']:.0f} images/s (test-time augmentation: {summary['tta']})")
    target = classifiers.CELLNET_VAL_ACCURACY_TARGET
    reached = run.fit.seconds_to_reach(target)
    print(f"validation accuracy {target}: "
          + (f"first reached after {reached:.0f} s of training" if reached is not None else "never reached"))
    part, report = ("test", run.test_report) if run.test_report else ("validation", run.val_report)
    print(f"{part}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
          f"AUC {report.get('auc_ovr') or float('nan'):.4f} on {report['n']} images")
    print(f"wrote {path} and {saving.sidecar_path(path)}")
    return 0


def _evaluate_classifier(args: argparse.Namespace) -> int:
    from cellkit import classifiers, datasets, saving

    saving.check_model_file(args.model, "cellkit train classifier")
    out = outputs.check_file(args.json, "--json", args.overwrite, [args.data, args.model]) if args.json else None
    info = classifiers.read_info(args.model)
    # the labels are checked before Keras loads; in a folder an unreadable image is skipped, as classify does
    failed: list[Path] = []
    data = datasets.load_evaluation_data(args.data, info.class_names, info.input_size, info.crop, args.split,
                                         on_error=_skip_warner(failed))
    from cellkit import training

    trained = classifiers.load(args.model)
    images = trained.prepare(data.images)
    report = training.evaluate(trained, images, data.labels, args.tta)
    report.update({"model": str(args.model), "data": str(args.data), "n_unreadable": len(failed),
                   "unreadable": [str(path) for path in failed]})
    print(f"{args.data}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
          f"AUC {report.get('auc_ovr') or float('nan'):.4f} on {report['n']} images "
          f"(test-time augmentation: {report['tta']})")
    for name, scores in report["per_class"].items():
        print(f"  {name:<16} precision {scores['precision']:.3f}  recall {scores['recall']:.3f}  "
              f"F1 {scores['f1']:.3f}  n {scores['support']}")
    if out is not None:
        _write_json(out, report)
    if failed:
        print(f"error: {len(failed)} of {len(failed) + report['n']} files could not be read and were left out",
              file=sys.stderr)
        return 1
    return 0


def _classify(args: argparse.Namespace) -> int:
    from cellkit import classifiers, inference
    from cellkit.datasets import DataError
    from cellkit.runtime import NonFiniteOutputs

    files = inference.image_files(args.path)
    out = outputs.check_file(args.csv, "--csv", args.overwrite, [args.path, args.model]) if args.csv else None
    trained = classifiers.load(args.model)
    failed: list[Path] = []
    try:
        rows = inference.classify_files(trained, files, tta=args.tta, on_error=_skip_warner(failed))
    except NonFiniteOutputs as error:  # the model's fault, not an image's: name the model
        raise DataError(f"{args.model}: {error}") from None
    width = max((len(r["file"]) for r in rows), default=4)
    if rows:
        print(f"{'file':<{width}}  {'class':<16} probability")
    for row in rows:
        print(f"{row['file']:<{width}}  {row['class']:<16} {row['probability']:.3f}")
    if out is not None:
        import pandas as pd

        out.parent.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame(rows, columns=["file", "class", "probability", *(f"p_{n}" for n in trained.class_names)])
        outputs.write_text(out, table.to_csv(index=False))
        print(f"wrote {out}")
    if failed:
        print(f"error: {len(failed)} of {len(files)} files could not be read", file=sys.stderr)
        return 1
    return 0


def _add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"{what} (default: refuse, before any work)")


def _add_training_run_options(parser: argparse.ArgumentParser, seed_help: str, default_out: str) -> None:
    """The options every training command shares: precision, threads, seed, output file, quiet."""
    parser.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="auto: mixed bfloat16 where the CPU supports it (saved models are float32 anyway)")
    parser.add_argument("--threads", type=int, help="threads inside TensorFlow ops (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=42, help=seed_help)
    parser.add_argument("--out", metavar="FILE.keras", help=f"model file (default: {default_out}); checked before "
                                                            "the training starts")
    _add_overwrite(parser, "replace an existing model file and its JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _add_train_classifier(train_commands: argparse._SubParsersAction) -> None:
    from cellkit import classifiers

    names = "|".join(classifiers.REGISTRY)
    parser = _add_command(
        train_commands, "classifier", _train_classifier,
        "train an image classifier (early stopping on the validation split); writes NAME.keras and NAME.json",
        "cellkit train classifier --model lenet --data pbc28 --epochs 10 --out models/lenet.keras",
    )
    parser.add_argument("--model", default=classifiers.DEFAULT_MODEL, metavar="NAME",
                        help=f"architecture: {names} (default: {classifiers.DEFAULT_MODEL}, the best recipe here)")
    parser.add_argument("--data", default="pbc28", metavar="PATH",
                        help="pbc28, pbc_jpg, an .npz (MedMNIST-style or images/labels) or a folder of class "
                             "subfolders; data without splits are split 70/10/20 (default: pbc28)")
    parser.add_argument("--size", type=int, help="input side in pixels (default: the model's, e.g. 28)")
    parser.add_argument("--crop", type=int, metavar="PX",
                        help="centre crop in pixels taken from an original image before resizing, recorded for "
                             "classify (default: 200 for the PBC data, else the largest centred square; 0: the "
                             "latter)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (default: the model's recipe)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: the model's recipe)")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: the model's recipe)")
    parser.add_argument("--patience", type=int, help="epochs without better validation accuracy before stopping")
    parser.add_argument("--augment", choices=("none", "flips", "dihedral", "dihedral_shift"),
                        help="training augmentation (default: the model's recipe)")
    parser.add_argument("--tta", choices=("none", "flips", "dihedral", "auto"),
                        help="test-time augmentation; auto chooses on the validation split")
    parser.add_argument("--balanced", action="store_true", help="weigh classes equally in the loss")
    _add_training_run_options(parser, "seed of splits, weights and augmentation", "models/MODEL.keras")


def _add_evaluate_classifier(evaluate_commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        evaluate_commands, "classifier", _evaluate_classifier,
        "score a trained classifier on labelled images: accuracy, macro-F1, per-class scores, AUC, confusion",
        "cellkit evaluate classifier --model models/cellnet.keras --data my_cells/ --json scores.json",
    )
    parser.add_argument("--model", required=True, metavar="FILE.keras", help="a model from cellkit train classifier")
    parser.add_argument("--data", default="pbc28", metavar="PATH",
                        help="pbc28 (its test split), pbc_jpg, an .npz or a folder of class subfolders")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="which split of a MedMNIST-style npz (default: test)")
    parser.add_argument("--tta", choices=("none", "flips", "dihedral"), help="override the model's test-time "
                                                                             "augmentation")
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON (checked before the work)")
    _add_overwrite(parser, "replace an existing --json file")


def _add_classify(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        commands, "classify", _classify,
        "class and probabilities for each image in a file or folder (any size, RGB/RGBA/grey, 8 or 16 bit)",
        "cellkit classify --model models/cellnet.keras my_cells/ --csv predictions.csv",
    )
    parser.add_argument("path", metavar="IMAGE_OR_FOLDER", help="an image, or a folder searched recursively")
    parser.add_argument("--model", required=True, metavar="FILE.keras", help="a model from cellkit train classifier")
    parser.add_argument("--tta", choices=("none", "flips", "dihedral"), help="override the model's test-time "
                                                                             "augmentation")
    parser.add_argument("--csv", metavar="OUT", help="write file, class, probability and p_<class> columns (checked "
                                                     "before the work)")
    _add_overwrite(parser, "replace an existing --csv file")


# --- cellkit train unet, evaluate segmentation, segment ----------------------------------------------


def _train_unet(args: argparse.Namespace) -> int:
    from cellkit import config

    out = Path(args.out) if args.out else config.models_dir() / "unet.keras"
    _check_model_out(out, args.overwrite, [args.data])  # before the training, so that no work is lost
    from cellkit import datasets, runtime, unet

    overrides = {"n_classes": {2: 1, 3: 3}[args.classes], "epochs": args.epochs, "base_filters": args.base_filters,
                 "learning_rate": args.learning_rate, "batch_size": args.batch_size, "crop": args.crop,
                 "steps_per_epoch": args.steps_per_epoch}
    unet_config = unet.UNetConfig(**{**unet.UNET_PROFILES[args.profile],
                                     **{k: v for k, v in overrides.items() if v is not None}})
    data = datasets.load_segmentation_data(args.data, args.seed)
    print(f"data: {data.source}: {len(data.train)} train, {len(data.val)} validation, {len(data.test)} test images "
          f"({data.split})", flush=True)
    if args.threads:
        runtime.set_threads(args.threads)
    print(f"training a U-Net ({args.classes} classes, profile {args.profile}): {unet_config}", flush=True)
    run = unet.train_unet(data.train, data.val, data.test, config=unet_config, precision=args.precision,
                          seed=args.seed, progress=_progress_mode(args))
    run.data["split"] = data.split
    path = _save_model(run, out)
    s = run.summary()
    print(f"trained in {s['train_minutes']:.1f} min ({s['epochs_run']} epochs, best {s['best_epoch']}, "
          f"{s['precision']}), peak memory {s['peak_rss_mb']:.0f} MiB; inference {s['mpx_per_s']:.2f} Mpx/s")
    print(f"post-processing chosen on validation: {s['postprocess']}")
    test = run.test_scores
    print(f"test: F1 {test['f1']:.4f}, AP {test['ap']:.4f}, PQ {test['pq']:.4f} at IoU 0.5, SEG {test['seg']:.4f} "
          f"on {test['n_images']} images ({test['n_gt']} nuclei)")
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _evaluate_segmentation(args: argparse.Namespace) -> int:
    from cellkit import metrics

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    out = outputs.check_file(args.json, "--json", args.overwrite, [args.pred, args.gt]) if args.json else None
    report = metrics.evaluate_label_folders(args.pred, args.gt, on_warning=warn, skip_missing=args.skip_missing)
    report.update({"pred": str(args.pred), "gt": str(args.gt)})
    missing = f"; {report['n_missing']} without a prediction {report['missing']}" if report["n_missing"] else ""
    print(f"{report['n_images']} images, {report['n_gt']} reference and {report['n_pred']} predicted objects{missing}")
    print(f"IoU 0.5: precision {report['precision']:.4f}, recall {report['recall']:.4f}, F1 {report['f1']:.4f}, "
          f"AP {report['ap']:.4f}, PQ {report['pq']:.4f};  SEG {report['seg']:.4f}")
    print("IoU   " + "  ".join(f"{row['thresh']:.2f}" for row in report["iou_sweep"]))
    print("F1    " + "  ".join(f"{row['f1']:.2f}" for row in report["iou_sweep"]))
    print(f"pixel Dice {report['pixel']['dice']:.4f}, object Dice (report 003) {report['object']['dice']:.4f}")
    if out is not None:
        _write_json(out, report)
    return 0


def _segment_settings(args: argparse.Namespace, out: Path) -> argparse.Namespace:
    """Model, input and options of a ``segment`` run: from the command line, or with ``--resume`` from the manifest
    of ``out`` for whatever the command line leaves out. ``tile`` stays None for the model's own."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it afresh; give one of them")
    if not args.resume:
        if not args.model or not args.input:
            raise ValueError("segment needs --model and --input (or --resume --out DIR to continue a run there)")
        return argparse.Namespace(model=args.model, input=args.input, tile=args.tile, flips=bool(args.flips),
                                  overlay=bool(args.overlay), precision=args.precision or "auto",
                                  output_format=args.output_format or "auto")
    header = outputs.read_header(out)
    if header is None or header.get("kind") != "segment":
        raise ValueError(f"{out}: no cellkit segment run to resume (no {outputs.MANIFEST}); run the whole command, "
                         "e.g. cellkit segment --model M.keras --input DIR --out DIR")
    options = header.get("options") or {}
    recorded_tile = options.get("tile")
    return argparse.Namespace(
        model=args.model or header.get("model"), input=args.input or header.get("input"),
        tile=args.tile if args.tile is not None else (0 if recorded_tile is None else recorded_tile),
        flips=bool(options.get("flips")) if args.flips is None else args.flips,
        overlay=bool(options.get("overlay")) if args.overlay is None else args.overlay,
        precision=args.precision or options.get("precision") or "auto",
        output_format=args.output_format or options.get("output_format") or "auto")


def _segment_command(settings: argparse.Namespace, out: Path) -> str:
    """The command line that makes a run, for its manifest (to read, and to rerun by hand)."""
    words = ["cellkit", "segment", "--model", str(settings.model), "--input", str(settings.input), "--out", str(out)]
    words += ["--overlay"] * settings.overlay + ["--flips"] * settings.flips
    words += ["--precision", settings.precision] + (["--tile", str(settings.tile)] if settings.tile is not None else [])
    words += ["--output-format", settings.output_format] if settings.output_format != "auto" else []
    return shlex.join(words)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let ``kill``, ``timeout`` and batch schedulers (SIGTERM) stop a long run as Ctrl-C does, so that it ends
    marked unfinished with its counts written, rather than dying on the spot."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _done_before(run: outputs.RunFolder, path: Path, root: Path | None) -> bool:
    """Whether input ``path`` was segmented into ``run``'s folder before, unchanged since (it is skipped)."""
    from cellkit import inference

    try:
        return run.finished_entry(inference.relative_input(path, root), path.stat()) is not None
    except OSError:
        return False


def _segment(args: argparse.Namespace) -> int:
    from cellkit import formats, inference, runtime, saving, unet

    out = Path(args.out)
    settings = _segment_settings(args, out)
    source = Path(settings.input)
    files = inference.image_files(source)
    folder = source if source.is_dir() else source.parent
    root = source if source.is_dir() else None
    if out.resolve() == folder.resolve() or (source.is_dir() and folder.resolve() in out.resolve().parents):
        raise ValueError(f"{out}: refusing to write into the input folder {folder}; choose another --out")
    outputs.check_not_inside(out, [settings.input, settings.model])
    for path in files:  # an OME-Zarr's metadata and axes, before any work (reads no pixels)
        if formats.is_zarr(path):
            formats.read_ome_zarr(path)
    label_formats = inference.label_formats(files, settings.output_format)
    outputs.check_unique(inference.output_names(files, root, settings.overlay, label_formats), out)
    model = saving.check_model_file(settings.model, "cellkit train unet")
    tile = unet.read_unet_config(model).tile if settings.tile is None else (settings.tile or None)
    precision = runtime.resolve_precision(settings.precision)
    resume = shlex.join(["cellkit", "segment", "--resume", "--out", str(out)])
    header = inference.segment_header(outputs.sha256_file(model), source, tile, settings.flips, precision,
                                      settings.overlay, settings.output_format,
                                      command=_segment_command(settings, out),
                                      model=str(model.resolve()), resume=resume)
    outputs.RunFolder.check(out, header, args.overwrite)  # before the model loads: a refusal costs nothing
    on_cluster = args.workers is not None or args.scheduler is not None
    if on_cluster:  # the workers load the model; damaged weights are refused here, before a cluster starts
        saving.check_weights(model, saving.read_metadata(model))
    trained = None if on_cluster else unet.load_unet(model, precision=precision)  # on a cluster: once per worker
    failed: list[Path] = []
    with _sigterm_as_interrupt(), _dask_client(args) as client:  # connected before anything is written
        run = outputs.RunFolder.open(out, header, args.overwrite)
        done_before = sum(_done_before(run, path, root) for path in files)
        if done_before:
            print(f"continuing the run in {out}: {done_before} of {len(files)} images were done before", flush=True)
        try:
            if client is not None:
                from cellkit import cluster

                rows = cluster.segment_files(client, model, files, out, run, root=root, overlay=settings.overlay,
                                             tile=tile, progress=not args.quiet, on_error=_skip_warner(failed),
                                             output_format=settings.output_format)
            else:
                trained.flips = settings.flips
                rows = inference.segment_files(trained, files, out, root=root, overlay=settings.overlay, tile=tile,
                                               progress=not args.quiet, on_error=_skip_warner(failed), run=run,
                                               output_format=settings.output_format)
        except KeyboardInterrupt:
            done = sum(_done_before(run, path, root) for path in files)
            print(f"interrupted: {done} of {len(files)} images done, listed in {out / outputs.COUNTS}; the run is "
                  f"marked unfinished in {out / outputs.MANIFEST}; resume with `{resume}` (or the same command)",
                  file=sys.stderr)
            return 130
        except (ValueError, OSError) as error:  # DataError and OutputError included: one line from main
            done = sum(_done_before(run, path, root) for path in files)
            where = f"{settings.model}: " if isinstance(error, runtime.NonFiniteOutputs) else ""  # the model's fault
            raise ValueError(f"{where}{_one_line(error)} ({done} of {len(files)} images done are kept; after the fix, "
                             f"resume with `{resume}`)") from None
    total = sum(row["n_nuclei"] for row in rows)
    print(f"segmented {len(rows) - done_before} of {len(files)} images ({done_before} done before, skipped): "
          f"{total} nuclei in all; label images ({_formats_written(label_formats)}) and counts.csv in {out}")
    if failed:
        print(f"error: {len(failed)} of {len(files)} files could not be segmented; fix or remove them and rerun "
              "the same command to do just those", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _dask_client(args: argparse.Namespace) -> Iterator[Any]:
    """A Dask client for ``segment --workers N`` (a local cluster, closed after) or ``--scheduler ADDRESS`` (a
    running one), or None without either option (:func:`cellkit.cluster.connect`)."""
    if args.workers is None and args.scheduler is None:
        yield None
        return
    from cellkit import cluster

    with cluster.connect(workers=args.workers, scheduler=args.scheduler) as client:
        print(f"segmenting on {cluster.describe(client)}", flush=True)
        yield client


def _formats_written(label_formats: dict[Path, str]) -> str:
    """The label formats of a run in words, e.g. ``16-bit PNG, OME-Zarr``."""
    words = {"png": "16-bit PNG", "ome-zarr": "OME-Zarr", "ome-tiff": "OME-TIFF"}
    return ", ".join(words[fmt] for fmt in words if fmt in set(label_formats.values())) or "16-bit PNG"


def _add_train_unet(train_commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        train_commands, "unet", _train_unet,
        "train a U-Net for nucleus segmentation on images with instance masks; writes NAME.keras and NAME.json",
        "cellkit train unet --data dsb2018 --classes 3 --out models/unet.keras",
    )
    parser.add_argument("--data", default="dsb2018", metavar="DIR",
                        help="dsb2018 (its split on file) or a folder with images/ and labels/ (or masks/) of "
                             "matching file stems, split 70/10/20 (default: dsb2018)")
    parser.add_argument("--classes", type=int, choices=(2, 3), default=3,
                        help="2: nucleus/background, sigmoid + focal loss (report 003); 3: background/cell/edge, "
                             "weighted cross-entropy (report 002; default)")
    parser.add_argument("--profile", choices=("default", "full"), default="default",
                        help="default: 16 filters, 40 epochs of 100 steps of 8 crops drawn in proportion to each "
                             "image's nuclei, flipped and turned, images zoomed to 24-px nuclei (on 2 CPU cores about "
                             "23 min with bfloat16, about an hour in float32); full: 32 filters, 60 epochs (hours; "
                             "no better than default on DSB)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the profile's)")
    parser.add_argument("--steps-per-epoch", type=int, help="training steps per epoch (default: 100)")
    parser.add_argument("--base-filters", type=int, help="filters of the first level (default: the profile's)")
    parser.add_argument("--learning-rate", type=float, help="peak Adam learning rate (default: 2e-3, cosine)")
    parser.add_argument("--batch-size", type=int, help="crops per step (default: 8)")
    parser.add_argument("--crop", type=int, help="training crop side in pixels, a multiple of 16 (default: 128)")
    _add_training_run_options(parser, "seed of the split, crops and weights", "models/unet.keras")


def _add_evaluate_segmentation(evaluate_commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        evaluate_commands, "segmentation", _evaluate_segmentation,
        "score predicted instance masks against reference ones, matched by file stem: F1, AP, PQ, SEG, IoU sweep",
        "cellkit evaluate segmentation --pred masks/ --gt data/dsb2018_fluo/labels --json scores.json",
    )
    parser.add_argument("--pred", required=True, metavar="DIR", help="predicted label images (e.g. cellkit segment)")
    parser.add_argument("--gt", required=True, metavar="DIR",
                        help="reference label images, or a dataset folder with labels/ (or masks/)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out reference images without a prediction (default: they count as empty "
                             "predictions, every nucleus missed, and the report says how many)")
    parser.add_argument("--json", metavar="OUT", help="write every score as JSON (checked before the work)")
    _add_overwrite(parser, "replace an existing --json file")


def _add_segment(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        commands, "segment", _segment,
        "segment nuclei in an image or a folder (PNG, TIFF 8/16-bit, OME-TIFF, OME-Zarr, JPEG; grey or RGB; any "
        "size): a label image per image (16-bit PNG, or OME-Zarr/OME-TIFF: --output-format) and counts.csv",
        "cellkit segment --model models/unet.keras --input my_images/ --out masks/ --overlay\n"
        "  cellkit segment --resume --out masks/      # after an interruption: the images not done yet\n"
        "  cellkit segment --model models/unet.keras --input my_images/ --out masks/ --workers 2\n"
        "  cellkit segment --model models/unet.keras --input /shared/images/ --out /shared/masks/ "
        "--scheduler tcp://10.0.0.5:8786",
    )
    parser.add_argument("--model", metavar="FILE.keras", help="a model from cellkit train unet (required, unless "
                                                                  "--resume)")
    parser.add_argument("--input", metavar="FILE_OR_DIR",
                        help="an image, or a folder searched recursively (subfolders are kept in --out; required, "
                             "unless --resume)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help=f"output folder: new, empty, or one cellkit segment wrote (its {outputs.MANIFEST} lists "
                             "what is done; the same command there again skips those); never inside the input")
    parser.add_argument("--overlay", action="store_true", default=None,
                        help="also write STEM_overlay.png with outlines")
    parser.add_argument("--flips", action="store_true", default=None,
                        help="average the predictions of the image and its three flips (4x slower, slightly better)")
    parser.add_argument("--tile", type=int, metavar="PX",
                        help="tile side for large images, a multiple of 16 (default: the model's, 512; 0: whole "
                             "images, refused beyond 4 Mpx)")
    parser.add_argument("--precision", choices=("auto", "bfloat16", "float32"),
                        help="auto (the default, and the app's): mixed bfloat16 where the CPU supports it (about "
                             "twice as fast)")
    parser.add_argument("--output-format", choices=("auto", "png", "ome-zarr", "ome-tiff"),
                        help="labels as a 16-bit PNG, an OME-Zarr or an OME-TIFF (uint32, with the input's pixel "
                             "size); auto (the default): PNG up to 4096 x 4096 px, OME-Zarr above. OME-Zarr and "
                             "OME-TIFF labels of larger images are made block by block, in bounded memory")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --out with its model, input and options (those given "
                             "here must match them)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder cellkit did not write, or of another model, input or options, "
                             "starting afresh: files of the names this run writes are replaced, nothing is deleted")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="segment on a Dask cluster of N worker processes started on this machine, each loading "
                            "the model once (the same labels and counts as without it)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="segment on a running Dask cluster, e.g. tcp://10.0.0.5:8786 (started with `dask "
                            "scheduler` and `dask worker ADDRESS`); its workers must see --model, --input and --out "
                            "under the same paths (a shared file system)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# --- cellkit export ------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from cellkit import export

    result = export.export_bioimageio(args.model, args.out, sample=args.sample, overwrite=args.overwrite,
                                      authors=args.author or (), cite_url=args.cite_url,
                                      log=lambda line: print(line, flush=True))
    print(f"wrote {result.path}: a bioimage.io model (spec 0.5), weights {' and '.join(result.weight_formats)}; "
          f"format validation: {result.validation}, bioimageio.core's test: {result.test}")
    for limit in result.not_in_package:
        print(f"  outside the package (see its documentation): {limit}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        commands, "export", _export,
        "package a trained model as a bioimage.io model (spec 0.5: Keras and TensorFlow weights, test input and "
        "output, cover, documentation, licence, citations), checked with bioimageio.spec and bioimageio.core before "
        "it is written",
        "cellkit export --format bioimageio --model models/unet.keras --out unet.bioimageio.zip",
    )
    parser.add_argument("--format", choices=("bioimageio",), default="bioimageio",
                        help="package format (default: bioimageio)")
    parser.add_argument("--model", required=True, metavar="FILE.keras",
                        help="a model from cellkit train unet or cellkit train classifier")
    parser.add_argument("--out", required=True, metavar="FILE.zip", help="the package to write (checked before the "
                                                                         "work)")
    parser.add_argument("--sample", metavar="IMAGE",
                        help="the image the test input is made from (default: the first test image of dsb2018 for a "
                             "U-Net, of pbc28 for a classifier)")
    parser.add_argument("--author", action="append", metavar="NAME",
                        help="an author named in the package (repeat for several; default: the cellkit authors)")
    parser.add_argument("--cite-url", metavar="URL",
                        help="where cellkit or this model is published, cited in the package (a bioimage.io "
                             "citation needs a DOI or a URL; without it cellkit is named but not cited)")
    _add_overwrite(parser, "replace an existing --out package")


# --- cellkit app ---------------------------------------------------------------------------------------


def _app(args: argparse.Namespace) -> int:
    models_dir = Path(args.models) if args.models else None
    if models_dir is not None and not models_dir.is_dir():
        raise ValueError(f"{models_dir}: no such folder of models")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    from cellkit import app

    app.serve(models_dir, host=args.host, port=args.port, allowed_hosts=args.allowed_host)
    return 0


def _add_app(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        commands, "app", _app,
        "the interactive app in a browser: model performance, comparison, classify and segment uploaded images",
        "cellkit app --port 8000 --models models/   # then open http://127.0.0.1:8000",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--models", metavar="DIR", help="folder of .keras models (default: the project's models/)")
    parser.add_argument("--allowed-host", action="append", metavar="NAME",
                        help="a host name visitors may use to reach the app (repeat for several); requests naming "
                             "another are refused (default: the loopback names on 127.0.0.1, the --host address "
                             "otherwise, any name with --host 0.0.0.0)")


def _site(args: argparse.Namespace) -> int:
    from cellkit import site

    index = site.build_site(args.profile, Path(args.out))
    print(f"wrote the {args.profile} profile's site: open {index}")
    return 0


def _add_site(commands: argparse._SubParsersAction) -> None:
    parser = _add_command(
        commands, "site", _site,
        "the course website: the executed notebooks, results, data and licences, command line and app, as static HTML",
        "make run && cellkit site --out site/   # then open site/index.html",
    )
    parser.add_argument("--profile", choices=("smoke", "default", "full"), default="default",
                        help="whose executed notebooks (notebooks/executed/PROFILE/) to show (default: default)")
    parser.add_argument("--out", default="site", metavar="DIR",
                        help="folder to write; a site built earlier there is replaced, anything else is refused "
                             "(default: site/)")


# --- the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from cellkit import __version__
    from cellkit.config import PROFILES  # not from notebooks: --help should not wait for matplotlib

    parser = argparse.ArgumentParser(
        prog="cellkit",
        description="Deep learning for cell microscopy images: data, notebooks, models on your own images.",
        epilog=(
            "examples:\n  cellkit data list\n  cellkit data fetch pbc\n"
            "  cellkit run-notebooks --profile smoke --only 01"
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"cellkit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    data = commands.add_parser(
        "data", help="list, check and fetch the datasets", description="List, check and fetch the datasets.",
        epilog="examples:\n  cellkit data list\n  cellkit data fetch pbc dsb2018", formatter_class=_Formatter,
    )
    data_commands = data.add_subparsers(title="data commands", metavar="ACTION", required=True)
    _add_command(data_commands, "list", _data_list, "show each dataset, where it was found, its licence and citation",
                 "cellkit data list")
    check = _add_command(data_commands, "check", _data_check, "exit non-zero unless every dataset is found",
                         "CELLKIT_DATA_DIR=/path/to/data cellkit data check\n  cellkit data check --fetch")
    check.add_argument("--fetch", action="store_true",
                       help="download and build the missing datasets first (what make test and make run do)")
    check.add_argument("--quiet", action="store_true", help="no progress bar while fetching")
    fetch = _add_command(data_commands, "fetch", _data_fetch,
                         "download the public originals and build the project's layout (checksums, resumable)",
                         "cellkit data fetch pbc dsb2018")
    fetch.add_argument("names", nargs="+", choices=["pbc", "dsb2018"], help="what to fetch")
    fetch.add_argument("--dest", help="folder to build into (default: the project's data/ folder)")
    fetch.add_argument("--mirror", help="base URL of a mirror that serves the same file names")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")

    run = _add_command(commands, "run-notebooks", _run_notebooks,
                       "execute the numbered notebooks with papermill; writes figures/ and metrics.json",
                       "cellkit run-notebooks --profile smoke --only 01 02")
    run.add_argument("--profile", choices=PROFILES, default="default", help="parameter profile (default: default)")
    run.add_argument("--only", nargs="+", metavar="NN", help="notebook numbers or stems to run (default: all)")
    run.add_argument("--cell-timeout", type=int, default=None, help="seconds one cell may take (default: no limit)")
    run.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    train = commands.add_parser(
        "train", help="train a model on your images", description="Train a model on your images.",
        epilog="example:\n  cellkit train classifier --model cellnet --data pbc28", formatter_class=_Formatter,
    )
    train_commands = train.add_subparsers(title="what to train", metavar="KIND", required=True)
    _add_train_classifier(train_commands)
    _add_train_unet(train_commands)
    evaluate = commands.add_parser(
        "evaluate", help="score a trained model on labelled images", description="Score a trained model.",
        epilog="example:\n  cellkit evaluate classifier --model models/cellnet.keras --data pbc28 --json out.json",
        formatter_class=_Formatter,
    )
    evaluate_commands = evaluate.add_subparsers(title="what to evaluate", metavar="KIND", required=True)
    _add_evaluate_classifier(evaluate_commands)
    _add_evaluate_segmentation(evaluate_commands)
    _add_classify(commands)
    _add_segment(commands)
    _add_app(commands)
    _add_export(commands)
    _add_site(commands)

    report = _add_command(commands, "report", _report,
                          "the README results table from the committed records in results/default/, and their check",
                          "cellkit report --check   # exit 1 when a record is stale, dirty or missing")
    what = report.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help="replace the table in README.md (default: print it)")
    what.add_argument("--check", action="store_true",
                      help="fail when a notebook has no record, a record comes from a dirty tree or simulated data, "
                           "its notebook or the cellkit code it ran changed since, or README.md's table is not the "
                           "records'")
    report.add_argument("--profile", choices=("default", "full"), default="default",
                        help="whose records --check reads (the table always shows the default run's)")
    return parser


def _one_line(error: BaseException) -> str:
    """An error as one line: ``path: reason`` for an OSError from the system, else its first line."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename or ""
        return f"{where}: {error.strerror}" if where else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cellkit`` console script; returns the exit status."""
    from cellkit.datasets import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except (DataError, ValueError, OSError) as error:  # OSError: a file or folder that cannot be read or written
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
