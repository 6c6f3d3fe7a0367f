"""The model card of an export: its template, the metrics of the run it came from, the command that trains it."""

from __future__ import annotations

import shlex
from pathlib import Path

from vaegan_dist.checkpoint.metrics_log import METRICS_FILE, MetricsFileError, read_records
from vaegan_dist.config import TrainConfig

LICENSE = "apache-2.0"  # the project's (LICENSE); vaegan-export --license sets another for a card
TAGS = ["vae-gan", "vae", "gan", "image-generation", "pytorch"]  # and the data set's name
# (metric key in metrics.jsonl without "eval/", the card's metric type and name)
CARD_METRICS = [("fid", "fid", "classifier-FID (lower is better)"), ("kid", "kid", "KID"),
                ("precision", "precision", "precision"), ("recall", "recall", "recall"),
                ("inception_score", "inception_score", "inception score"),
                ("recon_mse", "mse", "reconstruction MSE"), ("recon_psnr", "psnr", "reconstruction PSNR (dB)"),
                ("recon_accuracy", "accuracy", "reconstruction accuracy")]

MODEL_CARD = """---
{{ card_data }}
---

# VAE/GAN on {{ data_name }}

The encoder and decoder of a VAE/GAN (Larsen et al., 2016, [arXiv:1512.09300](https://arxiv.org/abs/1512.09300))
trained on {{ data_name }} with vaegan-dist. `config.json` holds the settings that build the networks,
`model.safetensors` the weights ({{ dtype }}).

## Use

```bash
pip install vaegan-dist    # or, from its source tree: pip install .
```

```python
from vaegan_dist import VAEGAN

model = VAEGAN.from_pretrained("{{ repo_id | default('path/to/this/directory', true) }}")
images = model.sample(16)            # (16, {{ image_shape }}) floats in [0, 1]
mu, logvar = model.encode(images)    # q(z | x), z of size {{ latent_dim }}
again = model.reconstruct(images)
```

## Training

{{ source }}. The command that trains these settings:

```bash
{{ command }}
```

## Evaluation

{{ metrics_text }}
"""


def training_command(config: TrainConfig) -> str:
    """`python train.py` with the flags that give config's settings over the default preset's (output_dir and
    data_dir left out: they were the training machine's)."""
    defaults = TrainConfig().to_dict()
    words = ["python", "train.py"]
    for key, value in config.to_dict().items():
        if value == defaults[key] or key in ("output_dir", "data_dir"):
            continue  # (a folder's run needs --data-dir: it is said below)
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            words += [flag, "none" if value is None else str(value)]
    if config.dataset != "mnist":  # (MNIST's is bundled)
        words += ["--data-dir", "IMAGES"]
    return shlex.join(words)


def card_metrics(mnist: bool) -> list[tuple[str, str, str]]:
    """CARD_METRICS as named for the data set: off MNIST, fid is the Inception FID."""
    return [(key, kind, name if mnist or key != "fid" else "FID (Inception; lower is better)")
            for key, kind, name in CARD_METRICS]


def metrics_text(metrics: dict[str, float], mnist: bool = True) -> str:
    if not metrics:
        return "No evaluation was recorded with these weights: run `vaegan-eval DIR` on them."
    step = f" at step {int(metrics['step'])}" if "step" in metrics else ""
    rows = [f"| {name} | {float(metrics[key]):.4g} |" for key, _, name in card_metrics(mnist) if key in metrics]
    kind = ("classifier-based evaluation on the MNIST test set" if mnist else "evaluation on the held-out images "
            "(their reconstruction error, and the Inception FID of samples where it was measured)")
    return (f"vaegan-dist's {kind}{step} (the run's metrics.jsonl):\n\n| metric | value |\n| --- | --- |\n"
            + "\n".join(rows))


def run_metrics(source: Path) -> dict[str, float]:
    """The last evaluation in the metrics.jsonl of the run that source (a checkpoint or a run's output directory)
    belongs to, not later than the checkpoint's step; {} when there is none, or the file cannot be read."""
    run_dir = source if (source / METRICS_FILE).is_file() else source.parent.parent
    step = int(source.name.removeprefix("step_")) if source.name.startswith("step_") else None
    try:
        records = read_records(run_dir / METRICS_FILE)
    except MetricsFileError:
        return {}
    found: dict[str, float] = {}
    for record in records:
        if any(key.startswith("eval/") for key in record) and (step is None or record["step"] <= step):
            found = {"step": record["step"],
                     **{k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}}
    return found
