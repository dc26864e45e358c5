"""Plain-data form of the routing intermediates that ``return_intermediate=True`` returns."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def to_jsonable(value: Any) -> Any:
    """Tensors become (nested) lists of Python numbers; dicts, lists and tuples are walked.

    The result goes through ``json.dumps`` unchanged, so a server can return a model's
    ``GPTOutput.intermediate`` (or one block's) as it is:

        out = model(idx, return_intermediate=True)
        payload = json.dumps(to_jsonable(out.intermediate))
    """
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    return value
