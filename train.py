"""`accelerate launch train.py [--flags]`: trains the VAE/GAN. See `python train.py --help`."""

from vaegan_dist.train import main

if __name__ == "__main__":
    main()
