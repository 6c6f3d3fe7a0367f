"""The run: setup, the loop, the step, and what surrounds it (trackers, console, signals, locks, CPU)."""
