"""Parallelism: multi-host runtime and global batches (distributed.py), cross-process metric
reductions (metrics.py), mesh and partition rules (sharding.py)."""
