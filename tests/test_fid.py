"""FID: the Frechet distance against closed forms and scipy, the Inception features (with random weights, as
the real ones cannot be downloaded here), the uint8 path of samples, every kind of source, and the CLI."""

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import threading
import warnings
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from test_condition_files import folder_config, make_folder
from test_unet import TINY, perturb
from threadpoolctl import threadpool_limits

import ddpm
from ddpm import fid
from ddpm.conditions import Conditions
from ddpm.config import Config, DataConfig, SampleConfig, build_model, load_config, save_config
from ddpm.data import build_dataset, collate_batch, superres_condition
from ddpm.fid import metric, sources
from ddpm.fid.__main__ import main as fid_main
from ddpm.inference import generate, save_images_to
from ddpm.io import EMA, NOISE_SCHEDULER, save_unet
from ddpm.models.unet import UNet
from ddpm.run_dir import TRAINER_STATE, checkpoint_path
from ddpm.schedule import NoiseScheduler

pytestmark = [  # tests use a handful of images
    pytest.mark.filterwarnings("ignore:FID statistics of only"),
    pytest.mark.filterwarnings("ignore:KID from subsets of"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Inception on a CPU shared with other jobs: two threads waiting on each other run ~8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception with random He-initialised convolutions, saved as a weights file.

    PyTorch's default initialisation shrinks the activations to ~1e-8 over the network's ~100 layers; He
    initialisation keeps the pool3 features of order 0.1, so that distances between them are meaningful.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url"),
    ):
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    # The keys of the real file, which has no num_batches_tracked (it was converted from TensorFlow).
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    for tensor in state.values():
        if tensor.ndim == 4:  # conv weights (out, in, kh, kw)
            fan_in = tensor[0].numel()
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2.0 / fan_in))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(state, path)
    return path


def random_uint8(n: int, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed)
    ).byte()


def features_of(images: torch.Tensor, weights: Path, **kwargs) -> np.ndarray:
    return fid.inception_features(images, weights=weights, device="cpu", progress=False, **kwargs)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook route, independent of ours: scipy's square root of the non-symmetric product."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


