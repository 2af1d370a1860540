"""bench/gpu.py, the one command that measures issue 27's GPU targets, runs end to end: on the CPU with
--smoke (toy sizes, no compilation), so that a lent GPU's minutes are not spent on a broken script. The
bench scripts import each other as top-level modules, hence the subprocess."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_every_part_and_writes_every_number(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    expected = [
        "peak",
        "eager",
        "compiled",
        "batch",
        "sampling",
        "syncfree",
        "trainer",
        "checkpointing",
        "peer_compiled",
    ]
    assert list(parts) == expected
    assert not [
        name for name, part in parts.items() if "error" in part or "skipped" in part and name != "syncfree"
    ]
    assert parts["syncfree"] == {"skipped": "no CUDA", "seconds": parts["syncfree"]["seconds"]}
    assert parts["peak"]["matmul_peak_flops"] > 0
    eager = parts["eager"]
    assert set(eager["images_per_s"]) == {"ours", "diffusers"} and len(eager["step_seconds"]["ours"]) == 2
    assert eager["mfu_percent"]["ours"] > 0 and eager["median_ratio_ours_over_diffusers"] > 0
    assert parts["compiled"]["best_mode"] == "default"
    sampling = parts["sampling"]
    assert sampling["pngs_written"] == sampling["n"] == 10 and sampling["seconds_to_sample"] > 0
    assert set(sampling["one_batch_images_per_s"]) == {"ours eager", "ours compiled", "diffusers eager"}
    assert set(parts["trainer"]["variants"]) == {"eager", "default"}
    assert all(v["images_per_s"] > 0 for v in parts["trainer"]["variants"].values())
    assert len(parts["checkpointing"]["variants"]) == 4  # off and on, at two batches
    rows = result["summary"]["rows"]
    assert rows[0][0] == "training, batch 4: images/s, ours compiled (default) / diffusers eager bf16 >= 2"
    assert "| target |" in done.stdout
