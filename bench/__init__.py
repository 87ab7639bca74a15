"""cloudckpt's benchmark harness: ``python -m bench.run [--quick]`` (or ``make bench``). See docs/benchmarks.md."""
