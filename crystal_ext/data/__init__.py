"""Data: examples and real data files, the synthetic task, image corruption, and packing an
example into the six-segment dual-path sequence."""
