"""cellkit.datasets.fetch end to end: tiny archives with the real layouts, served on 127.0.0.1.

Nothing here touches the internet: every download goes to a local ThreadingHTTPServer through ``mirror``.
"""

from __future__ import annotations

import functools
import io
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pooch
import pytest
from PIL import Image

from cellkit.datasets import fetch as fetch_module
from cellkit.datasets.fetch import PBC_CLASSES, archive_url, fetch, merge_masks
from cellkit.datasets.registry import DataError

PBC_ZIP = "PBC_dataset_normal_DIB.zip"
STAGE1_ZIP = "stage1_train.zip"
FIXES_ZIP = "kaggle-dsbowl-2018-dataset-fixes-master.zip"
PER_CLASS = 10  # 8 x 10 images: a 7/1/2 split per class
JPEG_SIZE = (220, 224)  # width, height in pixels; the centre 200x200 is one colour, the border another
DUPLICATE = "basophil/BA_9.jpg"  # a byte copy of basophil/BA_0.jpg


# ------------------------------------------------------------------------------------ fake archives
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _centre_colour(label: int, i: int) -> tuple[int, int, int]:
    return (20 * label + 30, 10 * i + 40, 200 - 10 * label)


def _pbc_jpeg(label: int, i: int) -> bytes:
    width, height = JPEG_SIZE
    image = np.full((height, width, 3), 250, dtype=np.uint8)  # border: outside the centre crop
    top, left = (height - 200) // 2, (width - 200) // 2
    image[top : top + 200, left : left + 200] = _centre_colour(label, i)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_pbc_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for label, class_name in enumerate(PBC_CLASSES):
            prefix = class_name[:2].upper()
            for i in range(PER_CLASS):
                data = _pbc_jpeg(label, 0 if f"{class_name}/{prefix}_{i}.jpg" == DUPLICATE else i)
                zf.writestr(f"PBC_dataset_normal_DIB/{class_name}/{prefix}_{i}.jpg", data)
        zf.writestr("__MACOSX/PBC_dataset_normal_DIB/basophil/._BA_0.jpg", b"resource fork")


def _grey_rgba(height: int, width: int, background: int, spots: list[tuple[slice, slice]]) -> np.ndarray:
    grey = np.full((height, width), background, dtype=np.uint8)
    for rows, cols in spots:
        grey[rows, cols] = 200 if background < 100 else 60
    return np.dstack([grey, grey, grey, np.full_like(grey, 255)])


def _mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[rows, cols] = 255
    return mask


# Two fluorescence images (kept), one colour and one light-background image (dropped).
A_SHAPE, B_SHAPE = (40, 48), (32, 32)
A_MASKS = [(slice(2, 8), slice(2, 8)), (slice(20, 26), slice(20, 26)), (slice(24, 30), slice(24, 30))]
B_MASKS = [(slice(2, 10), slice(2, 10)), (slice(15, 25), slice(15, 25))]
B_FIXED = [(slice(2, 10), slice(2, 6)), (slice(2, 10), slice(6, 10)), (slice(15, 25), slice(15, 25))]


def _stage1_items() -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    colour = _grey_rgba(*A_SHAPE, background=5, spots=A_MASKS[:1])
    colour[..., 0] = np.clip(colour[..., 0].astype(int) + 30, 0, 255).astype(np.uint8)
    return {
        "aa11": (_grey_rgba(*A_SHAPE, 5, A_MASKS), [_mask(A_SHAPE, *m) for m in A_MASKS]),
        "bb22": (_grey_rgba(*B_SHAPE, 3, B_MASKS), [_mask(B_SHAPE, *m) for m in B_MASKS]),
        "cc33": (colour, [_mask(A_SHAPE, *A_MASKS[0])]),
        "dd44": (_grey_rgba(*B_SHAPE, 220, B_MASKS), [_mask(B_SHAPE, *m) for m in B_MASKS]),
    }


def _write_dsb_zip(path: Path, items: dict, prefix: str = "") -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for image_id, (image, masks) in items.items():
            zf.writestr(f"{prefix}{image_id}/images/{image_id}.png", _png(image))
            for k, mask in enumerate(masks):
                zf.writestr(f"{prefix}{image_id}/masks/m{k:02d}.png", _png(mask))


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """The three archives in a folder, served over HTTP; yields the URL, the folder and the request log."""
    root = tmp_path_factory.mktemp("served")
    _write_pbc_zip(root / PBC_ZIP)
    items = _stage1_items()
    _write_dsb_zip(root / STAGE1_ZIP, items)
    fixed = {"bb22": (items["bb22"][0], [_mask(B_SHAPE, *m) for m in B_FIXED])}
    _write_dsb_zip(root / FIXES_ZIP, fixed, prefix="kaggle-dsbowl-2018-dataset-fixes-master/stage1_train/")
    (root / "broken").mkdir()
    (root / "broken" / PBC_ZIP).write_bytes(b"PK\x03\x04 this is not a complete zip archive")

    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hashes = {name: pooch.file_hash(str(root / name)) for name in (PBC_ZIP, STAGE1_ZIP, FIXES_ZIP)}
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}", "root": root, "requests": requests,
               "hashes": hashes}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _gets(served: dict, name: str) -> int:
    return sum(path.endswith("/" + name) for path in served["requests"])


