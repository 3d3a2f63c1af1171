"""``cellkit export --format bioimageio``: tiny real models (a 4-filter U-Net trained for 6 steps on real DSB images,
a LeNet trained for one epoch on real PBC-28 images) packaged as bioimage.io models, then checked from outside:
the package validates offline with bioimageio.spec (file checks on), bioimageio.core's test reproduces the test
output from the weights, and rdf.yaml holds the axes, licence, citations and test tensors it should."""

from __future__ import annotations

import contextlib
import io
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from cellkit import cli, datasets

CELLKIT_URL = "https://example.com/cellkit"  # example.com: bioimageio.spec does not ask the network for it
DSB_DOI = "10.1038/s41592-019-0612-7"
PBC_DOI = "10.1016/j.dib.2020.105474"


@pytest.fixture(scope="module")
def packages(tiny_models, tmp_path_factory) -> dict:
    """Both models exported: the U-Net by the function the command calls (with --cite-url's and --author's
    arguments; its result holds the steps of the package's test), the classifier by the command itself.
    {kind: (package, exit status or the function's result, stdout)}. An export checks the package it writes
    (bioimageio.spec's validation, bioimageio.core's test) before it is renamed into place."""
    from cellkit import export

    out = tmp_path_factory.mktemp("packages")
    made = {}
    lines: list[str] = []
    result = export.export_bioimageio(tiny_models / "unet.keras", out / "unet.bioimageio.zip", cite_url=CELLKIT_URL,
                                      authors=["A. Tester"], log=lines.append)
    made["unet"] = (result.path, result, "\n".join(lines))
    package = out / "lenet.bioimageio.zip"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        status = cli.main(["export", "--format", "bioimageio", "--model", str(tiny_models / "lenet.keras"), "--out",
                           str(package)])
    made["lenet"] = (package, status, capture.getvalue())
    assert not Path("bioimageio_unzipped_tf_weights").exists()  # the test's unzipped weights stay in a temp folder
    return made


def rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def member_array(package: Path, name: str) -> np.ndarray:
    with zipfile.ZipFile(package) as archive:
        return np.load(io.BytesIO(archive.read(name)))


def project_licence() -> str:
    licence = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["license"]
    return licence if isinstance(licence, str) else licence["text"]


def test_the_command_writes_a_package_that_passed_its_checks(packages):
    package, status, stdout = packages["lenet"]
    assert status == 0, stdout
    assert package.is_file()
    assert "format validation: valid-format, bioimageio.core's test: passed" in stdout
    assert "outside the package (see its documentation): the input is an RGB image of exactly 28x28 px" in stdout


@pytest.mark.parametrize("kind", ["unet", "lenet"])
def test_the_package_holds_its_files(packages, kind):
    with zipfile.ZipFile(packages[kind][0]) as archive:
        names = set(archive.namelist())
    assert names == {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy", f"{kind}.keras",
                     f"{kind}_savedmodel.zip"}


@pytest.mark.parametrize("kind", ["unet", "lenet"])
def test_the_package_validates_offline_with_file_checks(packages, kind):
    """bioimageio.spec alone: the format, every file and its sha256. valid-format is the best status it gives
    without running the model (bioimage.io keeps "passed" for a model whose test passed)."""
    from bioimageio.spec import InvalidDescr, load_description

    descr = load_description(packages[kind][0], perform_io_checks=True)
    assert not isinstance(descr, InvalidDescr)
    assert descr.validation_summary.status == "valid-format"
    assert descr.validation_summary.errors == []


def test_bioimageio_core_reproduces_the_test_output_from_both_weight_formats(packages):
    """The export's check is bioimageio.core's test_model on the written package; its steps come back."""
    result = packages["unet"][1]
    assert (result.kind, result.validation, result.test) == ("unet", "valid-format", "passed")
    assert result.weight_formats == ["keras_v3", "tensorflow_saved_model_bundle"]
    steps = dict(result.test_steps)
    for weights in result.weight_formats:
        assert steps[f"Reproduce test outputs from test inputs ({weights})"] == "passed"
        runs = [name for name in steps if name.startswith(f"Run {weights} inference for inputs with batch_size")]
        assert len(runs) >= 2 and all(steps[name] == "passed" for name in runs)  # other sizes and batches too
    assert all(status in ("passed", "valid-format") for status in steps.values()), steps
    assert result.notes == []  # cited with --cite-url, trained on a registered dataset


