"""vaegan-dist: a distributed trainer for the VAE/GAN of Larsen et al. (2016) on MNIST."""

__version__ = "0.6.0"

__all__ = ["VAEGAN"]


def __getattr__(name: str):  # `from vaegan_dist import VAEGAN` without importing huggingface_hub everywhere else
    if name == "VAEGAN":
        from vaegan_dist.hub.model import VAEGAN

        return VAEGAN
    raise AttributeError(f"module 'vaegan_dist' has no attribute {name!r}")
