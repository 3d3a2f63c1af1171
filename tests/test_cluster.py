"""``cellkit segment --workers N`` and ``--scheduler ADDRESS``: the labels and counts of a Dask cluster are those of
the single-process run byte for byte, a worker killed mid-run loses and duplicates nothing, and a scheduler that
is not there is one line and exit 2 within seconds.

A 4-filter U-Net trained for a few steps on 6 real DSB 2018 images (its predictions are poor, which does not matter
here: only equality with the single-process run does) segments real DSB images; the clusters are started and closed
inside the tests, on 127.0.0.1, with worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from cellkit import cli, cluster, datasets, outputs

N_IMAGES = 12


@pytest.fixture(scope="module")
def tiny_unet(real_data, tmp_path_factory) -> Path:
    """A 4-filter U-Net trained for 6 steps on 6 real DSB images, without the zoom to a nucleus size (so that the
    workers trace the network for two image sizes only), saved as a .keras file."""
    from cellkit import unet

    folder = tmp_path_factory.mktemp("cluster_model")
    manifest = datasets.load_dsb2018_manifest()
    ids = manifest.loc[manifest["size_group"] == "256x256", "image_id"].iloc[:8].tolist()
    segmenter = unet.train_unet(datasets.load_dsb2018(ids[:6]), datasets.load_dsb2018(ids[6:]),
                                config=unet.UNetConfig(epochs=2, steps_per_epoch=3, base_filters=4, crop=64,
                                                       batch_size=4, val_crops=4, val_crop_size=64,
                                                       nucleus_diameter=None),  # no zoom: few shapes to trace
                                progress="none", tune=False, measure_throughput=False)
    segmenter.save(folder / "unet.keras")
    return folder / "unet.keras"


@pytest.fixture(scope="module")
def dsb_folder(real_data, tmp_path_factory) -> Path:
    """12 real DSB 2018 PNGs of two sizes, in a folder with one subfolder (kept in the output)."""
    manifest = datasets.load_dsb2018_manifest().sort_values("image_id")
    picked = (manifest[manifest["size_group"] == "256x256"]["image_id"].iloc[:8].tolist()
              + manifest[manifest["size_group"] == "360x360"]["image_id"].iloc[:4].tolist())
    assert len(picked) == N_IMAGES
    folder = tmp_path_factory.mktemp("cluster_inputs")
    (folder / "sub").mkdir()
    for n, image_id in enumerate(picked):
        target = folder / ("sub" if n % 3 == 0 else ".") / f"{image_id[:12]}.png"
        shutil.copy(real_data["dsb2018"] / "images" / f"{image_id}.png", target)
    return folder


def _segment(model: Path, inputs: Path, out: Path, *extra: str) -> int:
    return cli.main(["segment", "--model", str(model), "--input", str(inputs), "--out", str(out),
                     "--precision", "float32", "--quiet", *extra])


def _label_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _entry_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / outputs.ENTRIES).read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single_process(tiny_unet, dsb_folder, tmp_path_factory) -> Path:
    """The output folder of the single-process run (no Dask) on the images: what the clusters must give."""
    out = tmp_path_factory.mktemp("single") / "masks"
    assert _segment(tiny_unet, dsb_folder, out) == 0
    return out


@pytest.fixture(scope="module")
def local_cluster():
    """A Dask cluster of 2 single-threaded worker processes on 127.0.0.1, closed after this file's tests."""
    with cluster.local_cluster(2, log_level=logging.CRITICAL) as local:
        yield local


def _assert_same_run(out: Path, reference: Path) -> None:
    """``out`` holds the labels and counts of ``reference`` byte for byte, and one manifest entry per image."""
    labels = _label_files(out)
    assert len(labels) == N_IMAGES and any("/" in name for name in labels)  # a subfolder is kept
    assert labels == _label_files(reference)
    assert (out / outputs.COUNTS).read_bytes() == (reference / outputs.COUNTS).read_bytes()
    entries = _entry_lines(out)
    assert len(entries) == N_IMAGES and len({e["input"] for e in entries}) == N_IMAGES  # once each
    assert {e["input"]: e for e in entries} == {e["input"]: e for e in _entry_lines(reference)}
    header = json.loads((out / outputs.MANIFEST).read_text())
    assert header["finished"] and header["n_done"] == N_IMAGES and header["options"]["precision"] == "float32"


