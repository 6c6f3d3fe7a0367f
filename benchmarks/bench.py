"""The VAE/GAN step's speed beside a plain baseline and the machine's matrix-product ceiling, in one run.

    python benchmarks/bench.py            # the full measurement: several minutes on 2 CPU cores
    python benchmarks/bench.py --quick    # tiny networks and a few steps: checks that everything runs

Rows of the table:
  ours      train.py end to end (its own images/s in metrics.jsonl), for each precision, process count and
            torch.compile setting; 2 processes are launched with `accelerate launch` (gloo on the CPU), once for
            each --gradient-allreduce precision asked for (--allreduce; fp32 alone unless told)
  baseline  benchmarks/baseline.py: the design's loop as a user writes it (torchvision, five discriminator calls)
  ceiling   torch.mm on the matrices of our step's layers at this batch, at the machine's measured rate
  mm1024    the best rate of a (r × 1024) @ (1024 × 1024) torch.mm over a few row counts r (--mm-rows)
The measurements run interleaved, in rounds, so that all of them see the same machine; each figure is the
median of the timed windows of all rounds, the first window of each run (start-up, compilation) left out.
The table goes to stdout and, with everything else, to JSON.

Our runs time the training step, so train.py runs with what is not the step turned off: no evaluation
(--eval-samples 0), no W&B (--wandb disabled, and so no image grids; --image-every is the run's length too),
no moving average of the decoder (--ema-decay 0) and one checkpoint, after the last timed window
(--save-every is the run's length). The default preset, `seed`, is the design that the baseline implements.

Two counts, each against its own ceiling, are printed and judged side by side:
  step      FLOPs per image count the matrix products of our step from the layer shapes (step_products); torch's
            FLOP counter over one routed step (executed_flops) must agree, and the tests check that it does.
            GFLOP/s and "of ceiling" are images/s × these against `ceiling`.
  minimal   the products that the routed math needs (minimal_products: each batch through each network only
            where some loss's gradient needs it), whatever our step multiplies; "minimal GFLOP/s" and "of 1024
            mm" are images/s × these against `mm1024`. The targets: 80% in fp32 and in bf16, 1 process (judged
            on the CPU).
2 processes against 1 count images/s alone (target 90%, on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, get_args

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vaegan_dist.config import GradientAllreduce, TrainConfig  # noqa: E402
from vaegan_dist.model.networks import PerNetwork, build_models  # noqa: E402
from vaegan_dist.training.cpu import cpu_flags, emulates_bf16  # noqa: E402
from vaegan_dist.training.step import routed_gradients  # noqa: E402

PRECISIONS = {"fp32": ("no", torch.float32), "bf16": ("bf16", torch.bfloat16)}
# Our step runs each network once, on its batches concatenated: the encoder on x, the decoder on [z; z_p], the
# discriminator on [x; x̃; x_p]. Every product of a network has these rows, in batches: a backward pass that
# reaches a network multiplies all of them, whichever its loss needs.
FORWARD_BATCHES = {"encoder": 1, "decoder": 2, "discriminator": 3}
# The other networks' losses whose backward passes carry input gradients through a network: the encoder's
# through the discriminator (to x̃, up to Dis_l) and the decoder (to z); the decoder's through the discriminator.
PASSING_LOSSES = {"encoder": (), "decoder": ("encoder",), "discriminator": ("encoder", "decoder")}
# Of those rows, the batches whose input gradients reach the passing loss's network (minimal_products): the
# encoder's loss needs the decoder's z rows and the discriminator's x̃ rows, the decoder's loss the
# discriminator's x̃ and x_p rows.
NEEDED_BATCHES = {"encoder": {}, "decoder": {"encoder": 1}, "discriminator": {"encoder": 1, "decoder": 2}}
# The width of the products whose best rate is the second ceiling (matmul_1024_rate), and their row counts.
WIDTH, ROWS = 1024, (128, 256, 384)


@dataclass(frozen=True)
class MatrixProduct:
    """(m × k) @ (k × n), laid out as a Linear layer's forward or backward has it."""

    kind: str  # forward | input_grad | weight_grad
    m: int
    k: int
    n: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def layer_products(config: TrainConfig, batch: int, passing_batches: dict[str, dict[str, int]]
                   ) -> list[MatrixProduct]:
    """Each network's products on its FORWARD_BATCHES rows, forward and weight gradient, and input gradients:
    its own loss's on all its rows at every layer but the first (whose input is data, or noise, or another
    network's output, to that loss), and each passing loss's on passing_batches[network][loss] batches of rows
    at every layer up to what that loss sees."""
    with torch.device("meta"):  # shapes only
        networks = build_models(config)
    products = []
    for name, net in zip(PerNetwork._fields, networks, strict=True):
        rows = FORWARD_BATCHES[name] * batch
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        for index, layer in enumerate(linears):
            passes = ({name: FORWARD_BATCHES[name]} if index > 0 else {}) | passing_batches[name]
            if name == "discriminator" and index == len(linears) - 1 and config.similarity == "hidden":
                del passes["encoder"]  # the encoder's loss sees Dis_l, the last hidden layer, not the logit
            fan_in, fan_out = layer.in_features, layer.out_features
            products += [MatrixProduct("forward", rows, fan_in, fan_out),
                         MatrixProduct("weight_grad", fan_out, rows, fan_in),
                         *(MatrixProduct("input_grad", batches * batch, fan_out, fan_in)
                           for batches in passes.values())]
    return products


