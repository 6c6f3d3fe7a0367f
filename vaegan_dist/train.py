"""`python -m vaegan_dist.train`, `vaegan-train` and the repository's `train.py`: the training command
(vaegan_dist.cli.train), started so that a Ctrl-C while torch is still loading is one line, not a traceback."""

import sys

from vaegan_dist.exits import Ending, leave

try:
    from vaegan_dist.cli.train import main
except KeyboardInterrupt:
    print("stopped by Ctrl-C while starting: nothing was trained", file=sys.stderr)
    leave(Ending.INTERRUPTED)

if __name__ == "__main__":
    main()
