"""Every failure the command line can meet, in one table: the command, how the case is set up, and what must come
out. A fatal case ends with exit 2 and exactly one line on stderr, ``error: ...``, naming the file and the fix,
before anything is written; a skip case (one bad image in a folder) warns once per bad file, writes the others'
results and ends with exit 1. In every case no input file changes (the input tree is hashed before and after) and
no traceback appears.

Tiny real models (a LeNet and a 4-filter U-Net, trained in seconds on real PBC-28 and DSB images) and a few real
DSB and PBC files are copied into each case's folder; damaged, truncated, garbage and NaN-weight models are made
from them. Rows that need the loader and model checks of issue 22 (weights checksum, pixel limit, multi-page TIFF,
channels, non-finite outputs) are expected failures while those checks are absent from the tree.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import socket
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellkit import cli, datasets, outputs
from cellkit.datasets import loaders

# what the rows of the other half of issue 22 need; while absent, those rows are expected to fail


def _big_png(path: Path, side: int = 15_000) -> None:
    """A valid 8-bit grey PNG of side x side black pixels (225 megapixels), written in ~0.2 MB without ever
    holding the image in memory: IHDR, one zlib stream of filtered rows, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the pixels
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _damaged_copy(source: Path, target: Path) -> None:
    """A valid zip whose weights member has one byte flipped (what a bad copy or disk does)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for item in archive.infolist():
            data = archive.read(item)
            if item.filename == "model.weights.h5":
                data = bytearray(data)
                data[len(data) * 3 // 4] ^= 0xFF
                data = bytes(data)
            out.writestr(item, data)


def _nan_copies(folder: Path) -> None:
    """unet_nan.keras and lenet_nan.keras: the tiny models with NaN weights, saved properly (checksums valid)."""
    from cellkit import classifiers, unet

    segmenter = unet.load_unet(folder / "unet.keras")
    segmenter.model.set_weights([np.full_like(w, np.nan) for w in segmenter.model.get_weights()])
    unet.save_unet(segmenter.model, segmenter.config, folder / "unet_nan.keras")
    classifier = classifiers.load(folder / "lenet.keras")
    classifier.model.set_weights([np.full_like(w, np.nan) for w in classifier.model.get_weights()])
    classifiers.save(classifier.model, classifier.info, folder / "lenet_nan.keras")


@pytest.fixture(scope="module")
def template(real_data, tmp_path_factory) -> Path:
    """What each case copies: dsb/ (3 real DSB images) with ref/ (their labels), pbc/ (3 real PBC JPEGs),
    pbc_classes/ (2 classes x 2 JPEGs), models/ (a tiny LeNet and U-Net and damaged variants), big.png."""
    from cellkit import training, unet

    root = tmp_path_factory.mktemp("failures")
    manifest = datasets.load_dsb2018_manifest()
    ids = manifest.loc[manifest["size_group"] == "256x256", "image_id"].iloc[:8].tolist()
    dsb = datasets.require("dsb2018")
    for sub, target in (("images", "dsb"), ("labels", "ref")):
        (root / target).mkdir()
        for n, image_id in enumerate(ids[:3]):
            shutil.copy(dsb / sub / f"{image_id}.png", root / target / f"n{n}.png")
    pbc = datasets.require("pbc_jpg")
    table = pd.read_csv(pbc / "labels.csv").groupby("class_name").head(2)
    (root / "pbc").mkdir()
    for rel in table["path"].iloc[:3]:
        shutil.copy(pbc / rel, root / "pbc" / Path(rel).name)
    for rel in table["path"].iloc[:4]:
        (root / "pbc_classes" / Path(rel).parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(pbc / rel, root / "pbc_classes" / rel)
    models = root / "models"
    run = training.train_classifier("lenet", datasets.per_class(datasets.load_pbc28("train"), 20),
                                    datasets.per_class(datasets.load_pbc28("val"), 5), crop=loaders.PBC_CROP,
                                    epochs=1, progress="none", measure_throughput=False)
    run.save(models / "lenet.keras")
    segmenter = unet.train_unet(datasets.load_dsb2018(ids[:6]), datasets.load_dsb2018(ids[6:]),
                                config=unet.UNetConfig(epochs=2, steps_per_epoch=3, base_filters=4, crop=64,
                                                       batch_size=4, val_crops=4, val_crop_size=64),
                                progress="none", tune=False, measure_throughput=False)
    segmenter.save(models / "unet.keras")
    for name in ("unet", "lenet"):
        _damaged_copy(models / f"{name}.keras", models / f"{name}_damaged.keras")
    data = (models / "unet.keras").read_bytes()
    (models / "unet_truncated.keras").write_bytes(data[: len(data) // 2])
    (models / "garbage.keras").write_bytes(np.random.default_rng(0).bytes(4096))
    _nan_copies(models)
    _big_png(root / "big.png")
    return root


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with the sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- setups: (inputs folder, work folder) -> None ------------------------------------------------------------


def add_copy(source: str, target: str) -> Callable[[Path, Path], None]:
    return lambda i, w: shutil.copy(i / source, i / target)


def add_same_stem_tif(i: Path, w: Path) -> None:
    tifffile.imwrite(i / "dsb" / "n0.tif", np.asarray(Image.open(i / "dsb" / "n0.png").convert("L")))


def add_multipage_tif(folder: str) -> Callable[[Path, Path], None]:
    def setup(i: Path, w: Path) -> None:
        grey = np.asarray(Image.open(i / "dsb" / "n0.png").convert("L"))
        for _ in range(3):
            tifffile.imwrite(i / folder / "stack.tif", grey, append=True)
    return setup


def add_five_channels(i: Path, w: Path) -> None:
    grey = np.asarray(Image.open(i / "dsb" / "n0.png").convert("L"))
    tifffile.imwrite(i / "dsb" / "five.tif", np.dstack([grey] * 5), photometric="minisblack", planarconfig="contig")


def add_zarr_without_yx(i: Path, w: Path) -> None:
    """An OME-Zarr whose axes are t, c, z: no y and x to segment."""
    import zarr

    group = zarr.open_group(str(i / "bad.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, 40, 50), dtype="uint8")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "t"}, {"name": "c"}, {"name": "z"}],
                                   "datasets": [{"path": "0"}]}]


def add_broken(target: str) -> Callable[[Path, Path], None]:
    return lambda i, w: (i / target).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


def add_broken_to_a_class(i: Path, w: Path) -> None:
    add_broken(str(next((i / "pbc_classes").iterdir()).relative_to(i) / "broken.jpg"))(i, w)


def add_big(folder: str) -> Callable[[Path, Path], None]:
    return lambda i, w: shutil.copy(i / "big.png", i / folder / "big.png")


def file_at(name: str) -> Callable[[Path, Path], None]:
    return lambda i, w: (w / name).write_text("the user's own file\n")


def text_at(name: str) -> Callable[[Path, Path], None]:
    return lambda i, w: (i / name).write_text("notes, not a model\n")


def folder_at(name: str) -> Callable[[Path, Path], None]:
    return lambda i, w: (w / name).mkdir()


def earlier_segment(*extra: str) -> Callable[[Path, Path], None]:
    def setup(i: Path, w: Path) -> None:
        assert cli.main(fill(SEGMENT + list(extra), i, w)) == 0
    return setup


# --- checks of a skip case's outputs ---------------------------------------------------------------------------


def counts_list(*names: str) -> Callable[[Path], None]:
    def check(w: Path) -> None:
        assert sorted(r["file"] for r in csv.DictReader(open(w / "masks" / outputs.COUNTS))) == sorted(names)
        header = json.loads((w / "masks" / outputs.MANIFEST).read_text())
        assert header["finished"] and header["n_done"] == len(names)
        for name in names:
            assert (w / "masks" / f"{Path(name).stem}.png").is_file()
    return check


def run_failed(w: Path) -> None:
    """A run that began and stopped on the model: its manifest says so, and it lists no image."""
    header = json.loads((w / "masks" / outputs.MANIFEST).read_text())
    assert not header["finished"] and header["status"].startswith("failed") and header["n_done"] == 0
    assert list(csv.DictReader(open(w / "masks" / outputs.COUNTS))) == []


def csv_rows(n: int) -> Callable[[Path], None]:
    def check(w: Path) -> None:
        assert len(pd.read_csv(w / "p.csv")) == n
    return check


def report_counts_unreadable(w: Path) -> None:
    report = json.loads((w / "s.json").read_text())
    assert report["n_unreadable"] == 1 and report["n"] == 4


# --- the table ------------------------------------------------------------------------------------------------

SEGMENT = ["segment", "--model", "{i}/models/unet.keras", "--input", "{i}/dsb", "--out", "{w}/masks", "--quiet"]
CLASSIFY = ["classify", "--model", "{i}/models/lenet.keras", "{i}/pbc", "--csv", "{w}/p.csv"]
EXPORT = ["export", "--format", "bioimageio", "--model", "{i}/models/unet.keras", "--out", "{w}/u.zip"]
DSB = ("n0.png", "n1.png", "n2.png")


def _free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill(argv: list[str], i: Path, w: Path) -> list[str]:
    return [arg.format(i=i, w=w) for arg in argv]


def model(argv: list[str], name: str) -> list[str]:
    return [arg.replace("models/unet.keras", f"models/{name}").replace("models/lenet.keras", f"models/{name}")
            for arg in argv]


def option(argv: list[str], flag: str, value: str) -> list[str]:
    index = argv.index(flag)
    return [*argv[: index + 1], value, *argv[index + 2 :]]


@dataclass
class Case:
    """One row: ``argv`` ({i}: the inputs folder, {w}: an empty work folder), an optional ``setup(i, w)``, and
    what must come out: ``fatal`` (exit 2, one error line holding ``words``; nothing written, or, for a run that
    began, ``check(w)`` of its record) or a skip (exit 1, one warning per file of ``warned``, then ``check(w)`` of
    what was written)."""

    argv: list[str]
    words: tuple[str, ...] = ()
    setup: Callable[[Path, Path], None] | None = None
    fatal: bool = True
    warned: tuple[str, ...] = ()
    check: Callable[[Path], None] | None = None


CASES = {
    # segment: where the results go
    "segment into a folder of reference masks": Case(option(SEGMENT, "--out", "{i}/ref"),
                                                     ("ref", "not written by cellkit", "--overwrite")),
    "segment --out names a file": Case(SEGMENT, ("masks", "is a file"), file_at("masks")),
    "segment --out under a file": Case(option(SEGMENT, "--out", "{w}/blocker/masks"),
                                       ("blocker", "is a file, not a folder"), file_at("blocker")),
    "segment a.png and a.tif": Case(SEGMENT, ("n0.png", "n0.tif", "would both write"), add_same_stem_tif),
    "segment x.png and x_overlay.png --overlay": Case(SEGMENT + ["--overlay"], ("n0_overlay.png", "would both write"),
                                                      add_copy("dsb/n1.png", "dsb/n0_overlay.png")),
    "segment into a run with other options": Case(SEGMENT, ("another run", "flips True there, False now"),
                                                  earlier_segment("--flips")),
    "segment into a run of another model": Case(model(SEGMENT, "unet_nan.keras"), ("another run", "another model"),
                                                earlier_segment()),
    "segment --resume without a run": Case(["segment", "--resume", "--out", "{w}/empty"],
                                           ("no cellkit segment run to resume",), folder_at("empty")),
    "segment --resume --overwrite": Case(SEGMENT + ["--resume", "--overwrite"], ("give one of them",)),
    "segment without --model": Case(["segment", "--input", "{i}/dsb", "--out", "{w}/masks"], ("--model",)),
    "segment inside its input": Case(option(SEGMENT, "--out", "{i}/dsb/masks"), ("refusing",)),
    "segment on an unreachable Dask scheduler": Case(SEGMENT + ["--scheduler", f"tcp://127.0.0.1:{_free_port()}"],
                                                     ("cannot reach the Dask scheduler at tcp://127.0.0.1:",)),
    # segment: the model
    "segment with a damaged model": Case(model(SEGMENT, "unet_damaged.keras"), ("unet_damaged.keras", "damaged")),
    "segment on a cluster with a damaged model": Case(model(SEGMENT, "unet_damaged.keras") + ["--workers", "1"],
                                                      ("unet_damaged.keras", "damaged")),
    "segment with a truncated model": Case(model(SEGMENT, "unet_truncated.keras"),
                                           ("unet_truncated.keras", "not a .keras model file")),
    "segment with garbage for a model": Case(model(SEGMENT, "garbage.keras"), ("garbage.keras", "not a .keras")),
    "segment with a classifier": Case(model(SEGMENT, "lenet.keras"), ("not a U-Net", "cellkit classify")),
    "segment with a missing model": Case(model(SEGMENT, "none.keras"), ("none.keras", "cellkit train unet")),
    "segment an OME-Zarr without y and x axes": Case(option(SEGMENT, "--input", "{i}/bad.ome.zarr"),
                                                     ("bad.ome.zarr", "y and x axes"), add_zarr_without_yx),
    # segment: one bad image among good ones
    "segment a folder with a 225-megapixel image": Case(SEGMENT, setup=add_big("dsb"), fatal=False,
                                                        warned=("big.png",), check=counts_list(*DSB)),
    "segment a folder with a multi-page TIFF": Case(SEGMENT, setup=add_multipage_tif("dsb"), fatal=False,
                                                    warned=("stack.tif",), check=counts_list(*DSB)),
    "segment a folder with a 5-channel image": Case(SEGMENT, setup=add_five_channels, fatal=False,
                                                    warned=("five.tif",), check=counts_list(*DSB)),
    "segment a folder with an unreadable image": Case(SEGMENT, setup=add_broken("dsb/broken.png"), fatal=False,
                                                      warned=("broken.png",), check=counts_list(*DSB)),
    "segment with a model of NaN weights": Case(model(SEGMENT, "unet_nan.keras"), ("unet_nan.keras", "NaN"),
                                                check=run_failed),
    # classify
    "classify --csv names a folder": Case(option(CLASSIFY, "--csv", "{w}"), ("names a folder",)),
    "classify --csv exists": Case(CLASSIFY, ("p.csv", "already exists", "--overwrite"), file_at("p.csv")),
    "classify --csv under a file": Case(option(CLASSIFY, "--csv", "{w}/blocker/p.csv"), ("is a file, not a folder",),
                                        file_at("blocker")),
    "classify --csv inside its input": Case(option(CLASSIFY, "--csv", "{i}/pbc/p.csv"), ("refusing",)),
    "classify with a damaged model": Case(model(CLASSIFY, "lenet_damaged.keras"), ("lenet_damaged.keras", "damaged")),
    "classify with a model of NaN weights": Case(model(CLASSIFY, "lenet_nan.keras"), ("lenet_nan.keras", "NaN")),
    "classify a folder with a 225-megapixel image": Case(CLASSIFY, setup=add_big("pbc"), fatal=False,
                                                         warned=("big.png",), check=csv_rows(3)),
    "classify a folder with a multi-page TIFF": Case(CLASSIFY, setup=add_multipage_tif("pbc"), fatal=False,
                                                     warned=("stack.tif",), check=csv_rows(3)),
    # evaluate
    "evaluate classifier --json under a file": Case(
        ["evaluate", "classifier", "--model", "{i}/models/lenet.keras", "--data", "{i}/pbc_classes", "--json",
         "{w}/blocker/s.json"], ("is a file, not a folder",), file_at("blocker")),
    "evaluate classifier on a folder with an unreadable image": Case(
        ["evaluate", "classifier", "--model", "{i}/models/lenet.keras", "--data", "{i}/pbc_classes", "--json",
         "{w}/s.json"], setup=add_broken_to_a_class,
        fatal=False, warned=("broken.jpg",), check=report_counts_unreadable),
    "evaluate segmentation --json names a folder": Case(
        ["evaluate", "segmentation", "--pred", "{i}/ref", "--gt", "{i}/ref", "--json", "{w}"], ("names a folder",)),
    # train: the model file is checked before the training
    "train classifier --out exists": Case(["train", "classifier", "--model", "lenet", "--data", "{i}/pbc_classes",
                                           "--out", "{w}/m.keras", "--quiet"], ("m.keras", "already exists"),
                                          file_at("m.keras")),
    "train classifier, the JSON beside --out exists": Case(
        ["train", "classifier", "--model", "lenet", "--data", "{i}/pbc_classes", "--out", "{w}/m.keras", "--quiet"],
        ("m.json", "record", "already exists"), file_at("m.json")),
    "train unet --out under a file": Case(["train", "unet", "--data", "{i}", "--out", "{w}/blocker/u.keras",
                                           "--quiet"], ("is a file, not a folder",), file_at("blocker")),
    "train unet --out names a folder": Case(["train", "unet", "--data", "{i}", "--out", "{w}/u.keras", "--quiet"],
                                            ("names a folder",), folder_at("u.keras")),
    # export
    "export garbage for a model": Case(model(EXPORT, "garbage.keras"), ("garbage.keras", "not a .keras model file")),
    "export a text file": Case(option(EXPORT, "--model", "{i}/notes.txt"), ("notes.txt", "ending in .keras"),
                               text_at("notes.txt")),
    "export a text file named .keras": Case(option(EXPORT, "--model", "{i}/notes.keras"),
                                            ("notes.keras", "not a .keras model file"), text_at("notes.keras")),
    "export a missing model": Case(model(EXPORT, "none.keras"), ("none.keras", "no such model file")),
    "export a truncated model": Case(model(EXPORT, "unet_truncated.keras"),
                                     ("unet_truncated.keras", "not a .keras model file")),
    "export --out exists": Case(EXPORT, ("u.zip", "already exists", "--overwrite"), file_at("u.zip")),
    "export --out not a zip": Case(option(EXPORT, "--out", "{w}/u.tar"), ("u.tar", ".zip")),
}


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_failure_table(case, template, tmp_path, capsys):
    inputs, work = tmp_path / "in", tmp_path / "work"
    shutil.copytree(template, inputs)
    work.mkdir()
    if case.setup is not None:
        case.setup(inputs, work)
    capsys.readouterr()
    before, work_before = tree_hash(inputs), tree_hash(work)

    status = cli.main(fill(case.argv, inputs, work))

    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert tree_hash(inputs) == before, "an input file changed"
    lines = err.strip().splitlines()
    if case.fatal:
        assert status == cli.EXIT_BAD_INPUT, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        for word in case.words:
            assert word in lines[0], err
        if case.check is None:
            assert tree_hash(work) == work_before, "a refused command wrote something"
        else:
            case.check(work)
    else:
        assert status == 1, err
        assert lines[-1].startswith("error: ") and all(line.startswith("warning: skipped ") for line in lines[:-1])
        assert len(lines) == len(case.warned) + 1, err
        for name in case.warned:
            assert any(name in line for line in lines[:-1]), err
        case.check(work)