def step_products(config: TrainConfig, batch: int) -> list[MatrixProduct]:
    """Every matrix product of our step, from the layer shapes."""
    return layer_products(config, batch, {name: dict.fromkeys(losses, FORWARD_BATCHES[name])
                                          for name, losses in PASSING_LOSSES.items()})


def minimal_products(config: TrainConfig, batch: int) -> list[MatrixProduct]:
    """The matrix products that the routed step's math needs, from the layer shapes: each batch through each
    network only where some loss's gradient needs it.

    A loss needs input gradients through network N on a batch of N's rows when (a) the loss depends on N's
    output on that batch and (b) that batch's input depends on the parameters the loss trains (losses.py):
      enc_loss = λ_KL·kld(μ, log σ²) + β·rec(Dis_l(x̃), Dis_l(x)) + λ_pix·pixel(x̃, x), for the encoder:
        discriminator  x̃ rows only, up to Dis_l (the logit, or the last hidden layer, whose products past it it
                       does not need): rec reads Dis_l on x̃ and x, but x is data; D(x_p) is not in the loss
                       (and x_p comes from noise)
        decoder        z rows only, down to z (its first layer included): x_p = Dec(z_p) is not in the loss,
                       and z_p is noise
      dec_loss = γ·rec + λ_pix·pixel + gen_loss, gen_loss = −dis_loss or BCE(D(x̃), 1) + BCE(D(x_p), 1), for
      the decoder:
        discriminator  x̃ and x_p rows, every layer (down to its input, the decoder's output); not the x rows,
                       whose input is data even where the minimax loss reads D(x)
        decoder        its own: all rows, every layer but the first (whose input, [z; z_p], it does not train)
      dis_loss = BCE(D(x), 1) + BCE(D(x̃), 0) + BCE(D(x_p), 0), for the discriminator: its own, all rows
        (x̃ and x_p are constants to it), every layer but the first
      encoder: its own loss only, all its rows (x), every layer but the first (whose input is data)
    Forward passes and weight gradients are our step's: every row of every network (the encoder on x, the
    decoder on [z; z_p], the discriminator on [x; x̃; x_p]), each network's weight gradient from its own loss.
    Each loss's input gradients are counted on their own: none is shared between losses, nor derived from
    another's by linearity.

    Our step (step_products) multiplies more: its backward passes run on all rows of the networks they cross,
    so it also computes the encoder's loss's input gradients on the decoder's z_p rows and the discriminator's
    x and x_p rows, and the decoder's loss's on the discriminator's x rows, all of them unused."""
    return layer_products(config, batch, NEEDED_BATCHES)


