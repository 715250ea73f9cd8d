"""``python -m pipeline``: the command line (:mod:`pipeline.cli`), also under torchrun."""

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process (Dask, multiprocessing) re-imports it
    main()
