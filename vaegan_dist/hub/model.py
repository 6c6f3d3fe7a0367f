"""`VAEGAN`: the trained encoder and decoder as one model the Hugging Face way.

    model = VAEGAN.from_pretrained("pretrained")      # or an export, a checkpoint, a run directory, a Hub repo id
    images = model.sample(16)                         # (16, C, H, W) in [0, 1]: (16, 1, 28, 28) on MNIST
    prior = model.fit_prior(training_images)          # a mixture fitted to the codes of (N, C, H, W) images
    images = model.sample(16, prior=prior)            # decoded from its codes instead of N(0, I)
    mu, logvar = model.encode(images)                 # images as torchvision's ToTensor gives them
    model.save_pretrained("my-model")                 # config.json + model.safetensors + README.md (model card)
    model.push_to_hub("user/vaegan-mnist")            # the same files, one commit on the Hub

The format is huggingface_hub's PyTorchModelHubMixin's: `config.json` (the settings that build the networks, with
the class and the package version: no run settings, no paths of the training machine) and `model.safetensors` (the
keys `encoder.*` and `decoder.*` of the two networks), with a model card whose YAML metadata the Hub reads.
save_pretrained writes the weights in the dtype they were loaded in (an export's float16 stays float16) unless the
model was cast since, and keeps a loaded model card (its metrics and training command).

Images are float tensors (N, C, H, W) in [0, 1], config.image_shape; the networks themselves work on rows of C·H·W
pixels in [-1, 1] (the decoder ends in tanh), and the methods convert at the boundary.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, PyTorchModelHubMixin, hf_hub_download
from torch import Tensor, nn

from vaegan_dist import __version__
from vaegan_dist.config import ConfigError, TrainConfig
from vaegan_dist.data.images import DATA_NAMES
from vaegan_dist.hub.card import (
    LICENSE,
    MODEL_CARD,
    TAGS,
    card_metrics,
    metrics_text,
    run_metrics,
    training_command,
)
from vaegan_dist.hub.network_files import (
    CARD_FILE,
    MODEL_FILE,
    network_directory,
    portable_settings,
    read_networks,
    stored_dtype,
)
from vaegan_dist.model.latent import codes
from vaegan_dist.model.mixture import GaussianMixture
from vaegan_dist.model.networks import build_models


class VAEGAN(nn.Module, PyTorchModelHubMixin, library_name="vaegan-dist", license=LICENSE, tags=TAGS,
             paper_url="https://arxiv.org/abs/1512.09300", model_card_template=MODEL_CARD):
    """The encoder and decoder of a trained VAE/GAN. `config` is its TrainConfig (or that as a dict). encode, decode,
    sample and reconstruct are inference: no autograd graph (call self.encoder / self.decoder to differentiate)."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        try:
            self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config or {})
        except ConfigError as err:
            raise ValueError(f"VAEGAN config: {err}") from None
        # what save_pretrained writes to config.json
        self._hub_mixin_config = {"_class_name": type(self).__name__, "_vaegan_dist_version": __version__,
                                  **portable_settings(self.config)}
        self.card_extras: dict[str, Any] = {}  # what the model card says of the training (vaegan-export fills it)
        self.loaded_card: ModelCard | None = None  # the card of the directory it was loaded from
        self.weights_dtype: torch.dtype | None = None  # the dtype save_pretrained writes (None: the model's)
        self.encoder, self.decoder, _ = build_models(self.config)

    @classmethod
    def from_networks(cls, config: TrainConfig, encoder: nn.Module, decoder: nn.Module) -> VAEGAN:
        """A model holding these networks (not copies), in their mode and dtype."""
        with torch.device("meta"):  # nothing random is drawn for weights about to be replaced
            model = cls(config)
        model.encoder, model.decoder = encoder, decoder
        return model

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = next(self.decoder.parameters())
        return weight.device, weight.dtype

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> VAEGAN:
        """nn.Module's (.to, .half, ...); a cast to another dtype makes save_pretrained write the new one."""
        before = self._device_dtype()[1]
        super()._apply(fn, recurse)
        if self._device_dtype()[1] != before:
            self.weights_dtype = None
        return self

    def _rows(self, images: Tensor) -> Tensor:
        """Images (N, C, H, W) in [0, 1] as the networks take them: rows of C·H·W pixels in [-1, 1]."""
        device, dtype = self._device_dtype()
        return images.reshape(images.shape[0], self.config.image_pixels).to(device, dtype) * 2 - 1

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z | x), each (N, latent_dim), for images (N, C, H, W) in [0, 1]."""
        mu, logvar = self.encoder(self._rows(images))
        return mu.float(), logvar.float()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images (N, C, H, W) in [0, 1] for codes z (N, latent_dim)."""
        device, dtype = self._device_dtype()
        rows = self.decoder(z.to(device, dtype)).float()
        return ((rows + 1) / 2).clamp_(0, 1).reshape(z.shape[0], *self.config.image_shape)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, prior: GaussianMixture | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I), or from prior (fit_prior's; then a generator on the CPU), drawn with
        generator (on its device) when given."""
        if prior is not None:
            if prior.means.shape[1] != self.latent_dim:
                raise ValueError(f"a prior of {prior.means.shape[1]}-dimensional codes for a model of "
                                 f"{self.latent_dim}: fit it with this model's fit_prior")
            if generator is not None and generator.device.type != "cpu":
                raise ValueError("sample(prior=...) draws on the CPU: pass a CPU generator, or none")
            return self.decode(prior.sample(n, generator))
        device = generator.device if generator is not None else self._device_dtype()[0]
        return self.decode(torch.randn(n, self.latent_dim, generator=generator, device=device))

    @torch.no_grad()
    def fit_prior(self, images: Tensor) -> GaussianMixture:
        """A mixture of 10 Gaussians fitted to μ(x) of images (N, C, H, W) in [0, 1] (training images; 10,000 are
        ample): sample(n, prior=it) then draws codes where the encoder puts images (vaegan_dist.model.mixture)."""
        return GaussianMixture.fit(codes(self.encoder, self._rows(images)))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Dec(μ(x)): the reconstructions, (N, C, H, W) in [0, 1], of images (N, C, H, W) in [0, 1]."""
        return self.decode(self.encode(images)[0])

    def forward(self, images: Tensor) -> Tensor:
        return self.reconstruct(images)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> VAEGAN:
        """huggingface_hub's from_pretrained, but a path that names no directory fails at once, in one line."""
        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if not path.is_dir() and (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"{name}: no such directory; give a directory of config.json and "
                                    "model.safetensors (or a checkpoint, or a run's output directory), or a Hub "
                                    "repo id such as user/vaegan-mnist")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # ------------------------------------------------------------------------- huggingface_hub's hooks

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str = "cpu", strict: bool = False, config: Any = None,
                         weights: str = "ema", **kwargs: Any) -> VAEGAN:
        """A local directory of any kind load_networks reads (this format, an old-style export with encoder and
        decoder files, a checkpoint, a run's output directory: its newest checkpoint), else a Hub repo id.
        weights "ema" (default) takes a checkpoint's moving averages, "raw" the trained networks. torch_dtype (or
        dtype) and device place the model (default: float32 on map_location, the CPU)."""
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        device = kwargs.pop("device", None) or map_location
        if kwargs:
            raise TypeError(f"VAEGAN.from_pretrained does not take {', '.join(sorted(kwargs))}: it takes torch_dtype "
                            "(or dtype), device, map_location and weights (the model is small: no device_map)")
        directory = Path(model_id).expanduser()
        if not directory.is_dir():
            directory = Path(hf_hub_download(repo_id=model_id, filename=MODEL_FILE, revision=revision,
                                             cache_dir=cache_dir, force_download=force_download, token=token,
                                             local_files_only=local_files_only)).parent
        source = network_directory(directory)
        loaded_config, encoder, decoder = read_networks(source, map_location, weights)
        model = cls.from_networks(loaded_config, encoder, decoder).to(device, dtype).eval()
        model.weights_dtype = dtype or stored_dtype(source)
        if (source / CARD_FILE).is_file():
            model.loaded_card = ModelCard.load(source / CARD_FILE)
        else:  # a checkpoint: the run's evaluation at its step
            model.card_extras["metrics"] = run_metrics(source)
        return model

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        dtype = self.weights_dtype or self._device_dtype()[1]
        state = {key: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
                 for key, t in self.state_dict().items()}
        save_file(state, Path(save_directory) / MODEL_FILE, metadata={"format": "pt"})

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        dtype = str(self.weights_dtype or self._device_dtype()[1]).removeprefix("torch.")
        if self.loaded_card is not None and not kwargs:  # what it was loaded with, the weights' dtype updated
            return ModelCard(re.sub(r"the weights \(\w+\)", f"the weights ({dtype})", str(self.loaded_card)))
        info = self._hub_mixin_info
        extras = {**self.card_extras, **kwargs}
        data = ModelCardData(**info.model_card_data.to_dict())
        dataset = self.config.dataset
        mnist, named = dataset == "mnist", dataset != "folder"  # a named data set, not a user's folder
        data.datasets = [dataset] if named else None
        data.tags = sorted({*(data.tags or []), *([dataset] if named else [])})
        data.license = extras.pop("license", data.license)
        metrics = extras.pop("metrics", None) or {}
        if metrics:
            data.model_name = f"vaegan-{dataset.replace('_', '-')}" if named else "vaegan"
            data.eval_results = [EvalResult(task_type="unconditional-image-generation",
                                            dataset_type=dataset if named else "images",
                                            dataset_name=DATA_NAMES[dataset] if named else "held-out images",
                                            dataset_split="test", metric_type=kind,
                                            metric_name=name, metric_value=round(float(metrics[key]), 6))
                                 for key, kind, name in card_metrics(mnist) if key in metrics]
        extras.setdefault("command", training_command(self.config))
        extras.setdefault("source", "Trained by vaegan-dist")
        extras.setdefault("metrics_text", metrics_text(metrics, mnist))
        extras.setdefault("data_name", DATA_NAMES[dataset])
        extras.setdefault("image_shape", ", ".join(map(str, self.config.image_shape)))
        return ModelCard.from_template(card_data=data, template_str=info.model_card_template,
                                       dtype=dtype, latent_dim=self.latent_dim, **extras)


def export_networks(encoder: nn.Module, decoder: nn.Module, config: TrainConfig, directory: str | Path,
                    dtype: torch.dtype = torch.float16, card: dict[str, Any] | None = None) -> Path:
    """Writes what VAEGAN.save_pretrained writes, weights cast to dtype, into directory: config.json,
    model.safetensors and the model card README.md (card: its license, metrics, source and command)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CARD_FILE).unlink(missing_ok=True)  # save_pretrained keeps an existing card
    copies = [copy.deepcopy(network).to("cpu", dtype) for network in (encoder, decoder)]
    model = VAEGAN.from_networks(config, *copies)
    model.card_extras = dict(card or {})
    model.save_pretrained(directory)
    return directory
