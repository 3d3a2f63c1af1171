"""One U-Net configuration: the architecture, the training recipe, and what prediction needs. It is saved inside the
model file and read back, so a trained U-Net carries everything ``cellkit segment`` uses.

>>> config = UNetConfig()                          # the default model of ``cellkit train unet`` and notebook 07
>>> config = UNetConfig(**REPORT003_UNET, epochs=5)
>>> UNetConfig.from_metadata(saving.read_metadata("models/unet.keras"))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cellkit import saving, segmentation, transforms
from cellkit.datasets import DataError

#: Layout of the metadata a U-Net is saved with. 1: the architecture and prediction fields only (models saved before
#: the configuration was one object); 2: every field of :class:`UNetConfig`.
METADATA_VERSION = 2

#: Output class names: one sigmoid output (report 003: nucleus vs background) or three softmax classes
#: (report 002: background, cell interior, cell edge).
UNET_CLASS_NAMES: dict[int, tuple[str, ...]] = {1: ("nucleus",), 3: segmentation.THREE_CLASSES}

#: Augmentations a U-Net recipe can name: "none", or a recipe of :data:`cellkit.transforms.RECIPES`, optionally
#: with "+rot90" (random quarter turns on top: nuclei have no "up").
UNET_AUGMENTATIONS = ("none", "report002", "report003", "report002+rot90", "report003+rot90")

#: How a training crop picks its image (:attr:`UNetConfig.crop_sampling`).
CROP_SAMPLINGS = ("image", "nuclei")


def unet_multiple(depth: int = 4) -> int:
    """Height and width a U-Net of ``depth`` poolings needs to be a multiple of: 2 ** depth (16 for 4)."""
    return 2 ** int(depth)


@dataclass
class UNetConfig:
    """A U-Net: its architecture, its training recipe and how it predicts. The defaults make the default model of
    ``cellkit train unet`` and notebook 07: report 002's 3-class U-Net with its input enhancement and augmentation,
    at a width a 2-core CPU trains in minutes (notebook 07 records its time and scores).

    Architecture (:func:`cellkit.unet.build_unet`)
        n_classes : 1 (sigmoid + binary focal loss, report 003) or 3 (softmax + weighted cross-entropy, report 002).
        channels : input channels of :func:`cellkit.segmentation.input_stack` (report 002: original, inverse, canny;
            ``local`` adds :func:`cellkit.segmentation.local_contrast`, cut from the whole image for each crop).
        base_filters, depth, dropout, batch_norm : report 003: 64 filters, depth 4, dropout 0.05, batch norm.
    Input
        normalise : percentiles (low, high) of the per-image normalisation.
        canny_thresholds : hysteresis thresholds (0..255) of the Canny channel.
        nucleus_diameter : median nucleus diameter in px to train and predict at: each training image is zoomed so
            that the median diameter of its reference nuclei becomes this, each image to predict by its estimated
            diameter (:meth:`cellkit.unet.TrainedUNet.scale`); DSB's nuclei range from 8 to 94 px, too wide a
            range for one network with a 128 px crop. None: images are used at their own scale.
    Training (:func:`cellkit.unet.fit_unet`)
        crop : side in pixels of the square training crops (report 002: 128 best, 256).
        batch_size : crops per step (report 002: 8 best; report 003: 4).
        steps_per_epoch, epochs : training length; every step draws fresh random crops.
        learning_rate : Adam's (peak) rate (reports: 2e-4).
        schedule : ``constant`` or ``cosine`` (one warm-up epoch from a tenth of the rate, then cosine decay to 0).
        augmentation : one of :data:`UNET_AUGMENTATIONS`, applied to each crop and its labels.
        foreground_fraction : share of crops placed on a random nucleus pixel (the rest uniformly).
        crop_sampling : how each crop picks its training image: ``image`` (uniformly) or ``nuclei`` (in proportion
            to the image's number of nuclei, :func:`cellkit.segmentation.nuclei_weights`: a few large, crowded
            images, such as DSB's tissue sections, then get the share of crops their share of nuclei asks for).
        class_weights : weights of background, cell, edge in the 3-class loss (1, 1, 1: unweighted).
        edge_width : width in pixels of the edge class (:func:`cellkit.segmentation.three_class_target`).
        focal_gamma, focal_alpha : the 1-class loss (report 003: 2 and 0.5).
        patience : epochs without a lower validation loss before stopping (0: train all epochs); the weights of
            the epoch with the lowest validation loss are kept either way.
        val_crops, val_crop_size : the fixed validation crops the validation loss is computed on.
    Prediction (:class:`cellkit.unet.TrainedUNet`)
        tile, overlap : tiled prediction of whole images (:func:`cellkit.segmentation.predict_tiled`), after the
            zoom.
        postprocess : keyword arguments of :func:`cellkit.segmentation.probs_to_instances`, chosen on validation
            by :func:`cellkit.unet.tune_postprocessing` when the model is trained ({}: that function's defaults).
        trained_on : a description of the training data, filled in by training.
    """

    n_classes: int = 3
    channels: tuple[str, ...] = segmentation.CHANNELS
    base_filters: int = 16
    depth: int = 4
    dropout: float = 0.05
    batch_norm: bool = True
    normalise: tuple[float, float] = segmentation.NORMALISE_PERCENTILES
    canny_thresholds: tuple[float, float] = transforms.CANNY_THRESHOLDS
    nucleus_diameter: float | None = 24.0
    crop: int = 128
    batch_size: int = 8
    steps_per_epoch: int = 100
    epochs: int = 40
    learning_rate: float = 2e-3
    schedule: str = "cosine"
    augmentation: str = "report002+rot90"
    foreground_fraction: float = 0.5
    crop_sampling: str = "nuclei"
    class_weights: tuple[float, ...] = (1.0, 1.0, 3.0)
    edge_width: int = 1
    focal_gamma: float = 2.0
    focal_alpha: float = 0.5
    patience: int = 0
    val_crops: int = 32
    val_crop_size: int = 256
    tile: int = 512
    overlap: int = 32
    postprocess: dict[str, Any] = field(default_factory=dict)
    trained_on: str = ""

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self.class_weights = tuple(float(w) for w in self.class_weights)
        self.normalise = tuple(float(p) for p in self.normalise)
        self.canny_thresholds = tuple(float(t) for t in self.canny_thresholds)
        self.postprocess = dict(self.postprocess)
        if self.n_classes not in (1, 3):
            raise ValueError(f"n_classes must be 1 (foreground) or 3 (background, cell, edge), got {self.n_classes}")
        unknown = [c for c in self.channels if c not in segmentation.INPUT_CHANNELS]
        if unknown or not self.channels:
            raise ValueError(f"channels must be a non-empty selection of {segmentation.INPUT_CHANNELS}, "
                             f"got {self.channels}")
        if self.augmentation not in UNET_AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augmentation!r}; use {', '.join(UNET_AUGMENTATIONS)}")
        if self.crop_sampling not in CROP_SAMPLINGS:
            raise ValueError(f"unknown crop_sampling {self.crop_sampling!r}; use {' or '.join(CROP_SAMPLINGS)}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; use constant or cosine")
        multiple = unet_multiple(self.depth)
        for name in ("crop", "val_crop_size", "tile"):
            if getattr(self, name) < multiple or getattr(self, name) % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} (2 ** depth), got "
                                 f"{getattr(self, name)}")
        if self.n_classes == 3 and len(self.class_weights) != 3:
            raise ValueError(f"class_weights needs 3 values (background, cell, edge), got {self.class_weights}")
        if self.nucleus_diameter is not None and not self.nucleus_diameter > 0:
            raise ValueError(f"nucleus_diameter must be > 0 px or None, got {self.nucleus_diameter}")
        if min(self.epochs, self.steps_per_epoch, self.batch_size, self.val_crops) < 1:
            raise ValueError("epochs, steps_per_epoch, batch_size and val_crops must be at least 1")

    @property
    def class_names(self) -> list[str]:
        return list(UNET_CLASS_NAMES[self.n_classes])

    @property
    def crops_seen(self) -> int:
        return self.epochs * self.steps_per_epoch * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def recipe_differences(self, other: UNetConfig) -> list[str]:
        """The fields in which ``other`` trains another network or trains it another way: every field but what
        training fills in afterwards (``postprocess``, chosen on validation, and ``trained_on``)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [key for key in mine if key not in _FILLED_BY_TRAINING and mine[key] != theirs[key]]

    def to_metadata(self) -> dict[str, Any]:
        """What is saved inside the model file (:func:`cellkit.saving.save_model`): every field, the kind, the
        layout version and the class names."""
        return {"kind": saving.UNET_KIND, "model": "unet", "format_version": METADATA_VERSION,
                **self.to_dict(), "class_names": self.class_names}

    @classmethod
    def from_metadata(cls, data: dict[str, Any], record: dict[str, Any] | None = None) -> UNetConfig:
        """The configuration saved inside a model file (:meth:`to_metadata`). Models saved before the configuration
        was one object (layout 1) held only the architecture and the prediction fields; their training fields are
        taken from the training ``record`` saved beside them when there is one (``unet_config``), else left at the
        defaults. A one-line DataError for a classifier or metadata that lacks a field it needs."""
        if data.get("kind") != saving.UNET_KIND:
            raise DataError("this model is not a U-Net (it is an image classifier); use `cellkit classify` with it")
        missing = {"n_classes", "channels", "base_filters"} - set(data)
        if missing:
            raise DataError(f"U-Net metadata lacks {', '.join(sorted(missing))}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if data.get("format_version", 1) < 2:
            training = dict((record or {}).get("unet_config", {}))
            if training:
                training.setdefault("crop_sampling", "image")  # records older than crop_sampling: picked uniformly
            values = {**{k: v for k, v in training.items() if k in known}, **_V1_DEFAULTS, **values}
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise DataError(f"U-Net metadata is not valid ({error}); retrain the model with `cellkit train unet`"
                            ) from None


#: Fields a trained model's configuration gets from its training, not from its recipe.
_FILLED_BY_TRAINING = ("postprocess", "trained_on")


#: Fields that layout-1 metadata may lack, with the values its readers assumed for them.
_V1_DEFAULTS = {"tile": 256, "nucleus_diameter": None}

#: Report 003's recipe, as stated (section 5.3.1): 1 sigmoid output, binary focal loss, 64 base filters, Adam
#: 2e-4, batch 4, rotation/shift/shear/flip augmentation with reflected fill. Its early stopping (patience 250 of
#: up to 3000 epochs on a GPU) is not affordable on a CPU; give ``epochs``.
REPORT003_UNET = {"n_classes": 1, "channels": ("original",), "base_filters": 64, "learning_rate": 2e-4,
                  "schedule": "constant", "batch_size": 4, "augmentation": "report003"}
#: Report 002's recipe: 3 classes, weighted cross-entropy, original/inverse/Canny input, stretch + crop 128 + flips
#: + noise, batch 8, Adam 2e-4 (its width and edge weight are not stated).
REPORT002_UNET = {"n_classes": 3, "channels": segmentation.CHANNELS, "learning_rate": 2e-4,
                  "schedule": "constant", "batch_size": 8, "crop": 128, "augmentation": "report002"}

#: ``cellkit train unet --profile``: overrides of :class:`UNetConfig` (``default`` is the config's defaults).
UNET_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "full": {"base_filters": 32, "epochs": 60},
}
