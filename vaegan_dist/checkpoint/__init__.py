"""What a run keeps on disk: checkpoints (layout, writing, reading, contents, resume policy) and metrics.jsonl."""
