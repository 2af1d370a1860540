"""Frechet Inception Distance (FID; Heusel et al. 2017) between two sets of images, computed the way papers
report it, so that our numbers can be compared with published ones.

    python -m ddpm.fid REAL FAKE [--n 50000] [--weights FILE] [--batch-size 64] [--device cuda]
                                 [--seed 0] [--save-stats FILE]

REAL and FAKE are each one of:
  - a folder of images (searched recursively; all of one size);
  - a YAML config file: every image of the data set its `data:` section describes, without random flips;
  - a run directory or checkpoint folder: --n images sampled from the EMA weights of its latest checkpoint
    with the run's `sample:` settings (image i starts from noise seeded seed + i);
  - an .npz file of statistics, written by --save-stats (REAL's) or `save_statistics`.

The recipe, step by step:
  1. Images enter as uint8 RGB, the values a saved PNG holds: samples in [-1, 1] are quantised exactly as
     torchvision's `save_image` does (`to_uint8`); 1-channel images are repeated to 3 channels.
  2. torch-fidelity's `FeatureExtractorInceptionV3`, a port of the TensorFlow Inception graph of 2015-12-05
     that the original FID code uses, with its converted weights and in eval mode, resizes every image to
     299x299 with torch-fidelity's re-implementation of TensorFlow 1.x `tf.image.resize_bilinear`
     (bilinear, align_corners=False, no antialiasing) and returns the 2048 pool3 features of each image.
  3. The mean and covariance of the features over the whole set (`statistics`), and the Frechet distance
     between the two Gaussians they define (`frechet_distance`).

FID from fewer than 2,048 images (the feature dimension) is biased upwards, because the covariance is
rank-deficient: it is allowed, for quick checks, with a warning. Papers report FID of 50,000 generated images
against the training set.

The weights cannot be downloaded on the fly: they are read from --weights FILE, else $DDPM_FID_WEIGHTS,
else DEFAULT_WEIGHTS; `WEIGHTS_URL` is where to get them.
"""

# The metric in metric.py, the sources of images in sources.py, the command line in __main__.py.
from ddpm.fid.metric import (
    DEFAULT_WEIGHTS,
    FEATURE_DIM,
    WEIGHTS_ENV,
    WEIGHTS_URL,
    Statistics,
    WeightsNotFoundError,
    frechet_distance,
    inception_features,
    load_statistics,
    resolve_weights,
    save_statistics,
    statistics,
    to_uint8,
)
from ddpm.fid.sources import (
    SOURCES,
    fid,
    model_statistics,
    pair_statistics,
    reference_statistics,
    source_statistics,
)

__all__ = [
    "DEFAULT_WEIGHTS",
    "FEATURE_DIM",
    "SOURCES",
    "WEIGHTS_ENV",
    "WEIGHTS_URL",
    "Statistics",
    "WeightsNotFoundError",
    "fid",
    "frechet_distance",
    "inception_features",
    "load_statistics",
    "model_statistics",
    "pair_statistics",
    "reference_statistics",
    "resolve_weights",
    "save_statistics",
    "source_statistics",
    "statistics",
    "to_uint8",
]
