"""What measures: the experiments (python -m lab.experiments), the benchmarks (python -m lab.bench), the charts."""
