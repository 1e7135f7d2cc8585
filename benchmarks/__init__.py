"""Speed and memory benchmarks; each prints a table with ratios against a baseline from the same run."""
