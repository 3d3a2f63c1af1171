"""The Shiny page and its server: the four tabs, wired to the modules beside this one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellkit import plots
from cellkit.app.figures import fitted, image_panels, probability_bars
from cellkit.app.images import INPUT_TRANSFORMS, Classification, Segmentation, classify_image, segment_image
from cellkit.app.jobs import model_job
from cellkit.app.models import NO_MODELS_HINT, ModelEntry, find_models
from cellkit.app.recorded import (
    ClassifierResult,
    classifier_results,
    default_pair,
    per_class_f1,
    segmentation_results,
)
from cellkit.app.uploads import (
    MAX_PIXELS,
    MAX_UPLOAD_BYTES,
    Upload,
    take_upload,
)
from cellkit.datasets import DataError, first_line

ACCEPT = [".png", ".jpg", ".jpeg", ".tif", ".tiff"]


def _choices(entries: list[ModelEntry], kind: str) -> dict[str, str]:
    return {str(e.path): e.label for e in entries if e.kind == kind}


def build_ui(models_dir: Path) -> Callable[[Any], Any]:
    """The page, built per request so that models added since the server started are listed."""
    from shiny import ui

    def page(request: Any) -> Any:
        entries, problems = find_models(models_dir)
        classifiers, unets = _choices(entries, "classifier"), _choices(entries, "unet")
        found = ui.tags.ul(*[ui.tags.li(e.label) for e in entries]) if entries else ui.p(
            f"No models in {models_dir}: {NO_MODELS_HINT}.", class_="text-danger", id="no-models")
        skipped = ui.p("Skipped: " + "; ".join(problems), class_="text-warning") if problems else None
        missing_classifier = ui.p(f"No classifier found in {models_dir}: {NO_MODELS_HINT}.", class_="text-danger")
        missing_unet = ui.p(f"No U-Net found in {models_dir}: {NO_MODELS_HINT}.", class_="text-danger")
        limits = f"PNG, JPEG or TIFF; at most {MAX_UPLOAD_BYTES // 2**20} MiB and {MAX_PIXELS // 10**6} megapixels"
        return ui.page_navbar(
            ui.nav_panel(
                "Performance",
                ui.h4("Classifiers"),
                ui.p("Every result recorded by a notebook run (figures/*/metrics.json) or beside a trained model "
                     "(models/*.json). 'profile' and 'data' say which run and dataset produced each number."),
                ui.output_table("perf_table"),
                ui.input_select("perf_pick", "Details of", choices=[]),
                ui.output_table("perf_per_class"),
                ui.layout_columns(ui.output_plot("perf_confusion", height="420px"),
                                  ui.output_plot("perf_curves", height="360px")),
                ui.h4("Segmentation (IoU 0.5 matching, SEG)"),
                ui.output_table("perf_segmentation"),
                ui.h4("Models found"), found, skipped,
            ),
            ui.nav_panel(
                "Compare",
                ui.layout_columns(ui.input_select("cmp_a", "Model A", choices=[]),
                                  ui.input_select("cmp_b", "Model B", choices=[])),
                ui.output_table("cmp_table"),
                ui.output_plot("cmp_bars", height="420px"),
            ),
            ui.nav_panel(
                "Classify",
                ui.layout_sidebar(
                    ui.sidebar(
                        ui.input_file("cls_file", "Cell image", accept=ACCEPT, button_label="Upload..."),
                        ui.p(limits, class_="small text-muted"),
                        ui.input_select("cls_model", "Model", choices=classifiers) if classifiers
                        else missing_classifier,
                        ui.input_select("cls_transform", "Input transformation", choices=list(INPUT_TRANSFORMS)),
                        width=330,
                    ),
                    ui.output_ui("cls_status"),
                    ui.layout_columns(ui.output_plot("cls_input", height="300px"),
                                      ui.output_plot("cls_bars", height="340px")),
                ),
            ),
            ui.nav_panel(
                "Segment",
                ui.layout_sidebar(
                    ui.sidebar(
                        ui.input_file("seg_file", "Fluorescence image", accept=ACCEPT, button_label="Upload..."),
                        ui.p(limits, class_="small text-muted"),
                        ui.input_select("seg_model", "U-Net", choices=unets) if unets else missing_unet,
                        ui.output_ui("seg_download"),
                        width=330,
                    ),
                    ui.output_ui("seg_status"),
                    ui.layout_columns(ui.output_plot("seg_overlay", height="420px"),
                                      ui.output_plot("seg_sizes", height="320px")),
                ),
            ),
            title="cellkit", id="tab", window_title="cellkit app",
        )

    return page


#: What a tab's outcome is while its model job runs (:func:`_outcome`).
WORKING: Any = object()


def _status(result: Any, prompt: str, tab: str, shown: Callable[[Any], list[Any]], working: str) -> Any:
    """The status box of tab ``tab`` (``cls`` or ``seg``): the prompt before an upload, ``working`` while the model
    works (id ``<tab>-working``), the one-line error (id ``<tab>-error``), or ``shown(result)``."""
    from shiny import ui

    if result is None:
        return ui.p(prompt, class_="text-muted")
    if result is WORKING:
        return ui.div(ui.span(class_="spinner-border spinner-border-sm me-2", role="status"), working,
                      class_="alert alert-info", id=f"{tab}-working")
    if isinstance(result, str):
        return ui.div(f"Error: {result}", class_="alert alert-danger", role="alert", id=f"{tab}-error")
    return ui.div(*shown(result), class_="alert alert-success")


def _outcome(task: Any) -> Any:
    """A tab's outcome from its extended task (reactive on its status): None before it first ran, :data:`WORKING`
    while it runs (or was just cancelled for a newer run, :func:`_restart`), then :func:`model_job`'s result."""
    status = task.status()
    if status in ("running", "cancelled"):
        return WORKING
    if status == "success":
        return task.result()
    if status == "error":  # model_job turns every failure into a message; this is a safety net
        return f"unexpected error ({first_line(task.error.get())})"
    return None


