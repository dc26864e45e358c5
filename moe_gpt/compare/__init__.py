"""Dense vs MoE comparisons: variants, the plan of runs and budgets, the report, the verdict statistics, held-out evaluation."""
