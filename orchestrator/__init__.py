"""What runs where and when: recipes (the seed's tables as data), run configs, the dry run.

Later issues add preflight checks, the Ray layer, the per-worker train loop, checkpoints and
metrics here (see ../shared/DESIGN.md).
"""
