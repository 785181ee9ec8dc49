"""Stage 4, the merge: stream the plan through the math and into shard files.

merge.py streams one tensor at a time (read, apply the ops, round once, write); exact.py and
mathops.py hold the formulas (pure functions on tensors: the correctly rounded merge, the combine
methods, the thread helpers); factors.py reads adapter tensors as the math takes them;
combine.py computes a combined adapter's factors; executor.py runs the shards on threads, worker
processes or Ray tasks.
"""