def executed_flops(config: TrainConfig, batch: int) -> int:
    """The matrix FLOPs our step runs, counted by torch's FLOP counter over one routed step."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # shapes only: nothing is computed
        networks = build_models(config)
        x, (eps, z_p) = torch.rand(batch, 784), torch.randn(2, batch, config.latent_dim)
    with FlopCounterMode(display=False) as counter:
        routed_gradients(*networks, x, eps, z_p, config)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_time: float) -> float:
    fn()
    calls = 1
    while True:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls
        calls *= 2


def matmul_rate(products: list[MatrixProduct], dtype: torch.dtype, device: torch.device, min_time: float) -> float:
    """FLOP/s of torch.mm over the step's products."""
    seconds = 0.0
    for p in products:
        # Operands laid out as nn.Linear's: x @ W.T forward, g @ W for the input, g.T @ x for the weight.
        if p.kind == "forward":
            a, b = torch.randn(p.m, p.k, dtype=dtype, device=device), torch.randn(p.n, p.k, dtype=dtype,
                                                                                 device=device).t()
        elif p.kind == "input_grad":
            a, b = torch.randn(p.m, p.k, dtype=dtype, device=device), torch.randn(p.k, p.n, dtype=dtype,
                                                                                 device=device)
        else:
            a, b = torch.randn(p.k, p.m, dtype=dtype, device=device).t(), torch.randn(p.k, p.n, dtype=dtype,
                                                                                     device=device)
        seconds += seconds_per_call(lambda a=a, b=b: torch.mm(a, b), device, min_time)
    return sum(p.flops for p in products) / seconds


def matmul_1024_rate(dtype: torch.dtype, device: torch.device, min_time: float, rows: tuple[int, ...] = ROWS
                     ) -> float:
    """The best FLOP/s of torch.mm on (r × 1024) @ (1024 × 1024), over the row counts r: the second ceiling,
    against which the step's minimal FLOPs (minimal_products) are counted."""
    rates = []
    for r in rows:
        a = torch.randn(r, WIDTH, dtype=dtype, device=device)
        b = torch.randn(WIDTH, WIDTH, dtype=dtype, device=device)
        rates.append(2 * r * WIDTH * WIDTH / seconds_per_call(lambda a=a, b=b: torch.mm(a, b), device, min_time))
    return max(rates)


class Contention:
    """How much of the CPUs other programs took since `start()`: all busy time, niced included, but this script's
    and its children's. (Niced programs need not yield: the kernel's autogroups share the CPUs between sessions
    whatever their programs' nice values, and a niced bench's own time is counted as nice.) Linux only;
    elsewhere it reports nothing (None)."""

    STAT = Path("/proc/stat")

    def __init__(self) -> None:
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.start()

    def _now(self) -> tuple[float, float, float] | None:
        if not self.STAT.exists():
            return None
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        jiffies = [int(v) for v in self.STAT.read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(jiffies[0:3]) + sum(jiffies[5:8])) / os.sysconf("SC_CLK_TCK")
        times = os.times()
        return busy, times.user + times.system + times.children_user + times.children_system, time.perf_counter()

    def start(self) -> None:
        self.started = self._now()

    def share(self) -> float | None:
        """The fraction of all cores that others kept busy since start()."""
        now = self._now()
        if now is None or self.started is None:
            return None
        busy, ours, wall = (b - a for a, b in zip(self.started, now, strict=True))
        return max(0.0, busy - ours) / (wall * self.cores)

    def wait_for_quiet(self, limit: float, seconds: int = 3) -> None:
        """Returns once others have used under 10% of the CPUs for `seconds` running seconds, or after `limit`."""
        deadline, quiet = time.perf_counter() + limit, 0
        while quiet < seconds and time.perf_counter() < deadline:
            self.start()
            time.sleep(1)
            share = self.share()
            quiet = quiet + 1 if share is not None and share < 0.1 else 0
            if share is None:
                return


class OursRun(NamedTuple):
    """One train.py configuration of the table's `ours` rows."""

    precision: str
    processes: int
    compile: bool
    allreduce: str  # --gradient-allreduce: fp32 (the math) or bf16; only several processes take bf16

    @property
    def key(self) -> str:
        return f"ours {self.precision} {self.processes} {self.compile} {self.allreduce}"


def size_flags(args: argparse.Namespace) -> list[str]:
    return ["--preset", args.preset, "--hidden-dim", str(args.hidden_dim), "--depth", str(args.depth),
            "--latent-dim", str(args.latent_dim), "--batch-size", str(args.batch_size)]