def build_server(models_dir: Path, figures_dir: Path) -> Callable[..., None]:
    """The server function: one reactive graph per browser session."""
    from shiny import reactive, render, ui

    from cellkit import inference

    def server(input: Any, output: Any, session: Any) -> None:
        results = classifier_results(figures_dir, models_dir)
        by_name = {r.name: r for r in results}
        names = list(by_name)
        first, second = default_pair(results)
        ui.update_select("perf_pick", choices=names, selected=first or None)
        ui.update_select("cmp_a", choices=names, selected=first or None)
        ui.update_select("cmp_b", choices=names, selected=second or None)

        # --- Performance and Compare -------------------------------------------------------------------
        @render.table
        def perf_table():
            import pandas as pd

            if not results:
                return pd.DataFrame({"note": [f"no classifier results yet: run `make run` or `make models` "
                                              f"({NO_MODELS_HINT})"]})
            return pd.DataFrame([r.row() for r in results])

        def picked() -> ClassifierResult | None:
            return by_name.get(input.perf_pick())

        @render.table
        def perf_per_class():
            import pandas as pd

            result = picked()
            if result is None:
                return None
            table = pd.DataFrame(result.per_class()).T.rename_axis("class").reset_index().round(3)
            if "support" in table:
                table["support"] = table["support"].astype(int)
            return table

        @render.plot
        def perf_confusion():
            result = picked()
            if result is None:
                return None
            classes = result.report.get("class_names") or list(result.per_class())
            return fitted(plots.confusion_heatmap(result.report["confusion_matrix"], classes,
                                                  title=f"{result.name} ({result.part}, {result.profile})"))

        @render.plot
        def perf_curves():
            result = picked()
            if result is None or not result.history:
                return None
            return fitted(plots.learning_curves({result.name.split(": ")[-1]: result.history}))

        @render.table
        def perf_segmentation():
            import pandas as pd

            rows = segmentation_results(figures_dir, models_dir)
            return pd.DataFrame(rows) if rows else pd.DataFrame(
                {"note": ["no segmentation results yet: run notebook 07 or `make models`"]})

        def compared() -> list[ClassifierResult]:
            return [by_name[n] for n in (input.cmp_a(), input.cmp_b()) if n in by_name]

        @render.table
        def cmp_table():
            import pandas as pd

            return pd.DataFrame([r.row() for r in compared()]) if compared() else None

        @render.plot
        def cmp_bars():
            chosen = compared()
            if not chosen:
                return None
            table = per_class_f1(chosen)
            table.columns = [f"{'AB'[i]}: {name}" for i, name in enumerate(table.columns)]
            return fitted(plots.grouped_bars(table, title="per-class F1", ylabel="F1"))

        # --- Classify ----------------------------------------------------------------------------------
        @reactive.calc
        def cls_upload() -> Upload | str | None:
            return _take(input.cls_file())

        @reactive.extended_task
        async def cls_task(upload: Upload | str | None, entry: ModelEntry | str, transform: str) -> Any:
            return await model_job(upload, entry, lambda model, image: classify_image(model, image, transform))

        @reactive.effect
        def _classify() -> None:
            _restart(cls_task, cls_upload(), _chosen(input, "cls_model", models_dir), input.cls_transform())

        def cls_result() -> Any:
            return _outcome(cls_task)

        @render.ui
        def cls_status():
            def shown(result: Classification) -> list[Any]:
                name, p = result.best
                return [ui.h4(f"Predicted class: {name}", id="cls-class"),
                        ui.p(f"probability {p:.3f}; transformation: {result.transform}; "
                             f"{result.seconds * 1000:.0f} ms")]

            return _status(cls_result(), "Upload a cell image to classify it.", "cls", shown, "Classifying...")

        @render.plot
        def cls_input():
            result = cls_result()
            if not isinstance(result, Classification):
                return None
            size = result.prepared.shape[0]
            return fitted(image_panels([result.prepared, result.transformed],
                                       [f"model input ({size}x{size})", f"after {result.transform}"]))

        @render.plot
        def cls_bars():
            result = cls_result()
            return fitted(probability_bars(result.probabilities, "class probabilities")) \
                if isinstance(result, Classification) else None

        # --- Segment -----------------------------------------------------------------------------------
        @reactive.calc
        def seg_upload() -> Upload | str | None:
            return _take(input.seg_file())

        @reactive.extended_task
        async def seg_task(upload: Upload | str | None, entry: ModelEntry | str) -> Any:
            return await model_job(upload, entry, segment_image)

        @reactive.effect
        def _segment() -> None:
            _restart(seg_task, seg_upload(), _chosen(input, "seg_model", models_dir))

        def seg_result() -> Any:
            return _outcome(seg_task)

        @render.ui
        def seg_status():
            def shown(result: Segmentation) -> list[Any]:
                h, w = result.labels.shape
                mean = f"; mean area {result.areas.mean():.0f} px" if result.count else ""
                return [ui.h4(f"{result.count} nuclei", id="seg-count"),
                        ui.p(f"{w} x {h} pixels{mean}; {result.seconds:.1f} s")]

            return _status(seg_result(), "Upload a fluorescence image of nuclei to segment and count them.",
                           "seg", shown, "Segmenting... (a large image takes a while; the app stays usable)")

        @render.plot
        def seg_overlay():
            result = seg_result()
            return fitted(image_panels([result.overlay], [f"{result.count} nuclei"])) \
                if isinstance(result, Segmentation) else None

        @render.plot
        def seg_sizes():
            result = seg_result()
            if not isinstance(result, Segmentation) or result.count < 2:
                return None
            return fitted(plots.distribution(result.areas, xlabel="nucleus area (pixels)", title="nucleus sizes",
                                             bins=min(40, max(5, result.count // 2))))

        @render.ui
        def seg_download():
            return ui.download_button("seg_labels", "Download label mask (16-bit PNG)") \
                if isinstance(seg_result(), Segmentation) else None

        @render.download_button(filename="labels.png", media_type="image/png")
        async def seg_labels():
            result = seg_result()
            if isinstance(result, Segmentation):  # encoding 16 Mpx takes a second: not on the event loop
                yield await asyncio.to_thread(inference.encode_labels, result.labels)

        # a closed page's jobs still waiting for a worker are dropped
        session.on_ended(cls_task.cancel)
        session.on_ended(seg_task.cancel)

    return server


def _take(files: list[dict[str, Any]] | None) -> Upload | str | None:
    """The upload (the first of Shiny's file infos) read into memory, the one-line reason it was refused, or None
    before any upload. Called once per upload: the temporary copy is gone afterwards; decoding waits for a model
    worker (:meth:`Upload.image`)."""
    if not files:
        return None
    name = files[0].get("name", "the file")
    try:
        return Upload(name, take_upload(files[0]))
    except DataError as error:
        return f"{name}: {error}"
    except OSError as error:
        return f"{name}: could not read the upload ({error.strerror or error})"


def _chosen(input: Any, select_id: str, models_dir: Path) -> ModelEntry | str:
    """The model chosen in select ``select_id``, or a one-line message when there is none or it is gone."""
    what = "classifier" if select_id == "cls_model" else "U-Net"
    if select_id not in input:
        return f"no {what} found in {models_dir}: {NO_MODELS_HINT}"
    chosen = getattr(input, select_id)()
    entry = next((e for e in find_models(models_dir)[0] if str(e.path) == chosen), None)
    return entry if entry is not None else f"the model {Path(chosen).name} is gone; reload the page"


def _restart(task: Any, *args: Any) -> None:
    """Start ``task`` on new inputs, dropping a run of it on the old ones (its result would be stale)."""
    task.cancel()
    task.invoke(*args)
