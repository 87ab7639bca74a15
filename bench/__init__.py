"""cloudckpt's benchmark harness: ``python bench/run.py [--quick]`` (or ``make bench``). See docs/benchmarks.md."""