def test_a_cluster_gives_the_labels_and_counts_of_one_process(tiny_unet, dsb_folder, single_process, local_cluster,
                                                              tmp_path, capsys):
    capsys.readouterr()

    assert _segment(tiny_unet, dsb_folder, tmp_path / "masks", "--scheduler", local_cluster.scheduler_address) == 0

    printed = capsys.readouterr()
    assert "segmenting on 2 Dask worker(s)" in printed.out and "Traceback" not in printed.err
    _assert_same_run(tmp_path / "masks", single_process)


def test_an_unreadable_image_is_skipped_on_a_cluster_as_without_one(tiny_unet, dsb_folder, local_cluster, tmp_path,
                                                                       capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = sorted(dsb_folder.glob("*.png"))[:2]
    for path in good:
        shutil.copy(path, inputs / path.name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    capsys.readouterr()

    status = _segment(tiny_unet, inputs, tmp_path / "masks", "--scheduler", local_cluster.scheduler_address)

    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len(err) == 2 and err[0].startswith("warning: skipped ") and "broken.png" in err[0], err
    assert err[1].startswith("error: 1 of 3 files could not be segmented")
    header = json.loads((tmp_path / "masks" / outputs.MANIFEST).read_text())
    assert header["finished"] and header["n_done"] == 2 and [f["input"] for f in header["failed"]] == ["broken.png"]
    assert sorted(_label_files(tmp_path / "masks")) == sorted(path.name for path in good)


def test_a_worker_killed_mid_run_loses_and_repeats_nothing(tiny_unet, dsb_folder, single_process, local_cluster,
                                                           tmp_path, capsys):
    from distributed import Client

    out = tmp_path / "masks"
    with Client(local_cluster) as client:
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)
        killed: dict[str, int] = {}
        finished = threading.Event()

        def kill_after_the_first_result() -> None:
            while not finished.is_set():
                done = len((out / outputs.ENTRIES).read_text().splitlines()) if (out / outputs.ENTRIES).exists() else 0
                busy = [address for address, keys in client.processing().items() if keys and address in pids]
                if done >= 1 and busy:
                    killed["done_before"] = done
                    os.kill(pids[busy[0]], signal.SIGKILL)  # its nanny starts another; Dask reruns its task
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=kill_after_the_first_result, daemon=True)
        watcher.start()
        try:
            status = _segment(tiny_unet, dsb_folder, out, "--scheduler", local_cluster.scheduler_address)
        finally:
            finished.set()
            watcher.join(timeout=10)

    assert status == 0, capsys.readouterr().err
    assert 1 <= killed.get("done_before", 0) < N_IMAGES, "no worker was killed while the run went on"
    _assert_same_run(out, single_process)


def test_workers_start_a_local_cluster_and_resume_a_run(tiny_unet, dsb_folder, single_process, tmp_path, capsys):
    out = tmp_path / "masks"
    shutil.copytree(single_process, out)  # a run done without Dask, continued with it: nothing left to do
    capsys.readouterr()

    assert cli.main(["segment", "--resume", "--out", str(out), "--workers", "1", "--quiet"]) == 0

    printed = capsys.readouterr().out
    assert "segmenting on 1 Dask worker(s) of the scheduler at tcp://127.0.0.1:" in printed
    assert f"segmented 0 of {N_IMAGES} images ({N_IMAGES} done before, skipped)" in printed
    _assert_same_run(out, single_process)


def test_an_unreachable_scheduler_is_one_line_within_seconds(tiny_unet, dsb_folder, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_free_port()}"
    capsys.readouterr()
    start = time.monotonic()

    status = _segment(tiny_unet, dsb_folder, tmp_path / "masks", "--scheduler", address)

    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_BAD_INPUT
    assert len(err) == 1 and err[0].startswith(f"error: cannot reach the Dask scheduler at {address} ("), err
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not (tmp_path / "masks").exists()  # refused before anything was written