def child_env(device: torch.device) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if device.type == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def run(command: list[str], device: torch.device, what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(device), cwd=REPO)
    if result.returncode:
        raise SystemExit(f"error: {what} failed (exit code {result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def measure_ours(args: argparse.Namespace, ours: OursRun, device: torch.device, workdir: Path) -> list[float]:
    """images/s of each timed window of one train.py run (all processes together)."""
    output_dir = Path(tempfile.mkdtemp(dir=workdir))
    steps = args.window * (args.windows + 1)
    flags = [*size_flags(args), "--max-steps", str(steps), "--log-every", str(args.window),
             "--save-every", str(steps), "--resume", "none", "--output-dir", str(output_dir),
             "--mixed-precision", PRECISIONS[ours.precision][0], "--compile" if ours.compile else "--no-compile",
             "--gradient-allreduce", ours.allreduce,
             # only the step is timed: see the module's docstring
             "--eval-samples", "0", "--wandb", "disabled", "--image-every", str(steps), "--ema-decay", "0"]
    if ours.processes == 1:
        command = [sys.executable, str(REPO / "train.py"), *flags]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(ours.processes), "--num_machines", "1", "--main_process_port", "0", "--mixed_precision",
                   PRECISIONS[ours.precision][0], "--dynamo_backend", "no", str(REPO / "train.py"), *flags]
    run(command, device, f"train.py ({run_name(ours._asdict())})")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in records[1:]]  # the first window is warm-up (and compilation)


def measure_baseline(args: argparse.Namespace, device: torch.device) -> list[float]:
    steps = args.window * (args.windows + 1)
    command = [sys.executable, str(REPO / "benchmarks" / "baseline.py"), *size_flags(args),
               "--steps", str(steps), "--window", str(args.window)]
    return json.loads(run(command, device, "the baseline").splitlines()[-1])["images_per_s"][1:]