def few_sample_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of features (n1, D) and (n2, D) with n1, n2 < D, in closed form in sample space.

    With centred features A1, A2, S_i = A_i^T A_i / (n_i - 1), and the nonzero eigenvalues of S1 S2 are those
    of (A1 A2^T)(A1 A2^T)^T / ((n1 - 1)(n2 - 1)): Tr((S1 S2)^(1/2)) is the nuclear norm of A1 A2^T over
    sqrt((n1 - 1)(n2 - 1)), and Tr(S_i) = ||A_i||_F^2 / (n_i - 1).
    """
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    c1, c2 = len(f1) - 1, len(f2) - 1
    diff = f1.mean(0) - f2.mean(0)
    cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / math.sqrt(c1 * c2)
    return float(diff @ diff + (a1**2).sum() / c1 + (a2**2).sum() / c2 - 2 * cross)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- the Frechet distance -------------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_covariances_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_commuting_covariances_is_the_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # shared eigenvectors: S1 S2 = S2 S1
    a, b = rng.uniform(0.0, 2.0, size=8), rng.uniform(0.1, 2.0, size=8)
    a[:3] = 0.0  # a singular covariance too
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_agrees_with_scipy_sqrtm_and_is_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    s1, s2 = random_spd(32, rng), random_spd(32, rng)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-10)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-10
    )
    # Few samples in many dimensions, as FID on few images: both covariances singular.
    f1, f2 = rng.normal(size=(6, 40)), rng.normal(loc=0.3, size=(9, 40))
    stats1, stats2 = fid.statistics(f1), fid.statistics(f2)
    ours = fid.frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)
    assert ours == pytest.approx(scipy_frechet(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma), rel=1e-6)


def test_frechet_distance_of_identical_statistics_is_zero():
    stats = fid.statistics(np.random.default_rng(3).normal(size=(10, 256)))  # rank 9 of 256
    assert abs(fid.frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-9 * np.trace(
        stats.sigma
    )


def test_frechet_distance_rejects_statistics_of_different_dimensions():
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_statistics_are_the_mean_and_unbiased_covariance_and_warn_below_2048_images():
    features = np.random.default_rng(4).normal(size=(5, 3))
    with pytest.warns(UserWarning, match="only 5 images"):
        stats = fid.statistics(features)
    np.testing.assert_allclose(stats.mu, features.mean(0))
    centred = features - features.mean(0)
    np.testing.assert_allclose(stats.sigma, centred.T @ centred / 4)
    assert stats.n == 5
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.statistics(features[:1])


# --- images and features --------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_to_uint8_gives_the_pixels_save_image_writes(tmp_path, channels):
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(3, channels, 16, 16, generator=generator) * 3 - 1.5  # beyond [-1, 1] too
    x.view(-1)[:256] = (
        torch.arange(256) + 0.5
    ) / 127.5 - 1  # half-way between levels, where rounding rules differ
    x.view(-1)[256:258] = torch.tensor([-1.0, 1.0])
    paths = save_images_to(x, tmp_path)
    written = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths])
    assert torch.equal(fid.to_uint8(x).expand(-1, 3, -1, -1), written.permute(0, 3, 1, 2))


def test_inception_features_are_2048_wide_in_eval_mode_and_independent_of_the_batch(random_weights):
    images = random_uint8(3)
    gray = random_uint8(1, channels=1, seed=1)
    images[2] = gray[0].expand(3, -1, -1)
    features = features_of(images, random_weights, batch_size=3)
    assert features.shape == (3, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and features.std() > 1e-2
    network = metric._inception(random_weights, torch.device("cpu"))
    assert not any(module.training for module in network.modules())
    # Batch norm from running statistics and no dropout: an image alone gives what it gave among others.
    np.testing.assert_allclose(features_of(images[:1], random_weights), features[:1], rtol=1e-4, atol=1e-5)
    # A 1-channel image is its gray RGB; the images may come as an iterable of batches.
    np.testing.assert_allclose(features_of(iter([gray]), random_weights), features[2:], rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="to_uint8"):
        features_of(images.float(), random_weights)


@pytest.mark.parametrize("content", ["garbage", "pickled code"])
def test_a_weights_file_that_is_not_a_state_dict_is_refused_before_unpickling(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save(argparse.Namespace(payload="anything but tensors"), path)
    with pytest.raises(ValueError, match="cannot load") as error:
        features_of(random_uint8(1), path)
    assert "\n" not in str(error.value) and fid.WEIGHTS_URL in str(error.value)


def test_weights_default_to_the_file_torch_fidelity_downloads_where_it_downloads_it(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert fid.WEIGHTS_URL == URL_INCEPTION_V3
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # torch.hub.load_state_dict_from_url, which torch-fidelity calls, keeps it in $TORCH_HOME/hub/checkpoints
    expected = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert fid.default_weights() == expected


class FileServer:
    """Serves the files of `folder` on 127.0.0.1 from a thread, as a release page would."""

    def __init__(self, folder: Path):
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *args: None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_default_weights_are_downloaded_on_first_use_and_offline_the_error_says_where_to_put_them(
    tmp_path, random_weights, monkeypatch
):
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / fid.WEIGHTS_FILE).write_bytes(random_weights.read_bytes())
    server = FileServer(tmp_path / "release")
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metric, "WEIGHTS_URL", f"{server.url}/{fid.WEIGHTS_FILE}")
    try:
        path = fid.resolve_weights()
    finally:
        server.stop()
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    assert path.read_bytes() == random_weights.read_bytes()
    assert fid.resolve_weights() == path  # cached: the server is gone
    features = features_of(random_uint8(1), None)
    np.testing.assert_allclose(features, features_of(random_uint8(1), random_weights), rtol=1e-5)

    path.unlink()  # offline: the download fails, one line says where the file goes
    with pytest.raises(SystemExit) as stop:
        fid_main([str(tmp_path), str(tmp_path)])
    message = str(stop.value.code)
    assert (
        "\n" not in message and f"not found at {path}, and downloading {metric.WEIGHTS_URL} failed" in message
    )
    assert "put it there" in message


# --- sources --------------------------------------------------------------------------------------------


def write_pngs(folder: Path, images: torch.Tensor, mode: str = "RGB") -> list[Path]:
    """uint8 images (N, 3, H, W) as PNGs; mode L keeps channel 0."""
    folder.mkdir(parents=True)
    paths = []
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        paths.append(folder / f"{i}.png")
        Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(paths[-1])
    return paths


def test_cli_on_two_folders_prints_fid_kid_precision_and_recall_of_their_images(
    tmp_path, random_weights, capsys
):
    real_images, fake_images = random_uint8(6, seed=6), random_uint8(5, seed=7)
    write_pngs(tmp_path / "real" / "class_a", real_images)
    fake_paths = write_pngs(tmp_path / "fake", fake_images[:4])
    fake_paths += write_pngs(tmp_path / "fake" / "gray", fake_images[4:], mode="L")
    stats_file = tmp_path / "real.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the module-wide filter above would hide the CLI's warning
        fid_main(
            [str(tmp_path / "real"), str(tmp_path / "fake"), "--weights", str(random_weights)]
            + ["--batch-size", "2", "--device", "cpu", "--save-stats", str(stats_file)]
        )
    out, err = capsys.readouterr()
    printed = dict(line.split() for line in out.strip().splitlines())
    assert list(printed) == ["fid", "kid", "kid_std", "precision", "recall"]
    printed = {name: float(value) for name, value in printed.items()}
    assert math.isfinite(printed["fid"]) and printed["fid"] > 0
    assert "real: 6 images" in err and "fake: 5 images" in err and "fewer than 2048" in err
    assert "KID from subsets of 5 images" in err

    read = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in fake_paths])
    real_features = features_of(real_images, random_weights)
    fake_features = features_of(read.permute(0, 3, 1, 2), random_weights)
    assert printed["fid"] == pytest.approx(few_sample_frechet(real_features, fake_features), abs=1e-4)
    kid, kid_std = subset_kid(real_features.astype(np.float32), fake_features.astype(np.float32), size=5)
    assert printed["kid"] == pytest.approx(kid, rel=1e-4) and printed["kid_std"] == pytest.approx(
        kid_std, rel=1e-4
    )
    precision, recall = brute_force_precision_recall(real_features, fake_features)
    assert (printed["precision"], printed["recall"]) == pytest.approx((precision, recall), abs=1e-4)
    saved = fid.load_statistics(stats_file)
    assert saved.n == 6 and saved.features.shape == (6, 2048) and saved.features.dtype == np.float32
    np.testing.assert_allclose(saved.mu, real_features.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(saved.features, real_features, rtol=1e-6)


def test_missing_weights_stop_the_cli_with_one_line_naming_the_file_and_its_url(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(SystemExit) as stop:
        fid_main([str(tmp_path), str(tmp_path), "--weights", str(missing)])
    message = str(stop.value.code)
    assert "\n" not in message and str(missing) in message and fid.WEIGHTS_URL in message

    # A file named by the variable is never downloaded; in a fresh process: status 1, one line, no traceback.
    env = os.environ | {fid.WEIGHTS_ENV: str(missing)}
    done = subprocess.run(
        [sys.executable, "-m", "ddpm.fid", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert str(missing) in done.stderr and fid.WEIGHTS_URL in done.stderr


def test_without_torch_fidelity_ddpm_imports_and_the_fid_command_says_how_to_install_it(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['torch_fidelity'] = None  # as if not installed\n"
        "import ddpm, ddpm.training, ddpm.fid\n"
        "from ddpm.fid.__main__ import main\n"
        "main(['a', 'b'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    needed = "FID, KID and precision/recall need torch-fidelity, which is not installed"
    assert done.stderr == f"error: {needed}: {fid.FID_EXTRA}\n"
    assert fid.FID_EXTRA == 'pip install "ddpm[fid]"'


def test_training_with_fid_and_no_torch_fidelity_stops_before_training_naming_the_setting(monkeypatch):
    from ddpm.config import ConfigError, TrainConfig
    from ddpm.training.evaluation import Evaluation

    monkeypatch.setattr(metric, "FeatureExtractorInceptionV3", None)
    with pytest.raises(ConfigError, match=r'train.fid_every=5: .* pip install "ddpm\[fid\]"'):
        Evaluation(Config(train=TrainConfig(fid_every=5)), Path("unused"), accelerator=mock.Mock())


# --- KID and precision/recall, against independent computations ----------------------------------------


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 of two equal-size samples with the cubic polynomial kernel (x.y / D + 1)^3
    (Binkowski et al. 2018, Eq. 2 and the kernel of Sec. 4.1), written out with explicit off-diagonal sums."""
    m, d = len(x), x.shape[1]
    kernel = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    off = ~np.eye(m, dtype=bool)
    return float(kxx[off].sum() / (m * (m - 1)) + kyy[off].sum() / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def subset_kid(real: np.ndarray, fake: np.ndarray, size: int, subsets: int = 100) -> tuple[float, float]:
    """KID's mean and std over `subsets` draws of `size` images a side, drawn as torch-fidelity draws them
    (numpy RandomState(2020), the generated set first); the MMD itself is `mmd2_unbiased`."""
    rng = np.random.RandomState(2020)
    values = []
    for _ in range(subsets):
        fake_rows = rng.choice(len(fake), size, replace=False)
        real_rows = rng.choice(len(real), size, replace=False)
        values.append(mmd2_unbiased(fake[fake_rows].astype(np.float64), real[real_rows].astype(np.float64)))
    return float(np.mean(values)), float(np.std(values))


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, Eq. 1-3, image by image: a sample is in a set's manifold when it lies within
    the ball around some member reaching that member's k-th nearest other member."""

    def radii(points):  # distance of each point to its k-th nearest other point
        return np.array([sorted(np.linalg.norm(points - p, axis=1))[k] for p in points])

    def inside(samples, points):
        r = radii(points)
        return np.mean([any(np.linalg.norm(points - s, axis=1) <= r) for s in samples])

    return float(inside(fake, real)), float(inside(real, fake))


def test_kid_and_precision_recall_are_the_closed_forms_of_their_papers():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(12, 16))
    fake = rng.normal(loc=0.4, scale=0.8, size=(9, 16))
    real_stats, fake_stats = fid.statistics(real), fid.statistics(fake)
    with pytest.warns(UserWarning, match="KID from subsets of 9 images"):
        got = fid.compare(real_stats, fake_stats)
    assert got["fid"] == pytest.approx(
        fid.frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma)
    )
    kid, kid_std = subset_kid(real_stats.features, fake_stats.features, size=9)
    assert got["kid"] == pytest.approx(kid, rel=1e-9) and got["kid_std"] == pytest.approx(kid_std, rel=1e-9)
    assert kid_std > 0  # 9 of the 12 real images change from subset to subset
    precision, recall = brute_force_precision_recall(real_stats.features, fake_stats.features)
    assert (got["precision"], got["recall"]) == pytest.approx((precision, recall), abs=1e-6)  # float32 means
    assert 0 < precision < 1 and 0 < recall < 1  # the test can tell the two sets apart

    # Equal sizes: every subset is all the images, so KID is the MMD of the two sets and its std 0.
    same = fid.compare(fid.statistics(real[:9]), fake_stats)
    assert same["kid"] == pytest.approx(
        mmd2_unbiased(fake_stats.features.astype(np.float64), real[:9].astype(np.float32).astype(np.float64)),
        rel=1e-9,
    )
    assert same["kid_std"] == pytest.approx(0, abs=1e-12)


