"""Stage 4, the merge: stream the plan through the math and into shard files.

mathops.py holds the formulas (pure functions on tensors); merge.py streams one tensor at a time
(read, ops in fp32, round once, write); combine.py computes a combined adapter's factors;
executor.py runs the shards on threads, worker processes or Ray tasks.
"""
