"""bench.py's parts: common (timing, reporting, the delta rule's inputs), cpu (kernel, decode and refine),
gpu (the GPU run, its dry run, the compile check) and readme (the Benchmarks table). `python bench.py --help`."""
