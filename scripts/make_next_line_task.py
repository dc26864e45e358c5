"""Write the next-line task from the corpus's held-out documents (a downstream task for scripts/evaluate.py).

The command lives in moe_gpt/cli/make_next_line_task.py (also installed as ``moe-gpt-make-next-line-task``);
``--help`` lists its options.
"""

from moe_gpt.cli.make_next_line_task import main

if __name__ == "__main__":
    raise SystemExit(main())
