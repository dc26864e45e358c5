"""The defaults the README and docs/configuration.md state are the config's defaults, and their links resolve."""

import re
from pathlib import Path

import pytest

from moe_gpt.config import MoEConfig, RunConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
README_WORDS = " ".join(README.split())  # sentences wrap across lines
CONFIGURATION = (REPO / "docs" / "configuration.md").read_text()


def test_the_readme_describes_the_default_run_the_config_trains():
    run = RunConfig()
    model, moe = run.model, run.model.moe
    assert run.model.use_moe
    assert f"a {model.n_layer}-layer, {model.n_embd}-wide GPT-2 with {moe.num_experts} experts (top-{moe.top_k})" in README_WORDS
    tokens_per_step = run.data.batch_size * model.block_size
    assert f"for {run.trainer.max_steps} steps of {tokens_per_step:,} tokens" in README_WORDS
    assert f"{run.trainer.max_steps * tokens_per_step:,} training tokens" in README_WORDS


def test_the_readme_stays_short():
    assert len(README.splitlines()) <= 300


def moe_key_table() -> dict[str, str]:
    """``<key>`` -> the default docs/configuration.md's MoE table states for ``model.moe.<key>``.

    A row may document several keys (```model.moe.num_groups`, `topk_groups```) with one default each
    (``1, 1``); ``null → 4·n_embd`` and ``null (dropless)`` both state None.
    """
    defaults = {}
    for line in CONFIGURATION.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`model.moe."):
            continue
        keys = [key.removeprefix("model.moe.") for key in re.findall(r"`([\w.]+)`", cells[0])]
        values = [value.split("→")[0].split("(")[0].strip() for value in cells[1].split(",")]
        assert len(values) == len(keys), f"docs/configuration.md: {cells[0]} needs one default per key"
        defaults.update(zip(keys, values))
    return defaults


def test_every_moe_default_in_the_configuration_doc_is_the_configs():
    table = moe_key_table()
    assert len(table) >= 20, "the MoE key table of docs/configuration.md was not found"
    for key, documented in table.items():
        actual = getattr(MoEConfig(), key)
        expected = "null" if actual is None else str(actual).lower()
        assert documented == expected, f"docs/configuration.md says model.moe.{key} defaults to {documented}, the config {expected}"


@pytest.mark.parametrize("document", ["README.md", *[f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md"))], "CHANGELOG.md"])
def test_every_relative_link_and_image_resolves(document):
    path = REPO / document
    for target in re.findall(r"\]\(([^)#\s]+)\)", path.read_text()):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{document} links to {target}, which does not exist"


def test_the_layout_doc_lists_every_module():
    layout = (REPO / "docs" / "layout.md").read_text()
    for module in sorted((REPO / "moe_gpt").rglob("*.py")):
        if module.name != "__init__.py" and module.parent.name != "cli":
            assert f"{module.name}`" in layout, f"docs/layout.md does not list {module.relative_to(REPO)}"
    for command in sorted((REPO / "moe_gpt" / "cli").glob("*.py")):
        if command.stem not in ("__init__", "common"):
            assert f"`{command.stem}`" in layout, f"docs/layout.md does not list the command {command.stem}"


# What each folder of moe_gpt/ may import from the others (docs/layout.md).
MAY_IMPORT = {
    "model": {"model"},
    "data": {"data"},
    "training": {"training", "model", "data", "weights", "compose", "errors", "reporting"},
    "weights": {"weights", "training", "model", "data", "compose", "errors"},
    "compare": {"compare", "training", "weights", "model", "data", "compose", "errors", "reporting"},
}


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_each_folder_imports_only_what_the_layout_allows(folder):
    allowed = MAY_IMPORT[folder] | {"config"}
    for module in sorted((REPO / "moe_gpt" / folder).rglob("*.py")):
        for imported in re.findall(r"^\s*(?:from|import) moe_gpt\.(\w+)", module.read_text(), flags=re.MULTILINE):
            assert imported in allowed, f"{module.relative_to(REPO)} imports moe_gpt.{imported}, which docs/layout.md rules out"