# ------------------------------------------------------------------------------------ PBC
def test_fetch_pbc_builds_npz_and_jpg_folders(served, tmp_path):
    dest = tmp_path / "data"
    built = fetch("pbc", dest, progress=False, mirror=served["url"], hashes=served["hashes"])
    assert built == [dest / "pbc_blood_28", dest / "pbc_blood_jpg"]

    with np.load(dest / "pbc_blood_28" / "pbc_blood_28.npz") as z:
        data = {key: z[key] for key in z.files}
    splits = ("train", "val", "test")
    expected = {f"{s}_{k}" for s in splits for k in ("images", "labels", "files")}
    assert set(data) == expected | {"class_names", "duplicate_second_copies"}
    assert list(data["class_names"]) == PBC_CLASSES
    assert list(data["duplicate_second_copies"]) == [DUPLICATE]
    per_class = {"train": 7, "val": 1, "test": 2}  # stratified 70/10/20 of 10 per class
    for s in splits:
        images, labels, files = data[f"{s}_images"], data[f"{s}_labels"], data[f"{s}_files"]
        assert images.dtype == np.uint8 and images.shape == (8 * per_class[s], 28, 28, 3)
        assert labels.dtype == np.uint8 and labels.shape == (8 * per_class[s],)
        assert list(files) == sorted(files)
        assert np.bincount(labels, minlength=8).tolist() == [per_class[s]] * 8
        assert all(PBC_CLASSES[lab] == f.split("/")[0] for lab, f in zip(labels, files, strict=True))
    all_files = np.concatenate([data[f"{s}_files"] for s in splits])
    assert len(all_files) == len(set(all_files)) == 8 * PER_CLASS

    # The centre crop keeps only the centre colour: the light border must not leak into the 28x28 image.
    for image, label, name in zip(data["train_images"], data["train_labels"], data["train_files"], strict=True):
        i = 0 if name == DUPLICATE else int(name.split("_")[-1].removesuffix(".jpg"))
        assert np.abs(image.astype(int) - _centre_colour(int(label), i)).max() <= 8, name

    table = pd.read_csv(dest / "pbc_blood_jpg" / "labels.csv")
    assert list(table.columns) == ["path", "label", "class_name", "width", "height", "original_path"]
    assert len(table) == 8 * PER_CLASS - 1 and DUPLICATE not in set(table.path)  # all but the copy
    assert (table.width == JPEG_SIZE[0]).all() and (table.height == JPEG_SIZE[1]).all()
    assert (table.class_name == [PBC_CLASSES[i] for i in table.label]).all()
    with zipfile.ZipFile(served["root"] / PBC_ZIP) as zf:
        for row in table.itertuples():
            assert (dest / "pbc_blood_jpg" / row.path).read_bytes() == zf.read(row.original_path)
    assert sorted(p.name for p in dest.iterdir()) == ["downloads", "pbc_blood_28", "pbc_blood_jpg"]


def test_second_fetch_does_not_download_again(served, tmp_path):
    before = _gets(served, PBC_ZIP)
    fetch("pbc", tmp_path, progress=False, mirror=served["url"], hashes=served["hashes"])
    assert _gets(served, PBC_ZIP) == before + 1
    fetch("pbc", tmp_path, progress=False, mirror=served["url"], hashes=served["hashes"])
    assert _gets(served, PBC_ZIP) == before + 1
    assert (tmp_path / "pbc_blood_28" / "pbc_blood_28.npz").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


