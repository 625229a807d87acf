"""What the tests, the reliability campaign and the benchmarks share: launching real ranks."""
