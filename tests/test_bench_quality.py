"""bench/quality.py's real-vs-real floor: computed with the sample count the scores use (n real digits
against the other 1,797 - n), and labelled from the sizes it was computed with."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run in bench/'s own environment (its modules import each other as top-level modules), as the scripts are.
FLOORS = """
import json, torch, kernel_distance, quality
features = torch.randn(1797, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
size = quality.floor_size(1797, 900)
floor = {
    "kid": kernel_distance.split_floor(features, size=size, splits=5),
    "frechet": quality._frechet_floor(features, size=size, splits=5),
}
try:
    kernel_distance.split_floor(features, size=1796)
    refused = ""
except ValueError as error:
    refused = str(error)
print(json.dumps({
    "size": size,
    "default": quality.floor_size(1797, None),
    "capped": quality.floor_size(1797, 5000),
    "sizes": {name: f["sizes"] for name, f in floor.items()},
    "kid_mean": floor["kid"]["mean"],
    "label": quality.floor_label(floor),
    "old_label": quality.floor_label({"kid": {"mean": 0.0}}),
    "refused": refused,
}))
"""


def test_the_floor_uses_the_scores_sample_count_and_says_so():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", FLOORS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # 900 samples are scored against all 1,797 digits: the floor sets 900 real digits against the other 897
    # (before: min(900, 1,797 // 2) = 898 against 899, labelled "900 against 897")
    assert result["size"] == 900
    assert result["sizes"] == {"kid": [900, 897], "frechet": [900, 897]}
    assert result["label"] == "900 real digits against the other 897"
    assert result["default"] == 898 and result["capped"] == 1795
    assert abs(result["kid_mean"]) < 0.01  # unbiased: about 0 between two sets of one distribution
    assert result["old_label"] == "real digits against the other real digits (sizes not recorded)"
    assert result["refused"] == "size must leave at least 2 rows on each side of 1797, got 1796"