# The CPU's widest matrix-product instructions, best first: they set both ceilings (bf16 runs natively only with
# the first two), and CPUs of one model name can differ in them.
VECTOR_EXTENSIONS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512_BF16", "avx512f": "AVX-512", "avx2": "AVX2"}


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    flags = cpu_flags() or set()
    extension = next((name for flag, name in VECTOR_EXTENSIONS.items() if flag in flags), None)
    return f"{model}, {len(os.sched_getaffinity(0))} cores" + (f", {extension}" if extension else "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks, batch 16, few short windows, one round: checks that it runs")
    parser.add_argument("--output", type=Path, help="the JSON file (none: benchmarks/results-<machine>.json, "
                        "results-<machine>-quick.json with --quick)")
    parser.add_argument("--preset", default="seed", help="the training preset of ours and the baseline")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step per process")
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all measurements")
    parser.add_argument("--window", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=4, help="timed windows per run, after one of warm-up")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--processes", default=None, help="process counts of ours (default: 1,2 on the CPU, "
                        "1 and the GPU count on GPUs)")
    parser.add_argument("--compile", default="off,on", help="torch.compile settings of ours")
    parser.add_argument("--allreduce", default="fp32", help="--gradient-allreduce precisions of ours with several "
                        "processes (fp32,bf16: both)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per matrix-product timing")
    parser.add_argument("--mm-rows", type=lambda text: tuple(int(r) for r in text.split(",")),
                        default=ROWS, help="row counts r of the (r × 1024) @ (1024 × 1024) products whose best "
                        "rate is the ceiling of the minimal FLOPs")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each measurement, wait up to this long for other programs to leave the CPUs")
    args = parser.parse_args()
    if unknown := set(args.allreduce.split(",")) - set(get_args(GradientAllreduce)):
        parser.error(f"--allreduce {args.allreduce}: {', '.join(sorted(unknown))} is not one of "
                     f"{', '.join(get_args(GradientAllreduce))}")
    if args.quick:
        args.hidden_dim, args.depth, args.latent_dim, args.batch_size = 32, 2, 4, 16
        args.rounds, args.window, args.windows, args.min_time = 1, 2, 2, 0.01
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    gpus = torch.cuda.device_count()
    processes = [int(n) for n in (args.processes or ("1,2" if device.type == "cpu" else f"1,{gpus}")).split(",")]
    ours_runs = [OursRun(precision, n, compile == "on", allreduce) for compile in args.compile.split(",")
                 for precision in args.precisions.split(",") for n in dict.fromkeys(processes)
                 for allreduce in (args.allreduce.split(",") if n > 1 else ["fp32"])]
    config = TrainConfig.preset(args.preset, hidden_dim=args.hidden_dim, depth=args.depth,
                                latent_dim=args.latent_dim)
    products = step_products(config, args.batch_size)
    flops = {"step": sum(p.flops for p in products) / args.batch_size,
             "minimal": sum(p.flops for p in minimal_products(config, args.batch_size)) / args.batch_size}
    machine = machine_name(device)
    output = args.output or REPO / "benchmarks" / f"results-{slug(machine)}{'-quick' if args.quick else ''}.json"
    print(f"machine: {machine}; torch {torch.__version__}; {args.preset} networks (hidden {args.hidden_dim}, "
          f"depth {args.depth}, latent {args.latent_dim}), batch {args.batch_size} per process")
    print(f"FLOPs per image per step, from the layer shapes: {flops['step'] / 1e6:.2f} M (torch's FLOP counter "
          f"over one of our steps: {executed_flops(config, args.batch_size) / args.batch_size / 1e6:.2f} M); "
          f"the minimal, what the routed math needs: {flops['minimal'] / 1e6:.2f} M")
    measured = measure_all(args, device, products, flops, ours_runs)
    rows = table_rows(measured, args, flops, ours_runs)
    bf16_emulated = device.type == "cpu" and emulates_bf16(cpu_flags())
    table, verdicts = format_table(rows), targets(rows, device, bf16_emulated)
    shares = [share for values in measured.others.values() for share in values if share is not None]
    loads = measured.loads
    load = {"start": loads[0], "max": max(loads), "end": loads[-1],
            "others_cpu_share_max": max(shares, default=None)}
    print(table)
    print_verdicts(verdicts, flops, args.mm_rows)
    print(f"1-minute load average during the run: {load['start']:.2f} at the start, {load['max']:.2f} at most, "
          f"{load['end']:.2f} at the end" + (f"; other programs took at most {100 * max(shares):.0f}% of the CPUs "
                                             "during a measurement" if shares else ""))
    output.write_text(json.dumps({
        "machine": machine, "device": device.type, "bf16_emulated": bf16_emulated, "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
        "config": {"preset": args.preset, "hidden_dim": args.hidden_dim, "depth": args.depth,
                   "latent_dim": args.latent_dim, "batch_size": args.batch_size, "rounds": args.rounds,
                   "window": args.window, "windows": args.windows, "mm1024_rows": list(args.mm_rows)},
        "flops_per_image": flops["step"], "minimal_flops_per_image": flops["minimal"], "load_average": load,
        "rows": rows, "targets": verdicts, "table": table,
    }, indent=2) + "\n")
    print(f"written to {output}")


@dataclass
class Measured:
    """Every measurement's samples (images/s; for the ceilings, the rate over the FLOPs of one image), the share
    of the CPUs that other programs took during each, and the 1-minute load averages along the run."""

    samples: dict[str, list[float]]
    others: dict[str, list[float | None]]
    loads: list[float]


def measure_all(args: argparse.Namespace, device: torch.device, products: list[MatrixProduct],
                flops: dict[str, float], ours_runs: list[OursRun]) -> Measured:
    """All measurements, in interleaved rounds: the two ceilings of each precision, the baseline, our runs."""
    measured, contention = Measured({}, {}, [os.getloadavg()[0]]), Contention()

    def measure(key: str, what: Callable[[], list[float]]) -> None:
        contention.wait_for_quiet(args.wait_quiet)
        measured.loads.append(os.getloadavg()[0])
        contention.start()
        measured.samples.setdefault(key, []).extend(what())
        measured.others.setdefault(key, []).append(contention.share())

    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for precision in args.precisions.split(","):
                dtype = PRECISIONS[precision][1]
                measure(f"ceiling {precision}", lambda dtype=dtype: [
                    matmul_rate(products, dtype, device, args.min_time) / flops["step"]])
                measure(f"mm1024 {precision}", lambda dtype=dtype: [
                    matmul_1024_rate(dtype, device, args.min_time, args.mm_rows) / flops["minimal"]])
            measure("baseline fp32", lambda: measure_baseline(args, device))
            for ours in ours_runs:
                measure(ours.key, lambda ours=ours: measure_ours(args, ours, device, Path(tmp)))
            measured.loads.append(os.getloadavg()[0])
            print(f"round {round_index + 1}/{args.rounds} done, 1-minute load average {measured.loads[-1]:.2f}",
                  flush=True)
    return measured


