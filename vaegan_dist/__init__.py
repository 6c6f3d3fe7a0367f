"""vaegan-dist: a distributed trainer for the VAE/GAN of Larsen et al. (2016) on MNIST."""

__version__ = "0.1.0"
