"""Goal-driven compression (a recipe's ``goal``): per-layer settings searched for the smallest or
fastest model whose metric on the evaluation data stays within the budget.

- ``scores``: the goal's metrics, computed against the original model's outputs;
- ``space``: the families of settings a model's ops allow and building one per-layer assignment;
- ``engine``: the anytime search (uniform builds, sensitivity-seeded greedy allocation, verification
  on the full evaluation data, repair), its candidates and Pareto set.
"""
