"""`python -m vaegan_dist.train`: the training command, vaegan_dist.cli.train."""

from vaegan_dist.cli.train import main

if __name__ == "__main__":
    main()