def test_statistics_without_features_give_fid_alone_and_too_few_images_no_precision_recall(tmp_path):
    rng = np.random.default_rng(10)
    real, fake = fid.statistics(rng.normal(size=(5, 4))), fid.statistics(rng.normal(size=(3, 4)))
    assert set(fid.compare(real, fake)) == {"fid", "kid", "kid_std"}  # precision/recall need 4 a side
    legacy = tmp_path / "legacy.npz"  # written before KID: no features
    np.savez(legacy, mu=real.mu, sigma=real.sigma, n=real.n, key="")
    assert fid.load_statistics(legacy).features is None
    assert set(fid.compare(fid.load_statistics(legacy), fake)) == {"fid"}


def test_weights_are_found_through_the_environment_variable(tmp_path, random_weights, monkeypatch):
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(random_weights))
    assert fid.resolve_weights() == random_weights
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(fid.WeightsNotFoundError, match="elsewhere.pth"):
        fid.resolve_weights()


def test_a_config_file_gives_the_statistics_of_its_whole_data_set_unflipped(tmp_path, random_weights):
    images = random_uint8(3, size=8, seed=8)
    write_pngs(tmp_path / "pngs", images, mode="L")
    data = DataConfig(dataset="folder", root=str(tmp_path / "pngs"), image_size=8, channels=1, labels=False)
    config_file = tmp_path / "data.yaml"
    save_config(Config(data=replace(data, hflip=True)), config_file)

    stats = fid.source_statistics(config_file, weights=random_weights, device="cpu", progress=False)
    expected = fid.statistics(features_of(images[:, :1], random_weights))  # the files' pixels, gray
    assert stats.n == 3
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-4, atol=1e-7)

    # Cached: read back without touching the data; a different data set is recomputed.
    cache = tmp_path / "cache" / "reference.npz"
    options = dict(weights=random_weights, device="cpu", progress=False)
    fid.reference_statistics(data, cache=cache, **options)
    with mock.patch("ddpm.fid.sources.build_dataset", side_effect=AssertionError("recomputed")):
        np.testing.assert_array_equal(fid.reference_statistics(data, cache=cache, **options).mu, stats.mu)
    with pytest.warns(UserWarning, match="other data or weights"):
        fid.reference_statistics(replace(data, image_size=4), cache=cache, **options)
    assert json.loads(str(np.load(cache)["key"]))["image_size"] == 4
    # Another split of the same data set is other data: the digits' held-out part after their training part.
    folder = build_dataset(data)
    with mock.patch("ddpm.fid.sources.build_dataset", return_value=folder) as built:
        digits_cache = cache.with_name("digits.npz")
        fid.reference_statistics(DataConfig(image_size=8), cache=digits_cache, **options)
        with pytest.warns(UserWarning, match="other data or weights"):
            fid.reference_statistics(DataConfig(image_size=8, split="test"), cache=digits_cache, **options)
    assert [call.args[0].split for call in built.call_args_list] == ["train", "test"]


