"""Data: the grain task stream (tasks.py), the domain BPE tokenizer (domain_tokenizer.py), the zarr
rollout + credit store (store.py)."""
