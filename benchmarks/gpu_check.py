"""The benchmark part of benchmarks/gpu_check.sh: the training step's images/s on one GPU, eager, compiled and
launch-free (--cuda-graphs), beside the matrix-product rates at the step's own shapes.

    python benchmarks/gpu_check.py OUT.json [--budget SECONDS] [--quick]

Each figure times the step in this process (benchmarks/bench.py's seconds_per_call over train_step or the
captured step: networks, optimizers and a fixed batch on the GPU, nothing else of the training loop), after
three untimed calls (capture, compilation). bf16 runs the networks' forward passes under autocast as Accelerate
does. Measured, in this order, each within what is left of --budget (what does not fit is recorded as skipped):
  1. the bf16 and fp32 torch.mm rates over the step's products at batch 128 (bench.matmul_rate, step_products)
  2. eager and launch-free at batch 128, bf16 and fp32
  3. the batch that fills the GPU: eager bf16 at 128·2^k until images/s gains under 10%, memory runs out or
     the cap (65,536); the best is the fill batch. Then launch-free bf16 there, and the rates at its shapes
  4. --compile (bf16) at 128 and at the fill batch, then fp32 at 128
Every measurement is isolated: an error is recorded with its message and the next one runs. The JSON is
rewritten after each, so a run stopped by its timeout still leaves what it measured. The targets of issue #18
are judged from what was measured (a target whose figures are missing is "not measured").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench import PRECISIONS, machine_name, matmul_rate, seconds_per_call, step_products  # noqa: E402
from vaegan_dist.config import TrainConfig  # noqa: E402
from vaegan_dist.model.networks import PerNetwork, build_models, compile_networks  # noqa: E402
from vaegan_dist.training.cuda_graphs import GraphedStep  # noqa: E402
from vaegan_dist.training.step import adam_optimizers, train_step  # noqa: E402

MODES = ("eager", "graphs", "compile")
MAX_BATCH = 65_536
BATCH = 128


def make_step(config: TrainConfig, mode: str, precision: str, batch: int, device: torch.device) -> Callable[[], bool]:
    """One training step of fresh networks on a fixed random batch, as a call (it returns `stepped`)."""
    config = dataclasses.replace(config, cuda_graphs=mode == "graphs", compile=mode == "compile")
    torch.manual_seed(0)
    networks = PerNetwork(*(net.to(device) for net in build_models(config)))
    if precision == "bf16":
        for net in networks:
            net.forward = torch.autocast(device.type, dtype=torch.bfloat16)(net.forward)
    if mode == "compile":
        torch._dynamo.reset()
        compile_networks(networks)
    optimizers = adam_optimizers(networks, config)
    x = torch.rand(batch, 784, device=device) * 2 - 1
    step = GraphedStep() if mode == "graphs" else train_step
    return lambda: step(networks, optimizers, x, config).stepped


def measure_step(config: TrainConfig, mode: str, precision: str, batch: int, device: torch.device,
                 min_time: float) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    call = make_step(config, mode, precision, batch, device)
    for _ in range(3):  # capture, compilation, autotuning
        call()
    warmup = time.perf_counter() - started
    seconds = seconds_per_call(call, device, min_time)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"images_per_s": batch / seconds, "step_ms": 1e3 * seconds, "warmup_s": warmup, "peak_memory_mb": peak}


class Check:
    """The results so far, written to `output` after every measurement, and the time left."""

    def __init__(self, output: Path, budget: float, config: TrainConfig, device: torch.device) -> None:
        self.output, self.deadline, self.config, self.device = output, time.perf_counter() + budget, config, device
        self.results: dict = {"machine": machine_name(device), "torch": torch.__version__, "device": device.type,
                              "config": {"preset": "seed", **{k: getattr(config, k) for k in (
                                  "hidden_dim", "depth", "latent_dim", "dropout", "similarity")}},
                              "flops_per_image": self.flops_per_image(BATCH), "rates": {}, "steps": {},
                              "fill_search": [], "errors": {}, "skipped": []}

    def flops_per_image(self, batch: int) -> float:
        return sum(p.flops for p in step_products(self.config, batch)) / batch

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.results["targets"] = targets(self.results)
        self.output.write_text(json.dumps(self.results, indent=2) + "\n")

    def attempt(self, key: str, what: Callable[[], object], needs: float) -> object | None:
        """what(), recorded under `key`; None (and why) when it fails or `needs` seconds are not left."""
        if self.left() < needs:
            self.results["skipped"].append(f"{key}: {self.left():.0f} s of the budget left, needs ~{needs:.0f}")
            self.save()
            return None
        try:
            value = what()
        except Exception as err:  # one failing measurement must not stop the others
            self.results["errors"][key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"{key}: FAILED\n{traceback.format_exc()}", flush=True)
            value = None
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{key}: {value}", flush=True)
        self.save()
        return value

    def rate(self, precision: str, batch: int, min_time: float) -> None:
        key = f"{precision} batch {batch}"
        value = self.attempt(f"rate {key}", lambda: matmul_rate(step_products(self.config, batch),
                                                               PRECISIONS[precision][1], self.device, min_time), 20)
        if value is not None:
            self.results["rates"][key] = value

    def step(self, mode: str, precision: str, batch: int, min_time: float, needs: float = 10) -> dict | None:
        key = f"{mode} {precision} batch {batch}"
        value = self.attempt(key, lambda: measure_step(self.config, mode, precision, batch, self.device, min_time),
                             needs)
        if value is not None:
            rate = self.results["rates"].get(f"{precision} batch {batch}")
            value["fraction_of_rate"] = (value["images_per_s"] * self.flops_per_image(batch) / rate) if rate else None
            self.results["steps"][key] = {"mode": mode, "precision": precision, "batch": batch, **value}
            self.save()
        return value


def fill_batch(check: Check, min_time: float) -> int:
    """The batch at which eager bf16 stops gaining images/s (10% or more per doubling), memory or the cap."""
    best_batch, best, batch = BATCH, None, BATCH
    while batch <= MAX_BATCH:
        value = check.step("eager", "bf16", batch, min_time)
        if value is None:
            break
        check.results["fill_search"].append({"batch": batch, "images_per_s": value["images_per_s"]})
        if best is not None and value["images_per_s"] < 1.1 * best:
            if value["images_per_s"] > best:
                best_batch, best = batch, value["images_per_s"]
            break
        best_batch, best = batch, value["images_per_s"]
        batch *= 2
    check.results["fill_batch"] = best_batch
    check.save()
    return best_batch


def targets(results: dict) -> list[dict]:
    """Issue #18's targets, judged on what was measured."""
    steps, fill = results["steps"], results.get("fill_batch")

    def images(mode: str, precision: str, batch: int | None) -> float | None:
        row = steps.get(f"{mode} {precision} batch {batch}")
        return row["images_per_s"] if row else None

    verdicts = []
    at_128 = {key: row["images_per_s"] for key, row in steps.items() if row["batch"] == BATCH}
    best_key = max(at_128, key=at_128.get, default=None)
    verdicts.append({"target": "batch 128 on one GPU: 200,000 images/s or more",
                     "measured": f"{at_128[best_key]:,.0f} ({best_key})" if best_key else None,
                     "met": at_128[best_key] >= 200_000 if best_key else None})
    fractions = {key: row["fraction_of_rate"] for key, row in steps.items()
                 if row["batch"] == fill and row["precision"] == "bf16" and row["fraction_of_rate"] is not None}
    best_key = max(fractions, key=fractions.get, default=None)
    verdicts.append({"target": "at the batch that fills the GPU: 40% of the measured bf16 matrix-product rate or more",
                     "measured": f"{100 * fractions[best_key]:.0f}% ({best_key})" if best_key else None,
                     "met": fractions[best_key] >= 0.4 if best_key else None})
    for precision in ("bf16", "fp32"):
        graphs, eager = images("graphs", precision, BATCH), images("eager", precision, BATCH)
        ratio = graphs / eager if graphs and eager else None
        verdicts.append({"target": f"launch-free step 3× eager or more at batch 128 ({precision})",
                         "measured": f"{ratio:.2f}×" if ratio else None, "met": ratio >= 3 if ratio else None})
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the JSON file")
    parser.add_argument("--budget", type=float, default=200, help="seconds for all measurements")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timing")
    parser.add_argument("--quick", action="store_true", help="tiny networks, short timings (checks that it runs; "
                        "on a CPU only the eager step and the rates are measured)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig.preset("seed", ema_decay=0.0)
    if args.quick:
        config = dataclasses.replace(config, hidden_dim=32, depth=2, latent_dim=4)
        args.min_time = min(args.min_time, 0.02)
    check = Check(args.output, args.budget, config, device)
    modes = [m for m in MODES if device.type == "cuda" or m == "eager"]  # graphs need CUDA; compile: minutes
    for precision in ("bf16", "fp32"):
        check.rate(precision, BATCH, args.min_time / 10)
    for precision in ("bf16", "fp32"):
        for mode in (m for m in ("eager", "graphs") if m in modes):
            check.step(mode, precision, BATCH, args.min_time)
    fill = fill_batch(check, args.min_time) if not args.quick else BATCH * 2
    check.results["fill_batch"] = fill
    if fill != BATCH:
        for precision in ("bf16", "fp32"):
            check.rate(precision, fill, args.min_time / 10)
        for mode, precision in (("eager", "bf16"), ("graphs", "bf16"), ("eager", "fp32"), ("graphs", "fp32")):
            if mode in modes and f"{mode} {precision} batch {fill}" not in check.results["steps"]:
                check.step(mode, precision, fill, args.min_time)
    if "compile" in modes:
        for precision, batch in (("bf16", BATCH), ("bf16", fill), ("fp32", BATCH)):
            check.step("compile", precision, batch, args.min_time, needs=60)
    check.save()
    for verdict in check.results["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[verdict["met"]]
        print(f"{state}: {verdict['target']} ({verdict['measured']})")


if __name__ == "__main__":
    main()