def tiny_run(run: Path) -> tuple[UNet, NoiseScheduler, SampleConfig]:
    """A run directory as the trainer leaves it, holding one checkpoint of a tiny class-conditional UNet."""
    from test_sampling_paths import TINY

    torch.manual_seed(0)
    model = UNet(**{**TINY, "num_classes": 2})
    scheduler = NoiseScheduler(num_train_timesteps=50)
    sample = SampleConfig(sampler="ddim", steps=2, guidance_scale=1.5)
    save_config(
        Config(
            model=model.config,
            diffusion=scheduler.config,
            data=DataConfig(image_size=8),
            sample=sample,
            output_dir=str(run),
        ),
        run / "config.yaml",
    )
    checkpoint = checkpoint_path(run, 5)
    save_unet(checkpoint, model)
    save_unet(checkpoint / EMA, model)
    (checkpoint / NOISE_SCHEDULER).write_text(json.dumps(scheduler.config))
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": 5, "ema_updates": 5}))
    return model, scheduler, sample


def test_a_run_directory_is_sampled_with_its_settings_and_model_statistics_match(tmp_path, random_weights):
    model, scheduler, sample = tiny_run(tmp_path / "run")
    # batch_size 1 with 2 classes: chunks of 2 images, which must add up to one call of generate.
    stats = fid.source_statistics(
        tmp_path / "run", n=4, weights=random_weights, batch_size=1, device="cpu", seed=3, progress=False
    )
    images = generate(
        model, scheduler, 4, image_shape=(1, 8, 8), sampler="ddim", steps=2, guidance_scale=1.5, seed=3
    )
    expected = fid.statistics(features_of(fid.to_uint8(images), random_weights))
    assert stats.n == 4
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-4, atol=1e-6)

    model.train()
    again = fid.model_statistics(
        model, scheduler, 4, sampling=sample, weights=random_weights, seed=3, progress=False
    )
    value = fid.frechet_distance(expected.mu, expected.sigma, again.mu, again.sigma)
    assert abs(value) < 1e-6 * np.trace(expected.sigma)  # the same images: FID 0
    assert model.training  # handed back in the mode it came in