def test_the_unet_rdf_describes_the_stack_the_network_takes(packages, tiny_models):
    from cellkit import saving, unet

    package = packages["unet"][0]
    descr = rdf(package)
    config = unet.read_unet_config(tiny_models / "unet.keras")
    (input_,), (output,) = descr["inputs"], descr["outputs"]
    assert [axis["type"] for axis in input_["axes"]] == ["batch", "space", "space", "channel"]
    assert [axis.get("id") for axis in input_["axes"][1:3]] == ["y", "x"]
    assert input_["axes"][1]["size"] == {"min": 16, "step": 16}
    assert input_["axes"][3]["channel_names"] == ["original", "inverse", "canny"] == list(config.channels)
    assert input_.get("preprocessing", []) == []  # the stack is normalised already: nothing would be honest
    assert [axis["type"] for axis in output["axes"]] == ["batch", "space", "space", "channel"]
    assert output["axes"][1]["size"] == {"tensor_id": input_["id"], "axis_id": "y"}
    assert output["axes"][3]["channel_names"] == ["background", "cell", "edge"]
    assert "Canny" in descr["description"] and "see the documentation" in descr["description"]
    assert descr["license"] == project_licence()
    assert descr["authors"] == [{"name": "A. Tester"}]
    assert descr["weights"]["tensorflow_saved_model_bundle"]["parent"] == "keras_v3"
    assert descr["config"]["cellkit"]["metadata"]["channels"] == list(config.channels)
    dois = [entry.get("doi") for entry in descr["cite"]]
    assert DSB_DOI in dois and "10.1007/978-3-319-24574-4_28" in dois  # the training data and the U-Net paper
    assert any(entry.get("url") == CELLKIT_URL and "cellkit" in entry["text"] for entry in descr["cite"])
    # the test tensors: the network's input stack and what the saved network computes for it
    test_input = member_array(package, input_["test_tensor"]["source"])
    test_output = member_array(package, output["test_tensor"]["source"])
    assert test_input.dtype == test_output.dtype == np.float32
    assert test_input.ndim == 4 and test_input.shape[0] == 1 and test_input.shape[-1] == 3
    assert test_input.shape[1] % 16 == 0 and test_input.shape[2] % 16 == 0
    assert test_output.shape == (*test_input.shape[:3], 3)
    assert set(np.unique(test_input[..., 2])) <= {0.0, 1.0}  # the Canny channel
    np.testing.assert_allclose(test_input[..., 1], 1 - test_input[..., 0], atol=1e-6)
    network = saving.load_network(tiny_models / "unet.keras")
    np.testing.assert_allclose(network.predict_on_batch(test_input), test_output, atol=1e-5)
    np.testing.assert_allclose(test_output.sum(axis=-1), 1, atol=1e-4)  # softmax


def test_the_unet_documentation_says_what_the_user_must_do(packages):
    with zipfile.ZipFile(packages["unet"][0]) as archive:
        text = archive.read("README.md").decode()
        cover = archive.read("cover.png")
    assert "# Validation" in text
    for words in ("Canny", "percentile 1", "percentile 99.8", "24 px", "probs_to_instances", "cellkit segment",
                  DSB_DOI, "MIT"):
        assert words in text, words
    from PIL import Image

    image = Image.open(io.BytesIO(cover))
    assert image.format == "PNG" and image.width == 2 * image.height


def test_the_classifier_rdf_scales_its_uint8_input_in_the_package(packages, tiny_models):
    from cellkit import classifiers

    package, _, stdout = packages["lenet"]
    descr = rdf(package)
    trained = classifiers.load(tiny_models / "lenet.keras")
    (input_,), (output,) = descr["inputs"], descr["outputs"]
    assert [(axis["type"], axis.get("size")) for axis in input_["axes"]] == [
        ("batch", None), ("space", 28), ("space", 28), ("channel", None)]
    assert input_["axes"][3]["channel_names"] == ["red", "green", "blue"]
    assert input_["data"]["type"] == "uint8"
    steps = input_["preprocessing"]  # bioimageio.spec puts the declared dtype first
    assert [step["id"] for step in steps] == ["ensure_dtype", "scale_linear", "ensure_dtype"]
    assert steps[0]["kwargs"] == {"dtype": "uint8"} and steps[2]["kwargs"] == {"dtype": "float32"}
    assert steps[1]["kwargs"]["offset"] == -1.0 and steps[1]["kwargs"]["gain"] == pytest.approx(2 / 255)
    assert [axis["type"] for axis in output["axes"]] == ["batch", "channel"]
    assert output["axes"][1]["channel_names"] == trained.class_names
    assert descr["license"] == project_licence()
    dois = [entry.get("doi") for entry in descr["cite"]]
    assert PBC_DOI in dois and "10.1109/5.726791" in dois  # the training data and LeNet
    assert not any("url" in entry for entry in descr["cite"])  # no --cite-url: cellkit is named, not cited
    assert "note: cellkit is not cited" in stdout
    test_input = member_array(package, input_["test_tensor"]["source"])
    test_output = member_array(package, output["test_tensor"]["source"])
    assert test_input.shape == (1, 28, 28, 3) and test_input.dtype == np.uint8
    np.testing.assert_allclose(trained.predict_proba(test_input, tta="none"), test_output, atol=1e-5)


