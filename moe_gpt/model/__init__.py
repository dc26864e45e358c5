"""The network: GPT-2 (gpt.py), the MoE layer (moe.py) and its router, dispatch, experts and kernels, the chunked LM loss, generation, cost and routing analysis."""