class ThreadedProcesses:
    """Stands in for an Accelerator of `world` processes, each a thread: `gather` exchanges tensors through
    a barrier and concatenates them in process order, as accelerate.Accelerator.gather does."""

    device = torch.device("cpu")

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world
        self.local = threading.local()

    def run(self, function) -> list:
        results = [None] * self.world

        def target(rank):
            self.local.rank = rank
            results[rank] = function()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results

    @property
    def process_index(self) -> int:
        return self.local.rank

    @property
    def num_processes(self) -> int:
        return self.world

    @property
    def is_main_process(self) -> bool:
        return self.local.rank == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = tensor
        self.barrier.wait()
        gathered = torch.cat(self.slots)
        self.barrier.wait()  # every process has read the slots before they are written again
        return gathered


def test_sharded_model_statistics_equal_the_single_process_ones(tmp_path, random_weights):
    model, scheduler, sample = tiny_run(tmp_path / "run")
    # 2 classes, batch_size 1: chunks of 2 images; n=7 gives 4 chunks (the last one partial) for 3 processes.
    options = dict(sampling=sample, weights=random_weights, batch_size=1, seed=3, progress=False)
    single = fid.model_statistics(model, scheduler, 7, **options)
    processes = ThreadedProcesses(3)
    sampled = []
    original = sources.generate

    def recording(model, scheduler, n, **kwargs):
        sampled.append((processes.process_index, kwargs["seed"], n))
        return original(model, scheduler, n, **kwargs)

    with mock.patch("ddpm.fid.sources.generate", recording):
        results = processes.run(
            lambda: fid.model_statistics(model, scheduler, 7, accelerator=processes, **options)
        )
    # Each process sampled its own chunks (seeds = the chunks' first image indices + 3), none twice.
    assert sorted(sampled) == [(0, 3, 2), (0, 9, 1), (1, 5, 2), (2, 7, 2)]
    assert results[1:] == [None, None]  # the statistics are the main process's
    assert results[0].n == single.n == 7
    np.testing.assert_array_equal(results[0].mu, single.mu)
    np.testing.assert_array_equal(results[0].sigma, single.sigma)