def test_an_existing_package_is_not_replaced_without_overwrite(packages, tiny_models, capsys):
    package = packages["lenet"][0]
    before = package.read_bytes()
    capsys.readouterr()
    status = cli.main(["export", "--model", str(tiny_models / "lenet.keras"), "--out", str(package)])
    assert status == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "already exists" in err[0] and "--overwrite" in err[0]
    assert package.read_bytes() == before


def test_export_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = capsys.readouterr().out
    assert "cellkit export --format bioimageio --model models/unet.keras --out unet.bioimageio.zip" in text


def test_a_one_channel_unet_has_its_percentile_normalisation_in_the_package(tiny_models, real_data, tmp_path):
    """A 1-channel U-Net (report 003's input) takes the grey image: the package normalises it with scale_range and
    clip, and bioimageio.core's test shows that they compute what cellkit's percentile normalisation does (the test
    output is the network's on cellkit's normalisation). Untrained weights suffice for that; Keras weights only."""
    from cellkit import export, unet

    config = unet.UNetConfig(n_classes=1, channels=("original",), base_filters=4)
    unet.save_unet(unet.build_from_config(config), config, tmp_path / "grey.keras")
    manifest = datasets.load_dsb2018_manifest()
    image_id = manifest.loc[manifest["size_group"] == "256x256", "image_id"].iloc[-1]
    sample = real_data["dsb2018"] / "images" / f"{image_id}.png"
    result = export.export_bioimageio(tmp_path / "grey.keras", tmp_path / "grey.zip", sample=sample,
                                      weight_formats=["keras_v3"])
    assert (result.validation, result.test, result.weight_formats) == ("valid-format", "passed", ["keras_v3"])
    assert dict(result.test_steps)["Reproduce test outputs from test inputs (keras_v3)"] == "passed"
    assert result.sample == sample.name
    assert any("no registered cellkit dataset" in note for note in result.notes)  # no record beside the model
    descr = rdf(result.path)
    (input_,), (output,) = descr["inputs"], descr["outputs"]
    assert input_["axes"][3]["channel_names"] == ["grey"] and output["axes"][3]["channel_names"] == ["nucleus"]
    steps = [step for step in input_["preprocessing"] if step["id"] != "ensure_dtype"]
    assert [step["id"] for step in steps] == ["scale_range", "clip"]
    assert steps[0]["kwargs"]["min_percentile"] == 1.0 and steps[0]["kwargs"]["max_percentile"] == 99.8
    assert steps[0]["kwargs"]["axes"] == ["y", "x"] and (steps[1]["kwargs"]["min"], steps[1]["kwargs"]["max"]) == (0, 1)
    test_input = member_array(result.path, input_["test_tensor"]["source"])
    assert test_input.shape[-1] == 1 and test_input.max() > 1  # the image as it is, not normalised
    assert set(descr["weights"]) == {"keras_v3"}


def test_a_package_whose_test_fails_is_not_written(tiny_models, tmp_path, monkeypatch):
    """An expected output the weights do not reproduce (here: altered before packaging) fails bioimageio.core's
    test; the export says so in one line and leaves nothing behind."""
    from cellkit import export

    make_files = export._make_files

    def altered(*args, **kwargs):
        made = make_files(*args, **kwargs)
        np.save(made["test_output"], np.load(made["test_output"]) + np.float32(0.5))
        return made

    monkeypatch.setattr(export, "_make_files", altered)
    with pytest.raises(export.ExportError) as caught:
        export.export_bioimageio(tiny_models / "lenet.keras", tmp_path / "bad.zip", weight_formats=["keras_v3"])
    message = str(caught.value)
    assert "\n" not in message and "bioimageio.core's test failed" in message and "nothing was written" in message
    assert "Reproduce test outputs" in message
    assert list(tmp_path.iterdir()) == []
