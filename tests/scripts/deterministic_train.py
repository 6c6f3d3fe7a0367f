"""train.py with torch's deterministic algorithms on (tests/test_gpu.py's bitwise resume on CUDA)."""

import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch

torch.use_deterministic_algorithms(True)

from vaegan_dist.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