def test_sharded_reference_statistics_equal_the_single_process_ones(tmp_path, random_weights):
    write_pngs(tmp_path / "data", random_uint8(7, channels=1, size=8), mode="L")
    data = DataConfig(dataset="folder", root=str(tmp_path / "data"), image_size=8, labels=False)
    options = dict(weights=random_weights, batch_size=2, device="cpu", progress=False)
    single = fid.reference_statistics(data, **options)
    processes = ThreadedProcesses(3)
    cache = tmp_path / "reference.npz"
    with mock.patch("ddpm.fid.sources.inception_features", wraps=fid.inception_features) as embed:
        results = processes.run(
            lambda: fid.reference_statistics(data, cache=cache, accelerator=processes, **options)
        )
    assert sorted(call.kwargs["total"] for call in embed.call_args_list) == [2, 2, 3]  # 4 batches of 2 and 1
    assert results[1:] == [None, None]
    np.testing.assert_array_equal(results[0].mu, single.mu)
    np.testing.assert_array_equal(results[0].sigma, single.sigma)
    np.testing.assert_array_equal(
        fid.load_statistics(cache).mu, single.mu
    )  # written once, by the main process
    with mock.patch("ddpm.fid.sources.build_dataset", side_effect=AssertionError("recomputed")):
        results = processes.run(
            lambda: fid.reference_statistics(data, cache=cache, accelerator=processes, **options)
        )
    np.testing.assert_array_equal(results[0].mu, single.mu)


