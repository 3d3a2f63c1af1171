"""Committed results: the record a default run leaves in results/, its check, and the README table built from it."""

from __future__ import annotations

import json

import nbformat
import pytest

from cellkit import cli, notebooks, results

#: The README's two generated blocks, each holding an old table.
BLOCKS = "".join(f"<!-- {name}:begin -->\nold table\n<!-- {name}:end -->\n" for name in results.README_BLOCKS)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A records folder, a figures folder and one numbered notebook, all under tmp_path."""
    monkeypatch.setenv("CELLKIT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("CELLKIT_FIGURES_DIR", str(tmp_path / "figures"))
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# Demo"), nbformat.v4.new_code_cell("x = 1")]
    path = tmp_path / "01_eda.ipynb"
    nbformat.write(notebook, path)
    return path


def _recorded(notebook_path, headline, commit="abc123", synthetic=False, code=None):
    """Write a default-profile metrics.json and its record as a run of ``notebook_path`` would."""
    run = notebooks.NotebookRun(notebook_path.stem, profile="default")
    run.datasets["pbc28:train"] = {"name": "pbc28", "synthetic": synthetic, "path": "x", "n": 3}
    metrics = run.finish(metrics={}, headline=headline)
    record = json.loads(metrics.read_text())
    record["git_commit"] = commit
    if code is not None:
        record["code"] = code
    metrics.write_text(json.dumps(record))
    return results.write_record(metrics, notebook_path, "default", wall_s=125.0, cpu_s=230.0)


def test_a_record_holds_the_run_the_notebook_and_the_code(workspace):
    path = _recorded(workspace, {"pbc_n_train": 11965})
    record = json.loads(path.read_text())
    assert path.parent.name == "default" and path.name == "01_eda.json"
    assert record["headline"] == {"pbc_n_train": 11965}
    assert record["notebook_sha256"] == results.notebook_sha256(workspace)
    assert record["run"] == {"wall_time_s": 125.0, "cpu_time_s": 230.0}
    assert record["code"]["cellkit/results.py"] == results.code_fingerprints()["cellkit/results.py"]
    assert results.record_problems(record, workspace) == []


def test_a_record_names_no_folder_of_the_machine_that_ran_it(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLKIT_DATA_DIR", str(tmp_path / "data"))
    run = notebooks.NotebookRun(workspace.stem, profile="default")
    run.datasets["pbc28:train"] = {"name": "pbc28", "synthetic": False, "path": str(tmp_path / "data" / "pbc"),
                                   "n": 3}
    homely = f"put the weights in {results.Path.home() / '.keras' / 'models'} or name them"
    metrics = run.finish(metrics={"notes": [homely], "folder": str(tmp_path / "data")}, headline={"n": 3})
    record = json.loads(results.write_record(metrics, workspace, "default", wall_s=1.0, cpu_s=1.0).read_text())
    assert record["datasets"]["pbc28:train"]["path"] == "$CELLKIT_DATA_DIR/pbc"
    assert record["metrics"] == {"notes": ["put the weights in ~/.keras/models or name them"],
                                 "folder": "$CELLKIT_DATA_DIR"}
    assert str(tmp_path) not in json.dumps(record)


def test_the_notebook_fingerprint_ignores_outputs_and_sees_edits(tmp_path, workspace):
    before = results.notebook_sha256(workspace)
    notebook = nbformat.read(workspace, as_version=4)
    notebook.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    notebook.cells[1].execution_count = 7
    nbformat.write(notebook, workspace)
    assert results.notebook_sha256(workspace) == before
    notebook.cells[1].source = "x = 2"
    nbformat.write(notebook, workspace)
    assert results.notebook_sha256(workspace) != before


@pytest.mark.parametrize(("change", "complaint"), [
    ("dirty", "uncommitted changes"),
    ("synthetic", "simulated stand-in"),
    ("notebook", "the notebook changed"),
    ("code", "cellkit/results.py changed"),
    ("no code", "does not say which cellkit code"),
])
def test_the_check_names_what_makes_a_record_stale(workspace, change, complaint):
    prints = results.code_fingerprints()
    if change == "code":
        prints["cellkit/results.py"] = "0" * 64
    path = _recorded(workspace, {"pbc_n_train": 1}, commit="abc123-dirty" if change == "dirty" else "abc123",
                     synthetic=change == "synthetic", code={} if change == "no code" else prints)
    if change == "notebook":
        notebook = nbformat.read(workspace, as_version=4)
        notebook.cells[1].source = "x = 2"
        nbformat.write(notebook, workspace)
    problems = results.record_problems(json.loads(path.read_text()), workspace)
    assert len(problems) == 1 and complaint in problems[0] and problems[0].startswith("01_eda: ")


def test_the_check_wants_a_record_per_notebook_and_the_records_table(workspace, tmp_path):
    other = tmp_path / "03_handcrafted_features_random_forest.ipynb"
    other.write_text(workspace.read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BLOCKS}")
    _recorded(workspace, {"pbc_n_train": 11965})

    problems = results.check("default", notebooks=[workspace, other], readme=readme)
    assert [p.split(":")[0] for p in problems] == ["03_handcrafted_features_random_forest", "README.md", "README.md"]
    assert "no record" in problems[0] and "results table" in problems[1] and "times table" in problems[2]
    assert "cellkit report --write" in problems[2]

    results.write_results_table(readme)
    _recorded(other, {"rf_accuracy": 0.95})
    results.write_results_table(readme)
    assert results.check("default", notebooks=[workspace, other], readme=readme) == []


def test_the_table_reads_committed_records_with_intervals_and_time(workspace):
    _recorded(workspace, {"pbc_n_train": 11965, "dsb_median_nuclei_per_image": 21.5})
    four = workspace.with_name("04_cnn_lenet_alexnet.ipynb")
    four.write_text(workspace.read_text())
    _recorded(four, {"best_accuracy": 0.98761, "best_accuracy_ci": [0.98302, 0.99133]})
    table = results.results_table()
    assert "| 01_eda | PBC-28 training images | 11965 | default, pbc28, abc123, 2.1 min |" in table
    assert "| 21.5 |" in table
    assert "| PBC-28 test accuracy, best CNN (chosen on validation) | 0.9876 [0.983, 0.9913] |" in table
    assert "| 03_handcrafted_features_random_forest | PBC-28 test accuracy, tuned random forest on hand-crafted " \
           "features | not recorded yet | - |" in table
    assert "VGG16 from scratch with the fine-tuning's wall time | full profile only | - |" in table  # profile: full


def test_the_times_table_gives_each_notebooks_recorded_wall_and_cpu_minutes(workspace):
    _recorded(workspace, {"pbc_n_train": 11965})
    table = results.times_table()
    assert "| 01_eda | 2.1 min (3.8 CPU-min) | not recorded yet |" in table


def test_a_smoke_run_leaves_no_record(workspace, monkeypatch, tmp_path):
    def fake_execute(source, output, **options):  # what the kernel would do: write metrics.json
        notebooks.NotebookRun("01_eda", profile=options["parameters"]["profile"]).finish({}, {"pbc_n_train": 1})

    monkeypatch.setattr("papermill.execute_notebook", fake_execute)
    smoke = notebooks.run_notebook(workspace, "smoke", output_dir=tmp_path / "out", progress=False)
    assert smoke.ok and not results.record_path("01_eda", "smoke").exists()
    default = notebooks.run_notebook(workspace, "default", output_dir=tmp_path / "out", progress=False)
    record = results.read_record("01_eda", "default")
    assert default.ok and record["headline"] == {"pbc_n_train": 1}
    assert record["run"]["wall_time_s"] >= 0 and record["run"]["cpu_time_s"] >= 0


def test_write_results_table_replaces_only_the_marked_part(workspace, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BLOCKS}outro\n")
    results.write_results_table(readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| notebook | quantity |" in text and "| notebook | default: wall (CPU) | full: wall (CPU) |" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        results.write_results_table(readme)


def test_report_check_fails_in_one_line_per_problem(workspace, capsys):
    assert cli.main(["report", "--check"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("error: ") for line in err)
    assert any("no record" in line for line in err)


@pytest.mark.skipif(not results.results_dir().is_dir(), reason="no committed records yet (results/default/)")
def test_the_committed_records_are_those_of_the_tree(capsys):
    """The committed results come from a clean default run of the code in the tree, and the README shows them."""
    assert cli.main(["report", "--check"]) == 0, capsys.readouterr().err
