"""U-Net nucleus segmentation (reports 002 and 003): one configuration, the network, training, the trained model.

>>> from cellkit import datasets, unet
>>> split = datasets.dsb2018_split()
>>> train, val, test = (datasets.load_dsb2018(split[p]) for p in ("train", "val", "test"))
>>> run = unet.train_unet(train, val, test, epochs=5)       # UNetConfig() is the default model
>>> run.save("models/unet.keras")
>>> labels, probs = unet.load_unet("models/unet.keras").segment(image)

==========================  ==============================================================================
``unet/config.py``          :class:`UNetConfig`: architecture, training recipe and prediction settings in one
                            object, saved inside the model file; report 002's and 003's recipes; profiles
``unet/network.py``         :func:`build_unet`, its two losses, the prediction copy with batch norm folded
``unet/trained.py``         :class:`TrainedUNet` (any image in, instance labels out), :func:`save_unet`,
                            :func:`load_unet`
``unet/train.py``           random crops, :func:`fit_unet`, :func:`tune_postprocessing`, :func:`train_unet`,
                            :func:`evaluate_saved_unet`, :func:`saved_or_trained`, :func:`segmentation_throughput`
``unet/study.py``           variants of a recipe compared on validation: :class:`Variants` (each configuration
                            trained once), :class:`SeededVariants` (every variant with several seeds, intervals
                            over images), the ablation verdicts, score curves, the choice of a variant
==========================  ==============================================================================

The image-side work (input stack, tiling, instances) is :mod:`cellkit.segmentation`'s; segmenting folders of
files is :mod:`cellkit.inference`'s. Importing this package loads no TensorFlow: the training half
(``unet/train.py`` and ``unet/study.py``, whose names are listed in :data:`TRAINING` and :data:`STUDY`) is imported
on first use, so that reading a saved model's configuration, or rejecting a wrong file, stays fast.
"""

from cellkit.unet.config import (
    CROP_SAMPLINGS,
    REPORT002_UNET,
    REPORT003_UNET,
    UNET_AUGMENTATIONS,
    UNET_CLASS_NAMES,
    UNET_PROFILES,
    UNetConfig,
    unet_multiple,
)
from cellkit.unet.network import (
    binary_focal_loss,
    build_from_config,
    build_unet,
    unet_for_inference,
    unet_in_precision,
    weighted_categorical_crossentropy,
)
from cellkit.unet.trained import TrainedUNet, load_unet, read_unet_config, save_unet

#: Names of ``unet/train.py``, imported on first use (it builds on Keras classes).
TRAINING = (
    "POSTPROCESS_GRID", "POSTPROCESS_START", "CropBatches", "UNetFit", "UNetRun", "evaluate_saved_unet",
    "fit_unet", "instances_from", "predict_probabilities", "saved_or_trained", "segmentation_throughput",
    "train_unet", "tune_postprocessing", "unet_targets", "validation_crops", "zoomed_images",
)
#: Names of ``unet/study.py``, imported on first use (it imports the training half).
STUDY = ("SeededVariants", "Variants", "ablation_headline", "ablation_verdicts", "choose", "curve_table",
         "improvement_verdict")


def __getattr__(name: str):
    if name in TRAINING:
        from cellkit.unet import train

        return getattr(train, name)
    if name in STUDY:
        from cellkit.unet import study

        return getattr(study, name)
    raise AttributeError(f"module 'cellkit.unet' has no attribute {name!r}")

__all__ = [
    "CROP_SAMPLINGS",
    "POSTPROCESS_GRID",
    "POSTPROCESS_START",
    "REPORT002_UNET",
    "REPORT003_UNET",
    "SeededVariants",
    "UNET_AUGMENTATIONS",
    "UNET_CLASS_NAMES",
    "UNET_PROFILES",
    "CropBatches",
    "TrainedUNet",
    "UNetConfig",
    "UNetFit",
    "UNetRun",
    "Variants",
    "ablation_verdicts",
    "binary_focal_loss",
    "build_from_config",
    "build_unet",
    "choose",
    "curve_table",
    "evaluate_saved_unet",
    "fit_unet",
    "improvement_verdict",
    "instances_from",
    "load_unet",
    "predict_probabilities",
    "read_unet_config",
    "save_unet",
    "saved_or_trained",
    "segmentation_throughput",
    "train_unet",
    "tune_postprocessing",
    "unet_for_inference",
    "unet_in_precision",
    "unet_multiple",
    "unet_targets",
    "validation_crops",
    "weighted_categorical_crossentropy",
    "zoomed_images",
]
