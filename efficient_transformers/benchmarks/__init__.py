"""Speed and memory benchmarks of the attention variants, and the LRA suite runner."""
