"""The GPU at its limit (issue 27), in one command: training and sampling throughput of DDPM's CIFAR-10
network (`configs/cifar10.yaml`, 35.7M parameters) against diffusers' UNet2DModel with the same layers
(`common.build_models`), measured side by side in one run, and the check that no step waits for the host.

    python bench/gpu.py --out $OUT/gpu.json [--parts peak,eager,...] [--budget-s 450] [--smoke]

Parts, in this order (a part starts only while the elapsed time is under --budget-s, so that the command
ends inside a lease; --out is rewritten after every part, so a run cut short keeps what it measured):

1. peak: the bf16 matrix-product peak of this GPU, 8192^3 products on random data, the fastest of 10
   (`common.matmul_peak_flops`): what MFU divides by.
2. eager: one training step (forward, MSE, backward, fused AdamW, zero_grad; `train_step.training_step`) at
   batch 128 under bf16 autocast with channels_last, ours and diffusers', in interleaved rounds: images/s,
   the per-round ratio, MFU (the step's FLOPs by torch's FlopCounterMode over the median time).
3. compiled: ours compiled in each --modes (torch.compile, static shapes), interleaved with diffusers' eager
   step (the target's ratio, from the same rounds); the seconds of the first two steps (compilation) apart.
   The fastest mode is "best" below.
4. batch: ours compiled in the best mode at each --batches: images/s and MFU, for README's recommended batch.
5. sampling: 50,000 images of 32x32 with UniPC at 20 network calls through `ddpm.inference.generate`, as
   `sample.py --n 50000 --save-images` runs it (--batch-size auto, the network compiled at that batch with
   CUDA graphs, every PNG written on threads as its batch comes): the seconds, with the compilation timed
   apart (a warm-up batch). Then one batch of that size: ours eager, ours compiled, and diffusers' network
   in diffusers' own UniPC loop (UniPCMultistepScheduler, trailing timesteps on both sides), eager.
6. syncfree: tests/test_gpu.py's sync checks (training steps, eager and compiled with CUDA graphs, and
   every sampler, under torch.cuda.set_sync_debug_mode("error")): its pytest outcome.
7. trainer: the Trainer's own step (`Trainer._step`: the loader, the schedule, the loss, clipping, fused
   AdamW, the EMA) with the CIFAR-10 network at batch 128, on the digits at 32x32x3 (held in memory, so the
   data costs what CIFAR-10's would), train.compile false and true in the best mode: images/s, MFU.
8. checkpointing: ours with gradient_checkpointing off and on, eager bf16, at batch 128 and the largest of
   --batches: images/s and peak step memory (`train_step.step_memory_mib`).
9. peer_compiled: diffusers' training step compiled in the best mode (its own best, for the record).

About 8 minutes on an H100 (most of it compilation); what the budget leaves out can run in a second call
with --parts.

cudnn.benchmark is on for both libraries (shapes are fixed). With --smoke (CPU) every part runs at toy
sizes, torch.compile left out, so that tests/test_bench_gpu.py proves the script runs end to end; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch
import train_step
from accelerate.state import AcceleratorState
from common import MODELS
from diffusers import UniPCMultistepScheduler

from ddpm import NoiseScheduler, load_config
from ddpm.compiled import COMPILE_MODES, FixedBatchNetwork, auto_batch_size
from ddpm.images import PngWriter
from ddpm.inference import generate
from ddpm.training import Trainer

PARTS = (
    "peak",
    "eager",
    "compiled",
    "batch",
    "sampling",
    "syncfree",
    "trainer",
    "checkpointing",
    "peer_compiled",
)
SMOKE_MODEL = {  # a toy network with every kind of block of the CIFAR-10 one
    "in_channels": 3,
    "out_channels": 3,
    "base_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [4],
    "image_size": 8,
    "norm_groups": 4,
    "dropout": 0.1,
}


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: bench/gpu.py measures a GPU and none is visible; on the CPU pass --smoke")
    if args.smoke:
        smoke_sizes(args)
    torch.backends.cudnn.benchmark = True
    config = load_config(args.config)
    model_config = SMOKE_MODEL if args.smoke else config.model
    bench = Bench(args, device, model_config, config.diffusion)
    bench.run()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="the JSON file every number goes to")
    parser.add_argument(
        "--config", default=str(common.REPO / "configs/cifar10.yaml"), help="YAML with model: and diffusion:"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=450, help="start no part after this many seconds")
    parser.add_argument(
        "--modes",
        default="default,reduce-overhead",
        help=f"torch.compile modes to measure, of {', '.join(COMPILE_MODES)} (default: %(default)s)",
    )
    parser.add_argument("--batch", type=int, default=128, help="training batch (default: 128, the paper's)")
    parser.add_argument("--batches", default="512", help="more training batches for MFU (part batch)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per measurement (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--n", type=int, default=50_000, help="images sampled (default: 50,000)")
    parser.add_argument("--calls", type=int, default=20, help="UniPC network calls per image (default: 20)")
    parser.add_argument("--trainer-steps", type=int, default=30, help="timed Trainer steps (default: 30)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: a test of the script")
    args = parser.parse_args()
    args.parts = [p for p in args.parts.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    unknown = [p for p in args.parts if p not in PARTS] + [m for m in args.modes if m not in COMPILE_MODES]
    if unknown:
        parser.error(f"unknown parts or modes: {', '.join(unknown)}")
    return args


def smoke_sizes(args: argparse.Namespace) -> None:
    """--smoke: toy sizes, and torch.compile a no-op (the script's paths without minutes of tracing on 2
    cores; tests/test_compiled.py tests what compiling does)."""
    args.batch, args.batches, args.repeats, args.warmup = 4, [6], 2, 1
    args.n, args.calls, args.trainer_steps, args.modes = 10, 2, 2, ["default"]
    torch.set_num_threads(1)  # toy operations: a second thread only waits (for long on a loaded machine)

    def no_compile(model, *, mode=None, dynamic=None, **kwargs):
        return model

    torch.compile = no_compile


class Bench:
    """The parts of the run (methods named after PARTS), the results they write, and the time budget."""

    def __init__(self, args, device: torch.device, model_config: dict, diffusion: dict):
        self.args, self.device, self.model_config, self.diffusion = args, device, model_config, diffusion
        self.start = time.perf_counter()
        self.results: dict = {
            "benchmark": "gpu",
            "environment": common.environment(device),
            "options": {k: v for k, v in vars(args).items()},
            "parts": {},
        }
        self.best_mode = args.modes[0] if args.modes else "default"
        self.models = common.build_models(model_config)
        shape = common.unet_config(model_config)
        self.image_shape = (shape["in_channels"], shape["image_size"], shape["image_size"])

    def run(self) -> None:
        for part in self.args.parts:
            elapsed = time.perf_counter() - self.start
            if elapsed > self.args.budget_s:
                self.results["parts"][part] = {"skipped": f"budget: {elapsed:.0f} s > {self.args.budget_s} s"}
                continue
            print(f"[{elapsed:6.1f} s] {part}", flush=True)
            began = time.perf_counter()
            try:
                self.results["parts"][part] = {
                    **getattr(self, part)(),
                    "seconds": time.perf_counter() - began,
                }
            except Exception as error:  # one part's failure must not lose the others' measurements
                self.results["parts"][part] = {"error": f"{type(error).__name__}: {error}"}
                print(f"  {part} failed: {type(error).__name__}: {error}", flush=True)
            torch._dynamo.reset()
            self.write()
        self.results["summary"] = self.summary()
        self.write()
        print(common.markdown_table(["target", "measured", "met"], self.results["summary"]["rows"]))

    def write(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.start
        common.write_json(self.args.out, self.results)

    # --- the parts ----------------------------------------------------------------------------------------

    def peak(self) -> dict:
        dtype = torch.float32 if self.args.smoke else torch.bfloat16
        size = 512 if self.args.smoke else 8192
        return {"matmul_peak_flops": common.matmul_peak_flops(self.device, dtype, size=size, repeats=10)}

    def eager(self) -> dict:
        steps = {n: self.step(n) for n in MODELS}
        return self.timed(steps, self.args.batch)

    def compiled(self) -> dict:
        results, rates = {}, {}
        for mode in self.args.modes:
            torch._dynamo.reset()
            ours = self.step("ours", mode=mode)
            compile_s = self.first_calls(ours)
            timed = self.timed({"ours": ours, "diffusers": self.step("diffusers")}, self.args.batch, warmup=1)
            results[mode] = {**timed, "compile_seconds": compile_s}
            rates[mode] = timed["images_per_s"]["ours"]
        self.best_mode = max(rates, key=rates.get)
        return {"modes": results, "best_mode": self.best_mode}

    def sampling(self) -> dict:
        model = self.models["ours"].to(self.device, memory_format=torch.channels_last).eval()
        with torch.no_grad():  # no zero-initialised layer: time real arithmetic, not zeros
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        scheduler = NoiseScheduler(**{**self.diffusion, "timestep_spacing": "trailing"})
        common.check_same_schedule(scheduler, self.diffusers_unipc(scheduler))
        settings = dict(
            image_shape=self.image_shape, sampler="unipc", calls=self.args.calls, device=self.device
        )
        with self.autocast():
            batch = auto_batch_size(model, self.image_shape, self.args.n, device=self.device)
            # What generate(compiled=True) builds, made here once so that every run below reuses its graph.
            network = FixedBatchNetwork(model, batch)
            began = time.perf_counter()
            generate(network, scheduler, batch, batch_size=batch, compiled=False, **settings)  # compiles
            first_batch_s = time.perf_counter() - began
            times = []
            with tempfile.TemporaryDirectory() as folder, PngWriter(folder) as writer:
                began = time.perf_counter()

                def on_batch(images, start):
                    writer.write(images, start)
                    times.append(time.perf_counter() - began)

                generate(
                    network,
                    scheduler,
                    self.args.n,
                    batch_size=batch,
                    compiled=False,
                    on_batch=on_batch,
                    **settings,
                )
                sampled_s = time.perf_counter() - began
                writer.close()
                written_s = time.perf_counter() - began
                files = len(list(Path(folder).glob("*.png")))
            one = {
                "ours eager": lambda: generate(
                    model, scheduler, batch, batch_size=batch, compiled=False, **settings
                ),
                "ours compiled": lambda: generate(
                    network, scheduler, batch, batch_size=batch, compiled=False, **settings
                ),
                "diffusers eager": functools.partial(self.diffusers_sampling, scheduler, batch),
            }
            batch_times = common.interleaved_times(one, repeats=1, warmup=1, device=self.device)
        one_batch = {k: statistics.median(v) for k, v in batch_times.items()}
        x, t, y = (v[:1].to(self.device) if v is not None else None for v in self.inputs(1))
        with self.autocast():
            flops = common.forward_flops(model, x, t, y) * self.args.n * self.args.calls
        peak = self.results["parts"].get("peak", {}).get("matmul_peak_flops")
        return {
            "mfu_percent_while_sampling": 100 * flops / sampled_s / peak if peak else None,
            "batch_size": batch,
            "n": self.args.n,
            "calls": self.args.calls,
            "first_batch_seconds": first_batch_s,
            "compile_seconds": first_batch_s - one_batch["ours compiled"],
            "seconds_to_sample": sampled_s,
            "seconds_with_every_png_written": written_s,
            "pngs_written": files,
            "batch_done_at_s": times,
            "one_batch_seconds": one_batch,
            "one_batch_images_per_s": {k: batch / v for k, v in one_batch.items()},
        }

    def trainer(self) -> dict:
        results = {}
        variants = {
            "eager": ["train.compile=false"],
            self.best_mode: ["train.compile=true", f"train.compile_mode={self.best_mode}"],
        }
        for name, overrides in variants.items():
            torch._dynamo.reset()
            with tempfile.TemporaryDirectory() as run:
                trainer = Trainer(self.trainer_config(run, overrides))
                try:
                    results[name] = self.time_trainer(trainer)
                finally:
                    del trainer
                    AcceleratorState._reset_state(reset_partial_state=True)
        return {"variants": results}

    def syncfree(self) -> dict:
        if self.device.type != "cuda":
            return {"skipped": "no CUDA"}
        test = common.REPO / "tests" / "test_gpu.py"
        done = subprocess.run(  # the sync checks; the file's other tests (compiled networks) take longer
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-k",
                "wait_for_nothing",
                str(test),
            ],
            capture_output=True,
            text=True,
            cwd=common.REPO,
        )
        return {"returncode": done.returncode, "passed": done.returncode == 0, "output": done.stdout[-4000:]}

    def batch(self) -> dict:
        results = {}
        for batch in self.args.batches:
            torch._dynamo.reset()
            ours = self.step("ours", mode=self.best_mode, batch=batch)
            self.first_calls(ours)
            results[batch] = self.timed({"ours": ours}, batch, warmup=1)
        return {"mode": self.best_mode, "batches": results}

    def checkpointing(self) -> dict:
        results = {}
        for batch in sorted({self.args.batch, max(self.args.batches, default=self.args.batch)}):
            for on in (False, True):
                model = common.build_model("ours", {**self.model_config, "gradient_checkpointing": on})
                step = self.step("ours", batch=batch, model=model)
                timed = self.timed({"ours": step}, batch)
                memory = None  # the CPU's (a process per model) is bench/train_step.py's to measure
                if self.device.type == "cuda":
                    memory = train_step.step_memory_mib("ours", step, self.namespace(), self.device)
                results[f"batch {batch}, checkpointing {'on' if on else 'off'}"] = {
                    **timed,
                    "peak_step_memory_mib": memory,
                }
                del model, step
        return {"variants": results}

    def peer_compiled(self) -> dict:
        diffusers = self.step("diffusers", mode=self.best_mode)
        compile_s = self.first_calls(diffusers)
        timed = self.timed({"diffusers": diffusers}, self.args.batch, warmup=1)
        return {"mode": self.best_mode, **timed, "compile_seconds": compile_s}

    # --- helpers ------------------------------------------------------------------------------------------

    def namespace(self, mode: str | None = None) -> argparse.Namespace:
        """train_step.training_step's options: bf16 (on the GPU), channels_last, fused AdamW, compile mode."""
        gpu = self.device.type == "cuda"
        return argparse.Namespace(
            bf16=gpu,
            channels_last=True,
            fused_adam=gpu,
            compile=mode is not None,
            compile_mode=mode or "default",
        )

    def step(self, name: str, *, mode: str | None = None, batch: int | None = None, model=None) -> Callable:
        """One training step of `name` (its model, or `model`) at `batch` (default --batch)."""
        inputs = self.inputs(batch or self.args.batch)
        noise = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
        model = model if model is not None else self.models[name]
        return train_step.training_step(model, (*inputs, noise), self.namespace(mode), self.device)

    def first_calls(self, step: Callable) -> float:
        """Seconds of the first two calls of a compiled step: tracing, compilation, CUDA graph capture."""
        common.synchronize(self.device)
        began = time.perf_counter()
        for _ in range(2):
            step()
        common.synchronize(self.device)
        return time.perf_counter() - began

    def timed(self, steps: dict[str, Callable], batch: int, *, warmup: int | None = None) -> dict:
        """Interleaved rounds of `steps`: median seconds, images/s, achieved FLOP/s and MFU of each, and the
        median per-round ratio ours / diffusers when both ran."""
        warmup = self.args.warmup if warmup is None else warmup
        times = common.interleaved_times(steps, repeats=self.args.repeats, warmup=warmup, device=self.device)
        median = {n: statistics.median(t) for n, t in times.items()}
        flops = self.flops_per_image * batch
        result = {
            "batch": batch,
            "step_seconds": times,
            "median_step_seconds": median,
            "images_per_s": {n: batch / m for n, m in median.items()},
            "tflops": {n: flops / m / 1e12 for n, m in median.items()},
        }
        peak = self.results["parts"].get("peak", {}).get("matmul_peak_flops")
        if peak:
            result["mfu_percent"] = {n: 100 * flops / m / peak for n, m in median.items()}
        if set(times) == set(MODELS):
            result["median_ratio_ours_over_diffusers"] = common.median_ratio(
                times["ours"], times["diffusers"]
            )
        return result

    @functools.cached_property
    def flops_per_image(self) -> float:
        """Forward + backward FLOPs of one image, the same on both sides (their parameter counts match)."""
        x, t, y = (v[:1].to(self.device) if v is not None else None for v in self.inputs(1))
        model = self.models["ours"].to(self.device)
        with self.autocast():
            return common.training_flops(model, x, t, y)

    def inputs(self, batch: int) -> tuple:
        """Random network inputs x, t, y (y None for an unconditional network) on the CPU."""
        return common.random_inputs(self.model_config, batch)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def diffusers_unipc(self, scheduler: NoiseScheduler) -> UniPCMultistepScheduler:
        c = scheduler.config
        return UniPCMultistepScheduler(
            num_train_timesteps=c["num_train_timesteps"],
            beta_schedule=c["beta_schedule"],
            beta_start=c["beta_start"],
            beta_end=c["beta_end"],
            prediction_type=c["prediction_type"],
            timestep_spacing="trailing",
        )

    @torch.no_grad()
    def diffusers_sampling(self, scheduler: NoiseScheduler, batch: int) -> torch.Tensor:
        """`batch` images with diffusers' UNet2DModel in diffusers' own UniPC loop, --calls steps, eager."""
        unet = self.models["diffusers"].unet.to(self.device, memory_format=torch.channels_last).eval()
        unipc = self.diffusers_unipc(scheduler)
        unipc.set_timesteps(self.args.calls, device=self.device)
        x = torch.randn((batch, *self.image_shape), device=self.device)
        for t in unipc.timesteps:
            x = unipc.step(unet(x, t).sample, t, x).prev_sample
        return x

    def trainer_config(self, run: str, overrides: list[str]):
        """The CIFAR-10 recipe at --batch on the digits at 32x32x3 (in memory), logging and saving off."""
        model = [f"model.{k}={json.dumps(v)}" for k, v in self.model_config.items()]
        size = self.image_shape[1]
        return load_config(
            self.args.config,
            [
                *model,
                "data.dataset=digits",
                "data.root=null",
                f"data.image_size={size}",
                f"data.channels={self.image_shape[0]}",
                f"data.batch_size={self.args.batch}",
                "data.num_workers=0",
                f"train.cpu_threads={torch.get_num_threads()}",
                "train.log_with=none",
                "train.sample_every=0",
                "train.checkpoint_every=1000000",
                "train.log_every=1000000",
                "train.steps=1000000",
                f"output_dir={run}",
                *overrides,
            ],
        )

    def time_trainer(self, trainer: Trainer) -> dict:
        batches = trainer._batches()
        began = time.perf_counter()
        for _ in range(self.args.warmup):
            trainer._step(*next(batches))
        common.synchronize(self.device)
        warmup_s = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(self.args.trainer_steps):
            trainer._step(*next(batches))
        common.synchronize(self.device)
        seconds = time.perf_counter() - began
        loss = trainer.losses.total.item() / max(trainer.state.step, 1)
        rate = self.args.batch * self.args.trainer_steps / seconds
        result = {"warmup_seconds": warmup_s, "seconds": seconds, "images_per_s": rate, "mean_loss": loss}
        peak = self.results["parts"].get("peak", {}).get("matmul_peak_flops")
        if peak:
            result["mfu_percent"] = 100 * self.flops_per_image * rate / peak
        return result

    # --- the summary --------------------------------------------------------------------------------------

    def summary(self) -> dict:
        parts, rows = self.results["parts"], []
        eager, compiled = parts.get("eager", {}), parts.get("compiled", {})
        best = compiled.get("modes", {}).get(compiled.get("best_mode"), {})
        target = (
            f"training, batch {self.args.batch}: images/s, ours compiled ({compiled.get('best_mode')}) / "
        )
        if "median_ratio_ours_over_diffusers" in best:  # step times in the same rounds: 1 / ratio in images/s
            ratio = 1 / best["median_ratio_ours_over_diffusers"]
            rows.append([target + "diffusers eager bf16 >= 2", f"{ratio:.2f}x", ratio >= 2])
        if "median_ratio_ours_over_diffusers" in eager:
            ratio = 1 / eager["median_ratio_ours_over_diffusers"]
            rows.append([f"(eager: ours / diffusers, batch {self.args.batch})", f"{ratio:.2f}x", ""])
        batches = {self.args.batch: best, **parts.get("batch", {}).get("batches", {})}
        mfu = {b: r.get("mfu_percent", {}).get("ours") for b, r in batches.items() if r}
        for b, value in mfu.items():
            if value is not None:
                rows.append([f"training MFU at batch {b} >= 35%", f"{value:.1f}%", value >= 35])
        for name, variant in parts.get("trainer", {}).get("variants", {}).items():
            mfu = variant.get("mfu_percent")
            measured = f"{variant['images_per_s']:,.0f} images/s" + (f", MFU {mfu:.1f}%" if mfu else "")
            rows.append([f"(the Trainer's own step, batch {self.args.batch}, {name})", measured, ""])
        sampling = parts.get("sampling", {})
        if "seconds_to_sample" in sampling:
            seconds = sampling["seconds_to_sample"]
            rows.append(
                [
                    f"{sampling['n']:,} images, UniPC {sampling['calls']} calls < 60 s (warm)",
                    f"{seconds:.1f} s",
                    seconds < 60,
                ]
            )
            cold = seconds + sampling["compile_seconds"]
            rows.append(["the same with the compilation (a first run)", f"{cold:.1f} s", cold < 60])
        sync = parts.get("syncfree", {})
        if "passed" in sync:
            rows.append(
                ["no host sync in the training step or sampling loops", "tests/test_gpu.py", sync["passed"]]
            )
        return {"rows": rows}


if __name__ == "__main__":
    main()