def fid_run_overrides(tmp_path: Path, random_weights: Path, tiny: str = "TINY") -> list[str]:
    """Overrides of configs/digits.yaml (with tiny="TINY_RUN": of configs/seed_digits.yaml) for a 2-step run
    with its FID at step 2, on 6 random 8x8 grayscale PNGs written to tmp_path/data (run directory:
    tmp_path/run)."""
    import test_train

    write_pngs(tmp_path / "data", random_uint8(6, channels=1, size=8), mode="L")
    return [
        *getattr(test_train, tiny),
        "data.dataset=folder",
        f"data.root={tmp_path / 'data'}",
        "data.labels=false",
        "data.batch_size=3",
        "model.num_classes=null",
        "train.steps=2",
        "train.sample_every=0",
        "train.fid_every=2",
        f"train.fid_weights={random_weights}",
        f"output_dir={tmp_path / 'run'}",
    ]


@pytest.mark.parametrize(("config", "tiny"), [("digits.yaml", "TINY"), ("seed_digits.yaml", "TINY_RUN")])
def test_training_logs_the_fid_of_its_ema_weights(tmp_path, random_weights, config, tiny):
    from accelerate.state import AcceleratorState

    from ddpm.training.trainer import Trainer

    overrides = [
        *fid_run_overrides(tmp_path, random_weights, tiny),
        "train.fid_n=4",
        "sample.guidance_scale=1",
    ]
    try:
        Trainer(load_config(Path(__file__).parents[1] / "configs" / config, overrides)).train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    fids = [r for r in records if "fid" in r]
    assert [r["step"] for r in fids] == [2] and np.isfinite(fids[0]["fid"]) and fids[0]["fid"] > 0
    assert set(fids[0]) == {"step", "fid", "kid", "kid_std", "precision", "recall"}
    assert fid.load_statistics(tmp_path / "run" / "fid_reference.npz").n == 6  # the whole data set


def test_two_processes_over_gloo_share_the_fid_and_log_what_one_process_computes(tmp_path, random_weights):
    from test_train import run_script

    from ddpm.inference import load_for_sampling
    from ddpm.run_dir import latest_checkpoint

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run = tmp_path / "run"
    overrides = [*fid_run_overrides(tmp_path, random_weights), "train.checkpoint_every=2", "train.fid_n=5"]
    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    result = run_script(
        str(Path(__file__).parents[1] / "train.py"), "--config", str(config), *overrides, cwd=tmp_path,
        launcher=launcher,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "fid" in r]
    # The EMA weights of the step-2 checkpoint made the logged FID: one process gets the same number.
    loaded = load_for_sampling(latest_checkpoint(run))
    model, scheduler = loaded.model, loaded.scheduler
    reference = fid.load_statistics(run / "fid_reference.npz")
    assert reference.n == 6
    sample = load_config(run / "config.yaml").sample
    stats = fid.model_statistics(model, scheduler, 5, sampling=sample, weights=random_weights)
    expected = fid.compare(reference, stats)
    assert record["step"] == 2 and record["fid"] == pytest.approx(expected["fid"], rel=1e-4)
    for name in ("kid", "kid_std", "precision", "recall"):  # from features gathered in the same order
        assert record[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-9), name


def test_model_statistics_sample_with_the_network_call_budget_of_the_section(tmp_path, random_weights):
    """A sample: section with calls set (which replace its steps) is sampled with those calls."""
    model, scheduler, _ = tiny_run(tmp_path / "run")
    sampling = SampleConfig(sampler="heun", steps=40, calls=5, guidance_scale=1.5)
    stats = fid.model_statistics(
        model, scheduler, 4, sampling=sampling, weights=random_weights, progress=False
    )
    images = generate(
        model, scheduler, 4, image_shape=(1, 8, 8), sampler="heun", calls=5, guidance_scale=1.5, seed=0
    )
    expected = fid.statistics(features_of(fid.to_uint8(images), random_weights))
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-4, atol=1e-6)


