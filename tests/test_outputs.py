"""cellkit.outputs: atomic writes, single output files checked before the work, the output folder rule, and the
run manifest that says whether a run finished and lets a rerun skip what is done. No network, no TensorFlow."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from cellkit import outputs
from cellkit.outputs import OutputError, RunFolder


def header(**changes):
    base = {"kind": "segment", "model": "/m/unet.keras", "model_sha256": "a" * 64, "input": "/data/in",
            "options": {"tile": 512, "flips": False, "precision": "float32", "overlay": False},
            "command": "cellkit segment ...", "resume": "cellkit segment --resume --out masks"}
    return {**base, **changes}


def entry(name, folder, size=10, mtime_ns=1, n=3):
    (folder / f"{Path(name).stem}.png").write_bytes(b"labels")
    return {"input": name, "size": size, "mtime_ns": mtime_ns, "output": f"{Path(name).stem}.png", "overlay": None,
            "n_nuclei": n, "mean_area_px": 12.5, "height": 4, "width": 5}


class Stat:
    def __init__(self, size, mtime_ns):
        self.st_size, self.st_mtime_ns = size, mtime_ns


def names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# --- atomic writes ----------------------------------------------------------------------------------------


def test_write_bytes_replaces_through_a_temporary_name(tmp_path):
    target = tmp_path / "sub" / "a.png"
    outputs.write_bytes(target, b"one")
    outputs.write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and names(tmp_path / "sub") == ["a.png"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "counts.csv"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), outputs.replacing(target) as temp:
        temp.write_text("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and names(tmp_path) == ["counts.csv"]


def test_temporary_names_are_hidden_and_keep_the_suffix_when_asked(tmp_path):
    temp = outputs.temporary_name(tmp_path / "unet.keras", keep_suffix=True)
    assert temp.parent == tmp_path and temp.name.startswith(".unet.keras") and temp.suffix == ".keras"
    assert outputs.TEMP_MARK in temp.name and outputs.temporary_name(tmp_path / "a.png").suffix != ".png"


# --- single output files ----------------------------------------------------------------------------------


def test_check_file_accepts_a_new_file_in_a_folder_to_be_made(tmp_path):
    path = tmp_path / "new" / "deeper" / "scores.json"
    assert outputs.check_file(path, "--json") == path
    assert not (tmp_path / "new").exists()  # checking makes nothing


@pytest.mark.parametrize("case, words", [
    ("folder", ["names a folder", "scores.json/result.json"]),
    ("exists", ["already exists", "--overwrite"]),
    ("parent_is_file", ["is a file, not a folder"]),
    ("inside_input", ["refusing to write inside the input data"]),
])
def test_check_file_refuses_in_one_line(tmp_path, case, words):
    path = {"folder": tmp_path / "scores.json", "exists": tmp_path / "scores.json",
            "parent_is_file": tmp_path / "blocker" / "sub" / "scores.json",
            "inside_input": tmp_path / "data" / "scores.json"}[case]
    if case == "folder":
        path.mkdir()
    elif case == "exists":
        path.write_text("{}")
    elif case == "parent_is_file":
        (tmp_path / "blocker").write_text("a file")
    else:
        path.parent.mkdir()
    with pytest.raises(OutputError) as info:
        outputs.check_file(path, "--json", inputs=[tmp_path / "data"])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_check_file_with_overwrite_accepts_an_existing_file(tmp_path):
    (tmp_path / "p.csv").write_text("old")
    outputs.check_file(tmp_path / "p.csv", "--csv", overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_check_file_refuses_an_unwritable_folder(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    with pytest.raises(OutputError, match="not writable"):
        outputs.check_file(tmp_path / "locked" / "p.csv", "--csv")


# --- output names -----------------------------------------------------------------------------------------


def test_two_inputs_writing_one_name_are_refused_naming_both(tmp_path):
    plan = {Path("in/a.png"): (Path("a.png"),), Path("in/a.tif"): (Path("a.png"),)}
    with pytest.raises(OutputError) as info:
        outputs.check_unique(plan, tmp_path)
    assert "in/a.png" in str(info.value) and "in/a.tif" in str(info.value) and "would both write" in str(info.value)


def test_names_that_differ_only_by_case_or_clash_with_an_overlay_are_refused(tmp_path):
    with pytest.raises(OutputError):
        outputs.check_unique({Path("A.png"): (Path("A.png"),), Path("a.jpg"): (Path("a.png"),)}, tmp_path)
    with pytest.raises(OutputError):
        outputs.check_unique({Path("x.png"): (Path("x.png"), Path("x_overlay.png")),
                              Path("x_overlay.png"): (Path("x_overlay.png"),)}, tmp_path)
    outputs.check_unique({Path("s1/a.png"): (Path("s1/a.png"),), Path("s2/a.png"): (Path("s2/a.png"),)}, tmp_path)


# --- the folder rule --------------------------------------------------------------------------------------


def test_folder_states(tmp_path):
    assert outputs.folder_state(tmp_path / "new") == "new"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")
    assert outputs.folder_state(tmp_path / "empty") == "empty"
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"reference")
    assert outputs.folder_state(tmp_path / "masks") == "foreign"
    (tmp_path / "masks" / outputs.MANIFEST).write_text("{}")
    assert outputs.folder_state(tmp_path / "masks") == "cellkit"
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        outputs.folder_state(tmp_path / "file")


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "a.png").write_bytes(b"reference")
    with pytest.raises(OutputError) as info:
        RunFolder.open(masks, header())
    assert "not written by cellkit" in str(info.value) and "--overwrite" in str(info.value)
    assert names(masks) == ["a.png"]


def test_overwrite_writes_beside_foreign_files_and_deletes_none(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "keep.png").write_bytes(b"reference")
    run = RunFolder.open(masks, header(), overwrite=True)
    run.record(entry("a.png", masks))
    run.finish()
    assert {"keep.png", "a.png", outputs.MANIFEST, outputs.ENTRIES, outputs.COUNTS} == set(names(masks))
    assert (masks / "keep.png").read_bytes() == b"reference"


# --- the manifest -----------------------------------------------------------------------------------------


def test_a_run_records_entries_and_says_when_it_finished(tmp_path):
    out = tmp_path / "masks"
    run = RunFolder.open(out, header())
    assert json.loads((out / outputs.MANIFEST).read_text())["finished"] is False
    run.record(entry("b.png", out, n=7))
    run.record(entry("a.png", out, n=2))
    run.finish({"broken.png": "not a readable image"})
    head = json.loads((out / outputs.MANIFEST).read_text())
    assert head["finished"] is True and head["status"] == "finished" and head["n_done"] == 2
    assert head["failed"] == [{"input": "broken.png", "reason": "not a readable image"}]
    assert head["model_sha256"] == "a" * 64 and head["options"]["tile"] == 512
    rows = list(csv.DictReader(open(out / outputs.COUNTS)))
    assert [(r["file"], r["n_nuclei"], r["mean_area_px"]) for r in rows] == [("a.png", "2", "12.5"),
                                                                             ("b.png", "7", "12.5")]


def test_recording_an_image_appends_one_line_and_leaves_the_header(tmp_path):
    out = tmp_path / "masks"
    run = RunFolder.open(out, header())
    before = (out / outputs.MANIFEST).read_bytes()
    for i in range(50):
        run.record(entry(f"{i:03d}.png", out))
        assert (out / outputs.ENTRIES).read_text().count("\n") == i + 1
    assert (out / outputs.MANIFEST).read_bytes() == before  # O(1) per image: no JSON rewritten
    run.stop("interrupted")


def test_an_interrupted_run_stays_unfinished_and_its_counts_match_the_files(tmp_path):
    out = tmp_path / "masks"
    run = RunFolder.open(out, header())
    run.record(entry("a.png", out))
    run.stop("interrupted")
    head = json.loads((out / outputs.MANIFEST).read_text())
    assert head["finished"] is False and head["status"] == "interrupted" and head["resume"]
    assert [r["file"] for r in csv.DictReader(open(out / outputs.COUNTS))] == ["a.png"]


def test_the_same_run_continues_and_skips_unchanged_inputs(tmp_path):
    out = tmp_path / "masks"
    run = RunFolder.open(out, header())
    run.record(entry("a.png", out, size=10, mtime_ns=5))
    run.record(entry("b.png", out, size=10, mtime_ns=5))
    run.stop("interrupted")
    again = RunFolder.open(out, header())
    assert again.resumed
    assert again.finished_entry("a.png", Stat(10, 5))["n_nuclei"] == 3
    assert again.finished_entry("a.png", Stat(10, 6)) is None  # the input changed: redo it
    assert again.finished_entry("c.png", Stat(10, 5)) is None
    (out / "b.png").unlink()
    assert again.finished_entry("b.png", Stat(10, 5)) is None  # its output is gone: redo it
    again.finish()
    assert [r["file"] for r in csv.DictReader(open(out / outputs.COUNTS))] == ["a.png"]


@pytest.mark.parametrize("change, words", [
    ({"model_sha256": "b" * 64}, "another model"),
    ({"input": "/data/other"}, "another input"),
    ({"options": {"tile": 512, "flips": True, "precision": "float32", "overlay": False}}, "flips False there"),
])
def test_another_run_is_refused_unless_overwrite_which_starts_afresh(tmp_path, change, words):
    out = tmp_path / "masks"
    run = RunFolder.open(out, header())
    run.record(entry("a.png", out))
    run.finish()
    with pytest.raises(OutputError) as info:
        RunFolder.open(out, header(**change))
    assert words in str(info.value) and "--overwrite" in str(info.value)
    fresh = RunFolder.open(out, header(**change), overwrite=True)
    assert not fresh.resumed and fresh.entries == {} and (out / "a.png").is_file()  # nothing deleted
    fresh.finish()
    assert outputs.read_entries(out) == {}


def test_a_torn_last_line_is_ignored_then_cut_off(tmp_path):
    out = tmp_path / "masks"
    run = RunFolder.open(out, header())
    run.record(entry("a.png", out))
    run.stop("interrupted")
    with open(out / outputs.ENTRIES, "a") as handle:
        handle.write('{"input": "b.png", "size": 1')  # a kill in the middle of a line
    assert list(outputs.read_entries(out)) == ["a.png"]
    again = RunFolder.open(out, header())
    again.record(entry("c.png", out))
    again.finish()
    lines = (out / outputs.ENTRIES).read_text().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["a.png", "c.png"]


def test_a_damaged_manifest_is_one_line(tmp_path):
    (tmp_path / outputs.MANIFEST).write_text("{not json")
    with pytest.raises(OutputError, match="not a readable cellkit manifest"):
        RunFolder.open(tmp_path, header())
