"""moe-gpt: a GPT-2 whose blocks switch their feed-forward network between a dense MLP and an MoE layer.

Which file answers what: see the Layout table in README.md.
"""

import os

# Back large CPU tensors (the logits and their gradients are hundreds of MB a step) with 2 MB
# transparent huge pages: each fresh allocation then takes ~500x fewer page faults, which was
# ~1.3x training tokens/s on a 2-core CPU (scripts/bench_train_step.py measures it). torch reads
# the variable once, at its first large CPU allocation, so it is set on import, before any;
# THP_MEM_ALLOC_ENABLE=0 in the environment turns it off. GPU memory is unaffected.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
