"""Throughput benchmarking: loaders, the augment stage, the model, the whole training step. The
modes live in bench/ (one module each); `python bench.py --help` lists them, `python bench.py MODE
--help` says what one measures."""
from bench.cli import main

if __name__ == "__main__":
    main()
