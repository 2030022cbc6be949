"""midway's benchmark suite: `python bench/run.py --help`."""
