"""Stage 3, the plan: plain data fixed before any tensor data is read.

plan.py holds the data (Op, PlannedTensor, Plan, CombinePlan); build.py maps every adapter tensor
onto the base (`build_plan`); combine.py plans several adapters combined into one, as PEFT's
add_weighted_adapter would; memory.py is the merge's memory model and tuning constants;
config.py is the config.json the plan makes true; render.py shows a plan as text.
"""
