"""bench/superres.py without its classifier or the diffusion run: the per-pixel measures (MSE, PSNR, the
consistency of the output with its low-resolution input) on images whose answers are known, the regression
U-Net's training (the same network as the diffusion model's, fitting the images from their condition), and
--merge's mean and spread over the seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_train import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
# Run in bench/'s own environment (its modules import each other as top-level modules), as the scripts are.
CHECKS = """
import json, sys, torch
import torch.nn.functional as F
import superres
from ddpm.config import load_config
from ddpm.data import split_digits, superres_condition

torch.set_num_threads(1)
originals = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
low = F.avg_pool2d(originals, 4)
shifted = (originals + 0.01).clamp(max=1.0)
shifted[..., :4, :4] = originals[..., :4, :4] + 0.5 / 16  # the first 4x4 block 0.5 / 16 brighter
config = load_config(superres.CONFIG, json.loads(sys.argv[1]))
torch.manual_seed(0)
untrained = superres.build_model(config.model)
model = superres.train_regression(config, seed=0)
images = split_digits("train", 8)[0][:64].mul(2).sub(1)
condition = superres_condition(images, 4)
with torch.no_grad():
    errors = {
        name: F.mse_loss(superres.regress(m, condition), images).item()
        for name, m in (("untrained", untrained), ("trained", model))
    }
print(json.dumps({
    "same": superres.pixel_errors(originals, originals, low),
    "nearest": superres.pixel_errors(superres_condition(originals, 4), originals, low),
    "shifted": superres.pixel_errors(originals + 0.01, originals, low),
    "one_block": superres.pixel_errors(shifted, originals, low),
    "regression": errors,
    "parameters": [sum(p.numel() for p in m.parameters()) for m in (untrained, model)],
}))
"""


def run_bench(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    return subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def test_pixel_measures_and_the_regression_unet():
    overrides = [*TINY_RUN, "model.attention_resolutions=[4]", "train.steps=30", "train.warmup_steps=1"]
    done = run_bench("-c", CHECKS, json.dumps(overrides))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    same, nearest, shifted, block = out["same"], out["nearest"], out["shifted"], out["one_block"]
    assert same["mse"] == 0 and same["psnr"] == 100 and same["within_quantisation"] == 1
    # The condition itself, nearest-upsampled, downsamples back to its input exactly
    assert nearest["consistency_max"] < 1e-6 and nearest["within_quantisation"] == 1
    assert nearest["mse"] > 0
    # Every pixel 0.01 brighter: MSE 1e-4, PSNR 40 dB, every low-resolution pixel 0.01 away (> 1/255)
    assert abs(shifted["mse"] - 1e-4) < 1e-9 and abs(shifted["psnr"] - 40) < 1e-3
    assert abs(shifted["consistency_mean"] - 0.01) < 1e-6 and shifted["within_quantisation"] == 0
    # The first 4x4 block 0.5 / 16 brighter, the others at most 0.01 (less where clamped at 1): each image's
    # largest gap is that block's
    assert abs(block["consistency_max"] - 0.5 / 16) < 1e-6
    assert abs(block["consistency_max_mean"] - 0.5 / 16) < 1e-6
    # The regression U-Net is the diffusion model's network, and its training fits the images
    untrained, trained = out["parameters"]
    assert untrained == trained
    assert out["regression"]["trained"] < 0.5 * out["regression"]["untrained"]


def seed_file(tmp_path: Path, seed: int, value: float) -> Path:
    def measures(value: float) -> dict:
        return {m: value for m in MEASURES}

    floor = {"mean": 0.0, "std": 0.01, "abs_p95": 0.02, "sizes": [176, 1621]}
    times = {"cpu_s": 100.0, "wall_s": 200.0}
    payload = {
        "scorer": {
            "classifier_held_out_accuracy": 0.99,
            "floor": {"kid_conv": floor, "kid_hidden": floor},
            "originals": measures(0.0),
            "nearest": measures(0.7),
        },
        "bicubic": measures(0.5),
        "seeds": [
            {
                "seed": seed,
                "diffusion_train": times,
                "regression_train": times,
                "diffusion": measures(value),
                "regression": measures(2 * value),
            }
        ],
    }
    path = tmp_path / f"seed{seed}.json"
    path.write_text(json.dumps(payload))
    return path


MEASURES = (
    "accuracy",
    "kid_conv",
    "kid_hidden",
    "mse",
    "psnr",
    "consistency_max_mean",
    "consistency_max",
    "consistency_mean",
    "within_quantisation",
)


def test_merge_gives_each_methods_mean_and_spread_over_the_seeds(tmp_path):
    files = [str(seed_file(tmp_path, seed, value)) for seed, value in ((0, 0.1), (1, 0.3))]
    merged = tmp_path / "all.json"
    done = run_bench(str(ROOT / "bench" / "superres.py"), "--merge", *files, "--json", str(merged))
    assert done.returncode == 0, done.stderr
    result = json.loads(merged.read_text())
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    assert set(result["over_seeds"]["diffusion"]) == set(MEASURES)
    over = result["over_seeds"]
    diffusion, regression = over["diffusion"]["mse"], over["regression"]["mse"]
    assert abs(diffusion["mean"] - 0.2) < 1e-12 and abs(diffusion["std"] - 0.1414213562) < 1e-9
    assert abs(regression["mean"] - 0.4) < 1e-12
    assert result["bicubic"]["mse"] == 0.5