# ------------------------------------------------------------------------------------ DSB 2018
def test_fetch_dsb2018_builds_fluorescence_subset_with_fixes(served, tmp_path):
    built = fetch("dsb2018", tmp_path, progress=False, mirror=served["url"], hashes=served["hashes"])
    folder = tmp_path / "dsb2018_fluo"
    assert built == [folder]

    manifest = pd.read_csv(folder / "manifest.csv").set_index("image_id")
    assert list(manifest.index) == ["aa11", "bb22"]  # colour cc33 and light-background dd44 dropped
    for column in ("height", "width", "n_nuclei", "overlap_pixels", "size_group", "n_labels_in_png"):
        assert column in manifest.columns
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["aa11.png", "bb22.png"]

    a, b = manifest.loc["aa11"], manifest.loc["bb22"]
    assert (a.height, a.width, a.size_group) == (40, 48, "40x48")
    assert (a.n_nuclei, a.overlap_pixels) == (3, 4)  # masks 2 and 3 share a 2x2 corner
    assert (b.n_nuclei, b.overlap_pixels) == (3, 0)  # the fixes split the first nucleus in two
    assert (a.img_min, a.img_max) == (5, 200)

    with Image.open(folder / "images" / "aa11.png") as img:
        assert img.mode == "L"
        grey = np.asarray(img)
    assert grey.shape == A_SHAPE and grey.dtype == np.uint8
    labels_a = np.asarray(Image.open(folder / "labels" / "aa11.png"))
    labels_b = np.asarray(Image.open(folder / "labels" / "bb22.png"))
    assert labels_a.dtype == np.uint16 and labels_a.shape == A_SHAPE
    assert np.unique(labels_a).tolist() == [0, 1, 2, 3]
    assert labels_a[25, 25] == 3  # overlap pixel: the later mask wins
    assert np.count_nonzero(labels_a == 2) == 36 - 4
    assert np.unique(labels_b).tolist() == [0, 1, 2, 3]
    assert labels_b[5, 3] == 1 and labels_b[5, 8] == 2 and labels_b[20, 20] == 3

    before = _gets(served, STAGE1_ZIP) + _gets(served, FIXES_ZIP)
    fetch("dsb2018", tmp_path, progress=False, mirror=served["url"], hashes=served["hashes"])
    assert _gets(served, STAGE1_ZIP) + _gets(served, FIXES_ZIP) == before


def test_merge_masks_counts_overlap_and_keeps_ids_consecutive():
    first = np.zeros((4, 4), bool)
    first[:2, :2] = True
    second = np.zeros((4, 4), bool)
    second[:3, :3] = True  # covers the first entirely
    labels, n, overlap = merge_masks([first, np.zeros((4, 4), bool), second])
    assert (n, overlap) == (2, 4)
    assert labels.dtype == np.uint16 and np.unique(labels).tolist() == [0, 1]


# ------------------------------------------------------------------------------------ failures
def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_wrong_hash_is_a_data_error(served, tmp_path):
    wrong = {PBC_ZIP: "sha256:" + "0" * 64}
    with pytest.raises(DataError) as exc:
        fetch("pbc", tmp_path, progress=False, mirror=served["url"], hashes=wrong)
    message = _one_line(exc)
    assert PBC_ZIP in message and "checksum" in message and "expected sha256:000" in message
    assert not (tmp_path / "downloads" / PBC_ZIP).exists()
    assert not (tmp_path / "pbc_blood_28").exists()


def test_missing_file_on_server_is_a_data_error(served, tmp_path):
    with pytest.raises(DataError) as exc:
        fetch("pbc", tmp_path, progress=False, mirror=served["url"] + "/nowhere")
    message = _one_line(exc)
    assert "404" in message and "internet connection" in message and "downloads" in message


def test_corrupt_archive_leaves_no_half_dataset(served, tmp_path):
    broken = served["root"] / "broken" / PBC_ZIP
    original = broken.read_bytes()
    with pytest.raises(DataError) as exc:
        fetch("pbc", tmp_path, progress=False, mirror=served["url"] + "/broken",
              hashes={PBC_ZIP: pooch.file_hash(str(broken))})
    assert "not a readable zip" in _one_line(exc)
    assert [p.name for p in tmp_path.iterdir()] == ["downloads"]
    assert (tmp_path / "downloads" / PBC_ZIP).read_bytes() == original  # archive left as downloaded


def test_unknown_name_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="pbc"):
        fetch("nope", tmp_path, progress=False)


def test_mirror_from_environment(monkeypatch):
    monkeypatch.delenv(fetch_module.MIRROR_ENV, raising=False)
    assert archive_url(STAGE1_ZIP) == fetch_module.SOURCES[STAGE1_ZIP].url
    monkeypatch.setenv(fetch_module.MIRROR_ENV, "https://mirror.example.org/cellkit/")
    assert archive_url(STAGE1_ZIP) == "https://mirror.example.org/cellkit/stage1_train.zip"
    assert archive_url(STAGE1_ZIP, mirror="http://127.0.0.1:1") == "http://127.0.0.1:1/stage1_train.zip"
