#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA GPU (about 9 minutes at most):
#
#     bash benchmarks/gpu_check.sh "$OUT"      # OUT: where everything goes (default: $OUT, else ./gpu-check)
#
# 1. setup     `pip install -e .` when it can (quietly, 30 s at most); else the checkout runs as it is, on the
#              packages already installed (PYTHONPATH=the checkout either way). W&B off, nothing downloaded.
# 2. gpu tests `python -m pytest -m gpu` (tests/test_gpu.py), 4 workers when pytest-xdist is there
# 3. benchmark benchmarks/gpu_check.py: images/s eager, --compile and --cuda-graphs at batch 128 and at the
#              batch that fills the GPU, the bf16 and fp32 matrix-product rates at the step's shapes, peak memory
# 4. conv      the paper's CelebA recipe (--preset celeba64: conv networks at full width, 64×64 colour, batch 64)
#              on 1,000 synthetic CelebA-sized PNGs: 300 steps each eager, --cuda-graphs and --compile, bf16;
#              the last images/s line of each (the data path and the GPU step together)
# Each part has its own time limit and runs whatever the others did. Files written to OUT (one level):
#   check.log (everything), environment.txt, pytest.txt, pytest.xml, bench.json, bench.txt, conv-*.txt, summary.txt
# The summary (what passed or failed, every figure) is printed at the end and kept in summary.txt.
set -u
OUT_DIR=${1:-${OUT:-$PWD/gpu-check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PYTHON=${PYTHON:-python3}
SETUP_S=${SETUP_S:-30}
TESTS_S=${TESTS_S:-210}
BENCH_S=${BENCH_S:-170}
CONV_S=${CONV_S:-45}  # per conv run
exec > >(tee -a "$OUT_DIR/check.log") 2>&1
export WANDB_MODE=disabled PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset ACCELERATE_USE_CPU
started=$(date +%s)
echo "== gpu check: $(date -u +%FT%TZ), repository $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"

echo "== 1. setup"
if timeout "$SETUP_S" "$PYTHON" -m pip install -q --retries 0 --timeout 3 --no-build-isolation -e "$REPO" \
        >"$OUT_DIR/pip.tmp" 2>&1; then
    setup="pip install -e . succeeded"
else
    setup="pip install -e . failed (exit $?: no network?): running from the checkout on the installed packages"
fi
rm -f "$OUT_DIR/pip.tmp"
echo "$setup"
{
    echo "setup: $setup"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: none"
    timeout 60 "$PYTHON" - <<'EOF' 2>&1
import importlib, torch
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPUs", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for name in ("accelerate", "safetensors", "rich", "numpy", "yaml", "PIL", "torchvision", "wandb", "xdist"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as err:
        print(name, "MISSING:", err)
import vaegan_dist
print("vaegan_dist from", vaegan_dist.__file__)
EOF
} | tee "$OUT_DIR/environment.txt"

echo "== 2. gpu tests (limit ${TESTS_S} s)"
workers=()
"$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 4)
timeout -k 10 "$TESTS_S" "$PYTHON" -m pytest -m gpu tests/test_gpu.py -rA -v "${workers[@]}" \
    --junitxml="$OUT_DIR/pytest.xml" -p no:cacheprovider >"$OUT_DIR/pytest.txt" 2>&1
tests_rc=$?
tail -n 40 "$OUT_DIR/pytest.txt"

echo "== 3. benchmark (limit ${BENCH_S} s)"
timeout -k 10 "$BENCH_S" "$PYTHON" benchmarks/gpu_check.py "$OUT_DIR/bench.json" --budget $((BENCH_S - 30)) \
    >"$OUT_DIR/bench.txt" 2>&1
bench_rc=$?
tail -n 30 "$OUT_DIR/bench.txt"

echo "== 4. conv 64x64 (celeba64, limit ${CONV_S} s a run)"
images="$OUT_DIR/celeba-like"
mkdir -p "$images"
"$PYTHON" -c "import sys; from pathlib import Path; from benchmarks.conv_bench import synthetic_folder; \
synthetic_folder(Path(sys.argv[1]), 1000)" "$images" >/dev/null 2>&1
for mode in eager cuda-graphs compile; do
    flags=()
    [ "$mode" = eager ] || flags=("--$mode")
    timeout -k 10 "$CONV_S" "$PYTHON" -m vaegan_dist.train --preset celeba64 --data-dir "$images" --max-steps 300 \
        --log-every 50 --eval-samples 0 --mixed-precision bf16 --wandb disabled --resume none \
        --output-dir "$OUT_DIR/conv-run-$mode" "${flags[@]}" >"$OUT_DIR/conv-$mode.txt" 2>&1
    echo "conv $mode: exit $?, $(grep -o '[0-9]* img/s' "$OUT_DIR/conv-$mode.txt" | tail -n 1)" | tee -a "$OUT_DIR/conv.txt"
    rm -rf "$OUT_DIR/conv-run-$mode"
done
rm -rf "$images"

echo "== summary"
"$PYTHON" - "$OUT_DIR" "$tests_rc" "$bench_rc" "$(( $(date +%s) - started ))" "$setup" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, re, sys
from pathlib import Path
out, tests_rc, bench_rc, seconds, setup = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
print(f"gpu check: {seconds} s in all; setup: {setup}")
env = (out / "environment.txt").read_text().splitlines() if (out / "environment.txt").exists() else []
print(*[line for line in env if line.startswith(("python", "vaegan_dist")) or "MISSING" in line], sep="\n")
timed_out = {124: " (TIMED OUT)", 137: " (KILLED at the limit)"}
text = (out / "pytest.txt").read_text() if (out / "pytest.txt").exists() else ""
counts = re.findall(r"=+ (.*(?:passed|failed|error|skipped).*) in [\d.]+s", text)
print(f"gpu tests: exit {tests_rc}{timed_out.get(tests_rc, '')}: {counts[-1] if counts else 'no result line'}")
for line in text.splitlines():
    if line.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED")):
        print("  " + line[:200])
for line in (out / "conv.txt").read_text().splitlines() if (out / "conv.txt").exists() else ["conv: no result"]:
    print(line)
print(f"benchmark: exit {bench_rc}{timed_out.get(bench_rc, '')}")
try:
    bench = json.loads((out / "bench.json").read_text())
except (OSError, ValueError) as err:
    print(f"  no bench.json: {err}")
    sys.exit(0)
print(f"  {bench['machine']}, torch {bench['torch']}; {bench['flops_per_image'] / 1e6:.1f} MFLOP per image per step; "
      f"fill batch {bench.get('fill_batch')}")
for key, rate in bench["rates"].items():
    print(f"  torch.mm rate {key}: {rate / 1e12:.1f} TFLOP/s")
print(f"  {'run':<28} {'images/s':>12} {'step ms':>9} {'of rate':>8} {'peak MiB':>9} {'warm-up s':>9}")
for key, row in bench["steps"].items():
    fraction = "" if row["fraction_of_rate"] is None else f"{100 * row['fraction_of_rate']:.1f}%"
    peak = "" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
    print(f"  {key:<28} {row['images_per_s']:>12,.0f} {row['step_ms']:>9.3f} {fraction:>8} {peak:>9} "
          f"{row['warmup_s']:>9.1f}")
for search in bench["fill_search"]:
    print(f"  fill search: batch {search['batch']}: {search['images_per_s']:,.0f} images/s")
for key, error in bench["errors"].items():
    print(f"  ERROR {key}: {error}")
for skipped in bench["skipped"]:
    print(f"  skipped {skipped}")
for verdict in bench["targets"]:
    state = {True: "met", False: "MISSED", None: "not measured"}[verdict["met"]]
    print(f"  {state}: {verdict['target']} ({verdict['measured']})")
EOF
echo "files in $OUT_DIR:" "$OUT_DIR"/*
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
