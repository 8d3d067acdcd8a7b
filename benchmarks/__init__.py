"""Benchmarks: tunerd vs cuDNN and torch.compile on the seed suites (python -m benchmarks.run)."""