def table_rows(measured: Measured, args: argparse.Namespace, flops: dict[str, float],
               ours_runs: list[OursRun]) -> list[dict]:
    """One row per measurement, each figure the median of its samples, in both counts: the step's FLOPs against
    the ceiling of the step's products, the minimal FLOPs against the 1024-wide product's (each ceiling row in
    its own count only)."""
    images_per_s = {key: statistics.median(values) for key, values in measured.samples.items()}
    baseline = images_per_s["baseline fp32"]

    def row(name: str, precision: str, processes: int | None, compile: bool | None, key: str,
            allreduce: str | None = None) -> dict:
        value = images_per_s[key]
        counts = {"ceiling": {"step"}, "mm1024": {"minimal"}}.get(name, {"step", "minimal"})
        ceiling, mm1024 = images_per_s.get(f"ceiling {precision}"), images_per_s.get(f"mm1024 {precision}")
        return {"run": name, "precision": precision, "processes": processes, "compile": compile,
                "allreduce": allreduce, "images_per_s": value,
                "step_time_ms": 1e3 * args.batch_size * (processes or 1) / value,
                "gflop_per_s": value * flops["step"] / 1e9 if "step" in counts else None,
                "fraction_of_ceiling": value / ceiling if ceiling and "step" in counts else None,
                "minimal_gflop_per_s": value * flops["minimal"] / 1e9 if "minimal" in counts else None,
                "fraction_of_mm1024": value / mm1024 if mm1024 and "minimal" in counts else None,
                "vs_baseline_fp32": value / baseline, "samples": measured.samples[key],
                "others_cpu_share": measured.others[key]}

    precisions = args.precisions.split(",")
    rows = [row(name, p, None, None, f"{name} {p}") for name in ("ceiling", "mm1024") for p in precisions]
    rows.append(row("baseline", "fp32", 1, False, "baseline fp32"))
    return rows + [row("ours", ours.precision, ours.processes, ours.compile, ours.key, ours.allreduce)
                   for ours in ours_runs]


def targets(rows: list[dict], device: torch.device, bf16_emulated: bool = False) -> list[dict]:
    """The issue's targets that this run's rows can judge, each with what was measured, the count it is judged
    by (step: our step's FLOPs; minimal: minimal_products'; images: images/s alone) and its printed line.
    bf16_emulated: the rows come from a CPU without bf16 instructions (its bf16 verdict says so)."""
    def best(precision: str, processes: int) -> dict | None:
        candidates = [r for r in rows if r["run"] == "ours" and r["precision"] == precision
                      and r["processes"] == processes and r["allreduce"] == "fp32"]
        return max(candidates, key=lambda r: r["images_per_s"], default=None)

    verdicts = []
    if (r := best("fp32", 1)) and r["fraction_of_ceiling"] is not None:
        percent = f"{100 * r['fraction_of_ceiling']:.0f}%"
        verdicts.append(verdict("step", "fp32 at 80% of the fp32 matrix-product ceiling or more", percent,
                                f"step FLOPs: {percent} of the fp32 ceiling (target 80%)",
                                r["fraction_of_ceiling"] >= 0.8, run_name(r)))
    if r := best("bf16", 1):
        times = f"{r['vs_baseline_fp32']:.2f}×"
        verdicts.append(verdict("step", "bf16 at 4× the baseline's fp32 images/s or more", times,
                                f"bf16: {times} the baseline's images/s (target 4×)", r["vs_baseline_fp32"] >= 4,
                                run_name(r)))
    emulated = " (this CPU emulates bf16: the ceiling is the emulation's)" if bf16_emulated else ""
    for precision in ("fp32", "bf16"):
        if device.type == "cpu" and (r := best(precision, 1)) and r["fraction_of_mm1024"] is not None:
            percent = f"{100 * r['fraction_of_mm1024']:.0f}%"
            verdicts.append(verdict("minimal", f"{precision}, 1 process, at 80% of the {precision} ceiling of a "
                                    "1024-wide product or more, by the minimal FLOPs", percent,
                                    f"minimal FLOPs: {percent} of the {precision} ceiling (target 80%)"
                                    + (emulated if precision == "bf16" else ""),
                                    r["fraction_of_mm1024"] >= 0.8, run_name(r)))
    for one in (r for r in rows if r["run"] == "ours" and r["processes"] == 1):
        if device.type != "cpu":
            continue
        # Each averaging precision of the 2-process runs (bf16 averaging, a change of the math, is named in the run)
        for two in (r for r in rows if r["run"] == "ours" and r["processes"] == 2
                    and r["precision"] == one["precision"] and r["compile"] == one["compile"]):
            ratio = two["images_per_s"] / one["images_per_s"]
            verdicts.append(verdict("images", "2 processes at 90% of 1 process's images/s or more",
                                    f"{100 * ratio:.0f}%", f"2 processes: {100 * ratio:.0f}% of 1 process "
                                    "(target 90%)", ratio >= 0.9, run_name(two, processes=False)))
    if device.type == "cuda" and (r := best("bf16", 1)):
        verdicts.append(verdict("images", "200,000 images/s or more on one GPU", f"{r['images_per_s']:,.0f}",
                                f"{r['images_per_s']:,.0f} images/s on one GPU (target 200,000)",
                                r["images_per_s"] >= 200_000, run_name(r)))
        percent = f"{100 * r['fraction_of_ceiling']:.0f}%"
        verdicts.append(verdict("step", "40% of the bf16 matrix-product rate or more (at a batch that fills the "
                                "GPU)", percent, f"step FLOPs: {percent} of the bf16 ceiling (target 40%)",
                                r["fraction_of_ceiling"] >= 0.4, run_name(r)))
    return verdicts