def test_a_superres_model_is_sampled_on_the_low_resolution_versions_of_the_reference_images(
    tmp_path, random_weights, capsys
):
    """A model conditioned on more than labels draws image i from the conditions of reference item i (cycled):
    the reference config's images, area-downsampled by the factor saved with the weights; without a data set
    to take them from it is refused, saying how to give one."""
    torch.manual_seed(0)
    model = perturb(UNet(**{**TINY, "in_channels": 1, "out_channels": 1, "cond_channels": 1})).eval()
    scheduler = NoiseScheduler(num_train_timesteps=50)
    ddpm.save_pretrained(
        tmp_path / "model", model, scheduler, task={"task": "superres", "superres_factor": 4}
    )
    images = random_uint8(2, size=8, seed=8)
    write_pngs(tmp_path / "pngs", images, mode="L")
    data = DataConfig(dataset="folder", root=str(tmp_path / "pngs"), image_size=8, channels=1, labels=False)
    save_config(Config(data=data), tmp_path / "data.yaml")
    options = dict(n=3, weights=random_weights, batch_size=2, device="cpu", seed=1, progress=False)
    stats = fid.source_statistics(tmp_path / "model", data=data, **options)
    pixels = torch.stack([build_dataset(data)[i][0] for i in (0, 1, 0)])  # item i mod 2
    cond = Conditions({"image": superres_condition(pixels, 4)})
    expected = generate(
        model, scheduler, 3, image_shape=(1, 8, 8), cond=cond, seed=1, **SampleConfig().sampler_settings()
    )
    expected = fid.statistics(features_of(fid.to_uint8(expected), random_weights))
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-4, atol=1e-6)
    with pytest.raises(
        ValueError,
        match=r"conditioned on more than labels \(model\.cond_channels=1\): .*"
        r"python -m ddpm\.fid CONFIG\.yaml MODEL",
    ):
        fid.source_statistics(tmp_path / "model", **options)
    # The command line takes the conditions from the reference config REAL
    fid_main(
        [str(tmp_path / "data.yaml"), str(tmp_path / "model"), "--n", "3", "--seed", "1"]
        + ["--weights", str(random_weights), "--batch-size", "2", "--device", "cpu"]
    )
    assert capsys.readouterr().out.startswith("fid ")


def test_a_model_on_condition_files_is_scored_against_its_config_s_images_on_their_files(
    tmp_path, random_weights
):
    """A config whose folder has condition files beside its images: the reference is its images alone (the
    files checked against the config's model), and the model draws image i on item i's files."""
    make_folder(tmp_path / "data", n=3)
    config = folder_config(tmp_path / "data")
    save_config(config, tmp_path / "data.yaml")
    torch.manual_seed(0)
    model = perturb(build_model(config.model)).eval()
    scheduler = NoiseScheduler(num_train_timesteps=50)
    ddpm.save_pretrained(tmp_path / "model", model, scheduler)
    options = dict(n=2, weights=random_weights, batch_size=2, device="cpu", seed=0, progress=False)
    real, fake = fid.pair_statistics(tmp_path / "data.yaml", tmp_path / "model", **options)
    dataset = build_dataset(config.data, config.model)
    images, _, cond = collate_batch([dataset[i] for i in range(3)])
    expected = fid.statistics(features_of(fid.to_uint8(images), random_weights))
    np.testing.assert_allclose(real.mu, expected.mu, rtol=1e-4, atol=1e-6)
    drawn = generate(
        model,
        scheduler,
        2,
        image_shape=(1, 8, 8),
        cond=cond.rows([0, 1]),
        **SampleConfig().sampler_settings(),
    )
    expected = fid.statistics(features_of(fid.to_uint8(drawn), random_weights))
    np.testing.assert_allclose(fake.mu, expected.mu, rtol=1e-4, atol=1e-6)
