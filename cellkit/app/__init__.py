"""The interactive app (``cellkit app``, or ``shiny run cellkit.app:app``): a thin Shiny layer over the package.

Four tabs, for people who do not code:

- Performance: every classifier result recorded in ``figures/*/metrics.json`` (notebook runs) and in the
  ``models/*.json`` files beside trained models, overall and per class, with confusion matrices and learning
  curves, each row saying which profile and dataset produced it; U-Net scores likewise.
- Compare: two of those classifiers side by side, with per-class F1 bars.
- Classify: upload an image (PNG, JPEG, TIFF), choose a classifier and an input transformation (report 000's:
  none, normalisation, Gaussian blur, Canny, Sobel); see the model's input, the predicted class and the
  probabilities.
- Segment: upload a fluorescence image; see the nuclei found by a U-Net, their count and a size histogram;
  download the label mask (16-bit PNG).

Uploads are checked by content (PNG, JPEG and TIFF signatures), size (:data:`MAX_UPLOAD_BYTES`, also for request
bodies sent in chunks: :class:`UploadLimit`) and pixel count (:data:`MAX_PIXELS`) before decoding; they are decoded
in memory and Shiny's temporary copy is deleted at once. Models load with Keras' safe mode. Model work (loading,
classifying, segmenting) runs on a few worker threads (:class:`ModelJobs`), so that one large image does not stop
other visitors' pages. The server listens on 127.0.0.1 unless told otherwise, and answers only requests addressed
to the host names it serves (:func:`default_allowed_hosts`).

Modules: ``uploads`` (checks and decoding, the request-size limit), ``models`` (models on disk), ``recorded``
(recorded results), ``images`` (classify and segment one image), ``jobs`` (the worker threads), ``figures``,
``server`` (the page and its server), ``hosting`` (the ASGI app and uvicorn).

>>> serve(models_dir="models", host="127.0.0.1", port=8000)    # what `cellkit app` calls
"""

from __future__ import annotations

from cellkit.app.hosting import LOOPBACK_HOSTS, create_app, default_allowed_hosts, serve
from cellkit.app.images import INPUT_TRANSFORMS, Classification, Segmentation, classify_image, segment_image
from cellkit.app.jobs import MODEL_JOBS, Busy, ModelJobs, model_job
from cellkit.app.models import ModelEntry, find_models, load_model
from cellkit.app.recorded import ClassifierResult, classifier_results, segmentation_results
from cellkit.app.uploads import MAX_PIXELS, MAX_UPLOAD_BYTES, Upload, UploadLimit, read_upload

__all__ = [
    "INPUT_TRANSFORMS", "LOOPBACK_HOSTS", "MAX_PIXELS", "MAX_UPLOAD_BYTES", "MODEL_JOBS", "Busy", "Classification",
    "ClassifierResult", "ModelEntry", "ModelJobs", "Segmentation", "Upload", "UploadLimit", "classifier_results",
    "classify_image", "create_app", "default_allowed_hosts", "find_models", "load_model", "model_job", "read_upload",
    "segment_image", "segmentation_results", "serve",
]


def __getattr__(name: str):
    """``cellkit.app.app``, for ``shiny run cellkit.app:app``: the app on the project's models/ and figures/, built
    when asked for, not when the package is imported."""
    if name == "app":
        return create_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
