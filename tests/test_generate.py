"""Sampling with and without the KV cache, its arguments, and scripts/generate.py on a trained checkpoint."""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moe_gpt.config import ConfigError, GPTConfig, MoEConfig
from moe_gpt.model.generate import generate, keep_top_k, keep_top_p, next_token_logits
from moe_gpt.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "data" / "tokenizer"
VOCAB = 100  # padded to 128 inside the model


def tiny_model(use_moe: bool, weight_std: float | None = None) -> GPT:
    """A random 2-layer model with a 16-token context; ``weight_std`` redraws every weight for sharper logits."""
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, use_moe=use_moe, moe=MoEConfig(num_experts=4)
    )
    model = GPT(config).eval()
    if weight_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, weight_std)
    return model


def prompt(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_cached_next_token_logits_equal_a_full_pass_also_past_block_size(use_moe):
    model, tokens = tiny_model(use_moe, weight_std=0.5), prompt(length=30)
    cache = None
    with torch.no_grad():
        for end in range(5, 31):  # from 17 tokens on, the context is cropped to the last 16
            cached, cache = next_token_logits(model, tokens[:, :end], cache, use_cache=True)
            full, _ = next_token_logits(model, tokens[:, :end], None, use_cache=False)
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(full, model(tokens[:, max(0, end - 16) : end]).logits[:, -1])


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_greedy_output_is_the_same_with_and_without_the_cache_past_block_size(use_moe):
    model, idx = tiny_model(use_moe, weight_std=1.0), prompt()
    cached = generate(model, idx, max_new_tokens=30, temperature=0)  # 35 tokens: the context is cropped at 16
    uncached = generate(model, idx, max_new_tokens=30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_generation_projects_only_the_sampled_position_to_logits(use_cache):
    model, idx = tiny_model(use_moe=True), prompt()
    positions_per_call = []
    model.lm_head.register_forward_hook(lambda module, args, out: positions_per_call.append(args[0].shape[1]))
    generate(model, idx, max_new_tokens=20, temperature=0, use_cache=use_cache)  # prefill, steps, refills past 16
    assert positions_per_call == [1] * 20


def test_last_logits_only_are_the_full_passes_last_logits_and_refuse_targets():
    model, idx = tiny_model(use_moe=True), prompt()
    torch.testing.assert_close(model(idx, last_logits_only=True).logits, model(idx).logits[:, -1:])
    with pytest.raises(ValueError, match="pass no targets"):
        model(idx, targets=idx, last_logits_only=True)


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_seeded_sampling_is_reproducible_and_the_seed_matters(use_moe):
    model, idx = tiny_model(use_moe), prompt()
    first = generate(model, idx, 20, temperature=1.0, generator=seeded(0))
    again = generate(model, idx, 20, temperature=1.0, generator=seeded(0))
    other = generate(model, idx, 20, temperature=1.0, generator=seeded(1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_top_k_of_one_is_greedy():
    model, idx = tiny_model(True), prompt()
    greedy = generate(model, idx, 20, temperature=0)
    assert torch.equal(generate(model, idx, 20, temperature=1.5, top_k=1, generator=seeded(0)), greedy)


def test_tiny_top_p_is_greedy():
    model, idx = tiny_model(True), prompt()
    greedy = generate(model, idx, 20, temperature=0)
    assert torch.equal(generate(model, idx, 20, temperature=1.5, top_p=1e-6, generator=seeded(0)), greedy)


def test_padded_vocabulary_ids_are_never_generated():
    model = tiny_model(False)
    with torch.no_grad():
        # Every final hidden state becomes all ones, which the padding rows of the output embedding score highest.
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[VOCAB:] = 1.0
    tokens = generate(model, prompt(), 10, temperature=0)
    assert tokens.max() < VOCAB


def test_generation_restores_training_mode():
    model = tiny_model(True).train()
    generate(model, prompt(), 3, temperature=0)
    assert model.training


def test_zero_new_tokens_returns_the_prompt():
    idx = prompt()
    assert torch.equal(generate(tiny_model(False), idx, 0), idx)


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = keep_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert torch.equal(keep_top_k(logits, 10), logits)


@pytest.mark.parametrize(
    "p,expected",
    [(0.5, [False, True, False]), (0.6, [False, True, True]), (0.95, [True, True, True])],
)
def test_top_p_keeps_the_most_likely_tokens_until_their_probability_reaches_p(p, expected):
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()  # deliberately unsorted
    assert torch.isfinite(keep_top_p(logits, p)).tolist() == [expected]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_new_tokens": -1}, "max_new_tokens=-1 must be >= 0"),
        ({"temperature": -0.5}, "temperature=-0.5 must be >= 0"),
        ({"top_k": 0}, "top_k=0 must be >= 1"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"idx": torch.tensor([1, 2, 3])}, "prompt must be a (batch, tokens) long tensor"),
        ({"idx": torch.zeros(1, 0, dtype=torch.long)}, "at least one token"),
        ({"idx": torch.tensor([[1, VOCAB]])}, f"prompt token ids must be in [0, {VOCAB})"),
    ],
)
def test_bad_argument_is_a_one_line_error(kwargs, message):
    arguments = {"idx": prompt(), "max_new_tokens": 3, **kwargs}
    with pytest.raises(ConfigError) as error:
        generate(tiny_model(False), **arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.fixture
def run_cli(load_script, capsys) -> Callable[..., tuple[int, str, str]]:
    """Run scripts/generate.py's main in-process; returns (exit code, stdout, stderr)."""
    cli = load_script("generate")

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main([*args, "--tokenizer-dir", str(TOKENIZER_DIR)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


SAMPLE_ARGS = ["--prompt", "def main(", "--max-new-tokens", "8", "--num-samples", "2", "--seed", "0", "--top-k", "20"]


def assert_two_samples_after_the_prompt(stdout: str) -> None:
    samples = stdout.split("--- sample ")[1:]
    assert len(samples) == 2
    assert all(sample.split("\n", 1)[1].startswith("def main(") for sample in samples)


def test_cli_prints_samples_from_a_trained_checkpoint(tiny_checkpoint, run_cli):
    code, out, err = run_cli("--checkpoint", str(tiny_checkpoint), *SAMPLE_ARGS)
    assert code == 0, err
    assert_two_samples_after_the_prompt(out)


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning: ~10 s on 2 CPU cores
def test_cli_runs_as_a_script_from_any_folder(tiny_checkpoint, tmp_path):
    # The default --tokenizer-dir (data/tokenizer) counts from the project root, as train.py's does.
    args = ["--checkpoint", str(tiny_checkpoint), *SAMPLE_ARGS]
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert_two_samples_after_the_prompt(result.stdout)


def test_cli_with_a_seed_repeats_its_samples(tiny_checkpoint, run_cli):
    args = ["--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "12", "--seed", "3", "--top-p", "0.9"]
    first, again = run_cli(*args), run_cli(*args)
    assert first[0] == 0 and first == again


def test_cli_greedy_output_is_the_same_without_the_cache(tiny_checkpoint, run_cli):
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "import", "--max-new-tokens", "40", "--temperature", "0"]
    cached, uncached = run_cli(*args), run_cli(*args, "--no-cache")
    assert cached[0] == 0 and cached == uncached


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent/last.ckpt"], "checkpoint /nonexistent/last.ckpt does not exist"),
        (["--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
        (["--num-samples", "0"], "--num-samples 0 must be >= 1"),
        (["--prompt", ""], "--prompt is empty"),
        (["--device", "warp-drive"], "--device 'warp-drive' is not a device name"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(tiny_checkpoint, run_cli, args, message):
    code, out, err = run_cli("--checkpoint", str(tiny_checkpoint), *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
