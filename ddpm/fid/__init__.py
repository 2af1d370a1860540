"""Frechet Inception Distance (FID; Heusel et al. 2017) between two sets of images, computed the way papers
report it, so that our numbers can be compared with published ones; with the kernel Inception distance (KID;
Binkowski et al. 2018) and precision and recall (Kynkaanniemi et al. 2019) of the same features. Needs the
`fid` extra: pip install "ddpm[fid]" (torch-fidelity).

    python -m ddpm.fid REAL FAKE [--n 50000] [--weights FILE] [--batch-size 64] [--device cuda]
                                 [--seed 0] [--save-stats FILE]

REAL and FAKE are each one of:
  - a folder of images (searched recursively; all of one size);
  - a YAML config file: every image of the data set its `data:` section describes, without random flips;
  - a run directory or checkpoint folder: --n images sampled from the EMA weights of its latest checkpoint
    with the run's `sample:` settings (image i starts from noise seeded seed + i);
  - a model on the Hugging Face Hub (namespace/name[@revision]), sampled as a checkpoint is;
  - an .npz file of statistics, written by --save-stats (REAL's) or `save_statistics`.

It prints one `name value` line per metric: fid, kid, kid_std, precision, recall (the last four only where
both sides have features: an .npz written before KID holds statistics alone).

The recipe, step by step:
  1. Images enter as uint8 RGB, the values a saved PNG holds: samples in [-1, 1] are quantised exactly as
     torchvision's `save_image` does (`to_uint8`); 1-channel images are repeated to 3 channels.
  2. torch-fidelity's `FeatureExtractorInceptionV3`, a port of the TensorFlow Inception graph of 2015-12-05
     that the original FID code uses, with its converted weights and in eval mode, resizes every image to
     299x299 with torch-fidelity's re-implementation of TensorFlow 1.x `tf.image.resize_bilinear`
     (bilinear, align_corners=False, no antialiasing) and returns the 2048 pool3 features of each image.
  3. The mean and covariance of the features over the whole set (`statistics`), and the Frechet distance
     between the two Gaussians they define (`frechet_distance`).
  4. From the same features, with torch-fidelity's functions and defaults (`compare`): KID, the mean and
     standard deviation over 100 subsets of 1000 images a side of the unbiased MMD^2 with the kernel
     (x.y / 2048 + 1)^3; precision, the fraction of generated images within the ball of some real image
     reaching its 3rd nearest real neighbour, and recall, the same with the sets swapped.

FID from fewer than 2,048 images (the feature dimension) is biased upwards, because the covariance is
rank-deficient: it is allowed, for quick checks, with a warning. Papers report FID of 50,000 generated images
against the training set.

The weights are read from --weights FILE, else $DDPM_FID_WEIGHTS, else torch-fidelity's own download place
(`default_weights()`, in torch.hub's cache), where they are downloaded from `WEIGHTS_URL` on first use.
"""

# The metric in metric.py, the sources of images in sources.py, the command line in __main__.py.
from ddpm.fid.metric import (
    FEATURE_DIM,
    FID_EXTRA,
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    WEIGHTS_URL,
    MissingDependencyError,
    Statistics,
    WeightsNotFoundError,
    compare,
    default_weights,
    frechet_distance,
    inception_features,
    load_statistics,
    require_fidelity,
    resolve_weights,
    save_statistics,
    statistics,
)
from ddpm.fid.sources import (
    SOURCES,
    fid,
    model_statistics,
    pair_statistics,
    reference_statistics,
    source_statistics,
)
from ddpm.images import to_uint8

__all__ = [
    "FEATURE_DIM",
    "FID_EXTRA",
    "SOURCES",
    "WEIGHTS_ENV",
    "WEIGHTS_FILE",
    "WEIGHTS_URL",
    "MissingDependencyError",
    "Statistics",
    "WeightsNotFoundError",
    "compare",
    "default_weights",
    "fid",
    "frechet_distance",
    "inception_features",
    "load_statistics",
    "model_statistics",
    "pair_statistics",
    "reference_statistics",
    "require_fidelity",
    "resolve_weights",
    "save_statistics",
    "source_statistics",
    "statistics",
    "to_uint8",
]