def run_name(r: dict, processes: bool = True) -> str:
    count = f"{r['processes']} process{'es' if r['processes'] > 1 else ''}, " if processes else ""
    averaging = f", {r['allreduce']} gradient averaging" if r.get("allreduce") not in (None, "fp32") else ""
    return f"{r['precision']}, {count}compile {'on' if r['compile'] else 'off'}{averaging}"


def verdict(count: str, target: str, figure: str, line: str, met: bool, run: str) -> dict:
    return {"count": count, "target": target, "measured": f"{figure}, {run}", "met": met,
            "line": f"{line}: {'met' if met else 'missed'} ({run})"}


def print_verdicts(verdicts: list[dict], flops: dict[str, float], mm_rows: tuple[int, ...]) -> None:
    """The verdicts, grouped by the count that judges them."""
    headings = {"step": f"by our step's FLOPs ({flops['step'] / 1e6:.2f} M per image), against torch.mm on "
                        "the step's products:",
                "minimal": f"by the minimal FLOPs ({flops['minimal'] / 1e6:.2f} M per image), against the best "
                           f"(r × {WIDTH}) @ ({WIDTH} × {WIDTH}) torch.mm, r in {', '.join(map(str, mm_rows))}:",
                "images": "by images/s:"}
    for count, heading in headings.items():
        lines = [v["line"] for v in verdicts if v["count"] == count]
        if lines:
            print("\n  ".join([f"targets {heading}", *lines]))


def format_table(rows: list[dict]) -> str:
    """Both counts: GFLOP/s by our step's FLOPs and its fraction of the ceiling of the step's products; by the
    minimal FLOPs and its fraction of the 1024-wide product's (blank where a ceiling row is of the other)."""
    lines = ["| run | precision | processes | compile | allreduce | images/s | step ms | GFLOP/s | of ceiling "
             "| minimal GFLOP/s | of 1024 mm | × baseline |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    for r in rows:
        processes = "" if r["processes"] is None else str(r["processes"])
        compile = "" if r["compile"] is None else ("on" if r["compile"] else "off")
        allreduce = r["allreduce"] if r["allreduce"] and r["processes"] > 1 else ""
        lines.append(f"| {r['run']} | {r['precision']} | {processes} | {compile} | {allreduce} | "
                     f"{r['images_per_s']:,.0f} | "
                     f"{r['step_time_ms']:.1f} | {cell(r['gflop_per_s'], '.1f')} | "
                     f"{cell(r['fraction_of_ceiling'], '.0%')} | {cell(r['minimal_gflop_per_s'], '.1f')} | "
                     f"{cell(r['fraction_of_mm1024'], '.0%')} | {r['vs_baseline_fp32']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
