#!/usr/bin/env python
"""Benchmark llava-mlx against mlx-vlm and transformers: `python bench.py --help`.

The benchmarks live in benchmarks/ (one file per concern); this is their command.
"""

from benchmarks.cli import main

if __name__ == "__main__":
    main()
