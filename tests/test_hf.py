"""Hugging Face GPT-2 import and export against the real transformers GPT2LMHeadModel."""

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, GPT2Config, GPT2LMHeadModel

from moe_gpt.config import ConfigError, GPTConfig
from moe_gpt.weights.hf import LAYER_NORM_EPS, export_hf_gpt2, load_hf_gpt2
from moe_gpt.model.gpt import GPT

GPT2_VOCAB = 50257
# Trained GPT-2's logits are strongly negative; zero logits of padded vocabulary rows would then
# take almost all the probability mass.
NEGATIVE_LOGIT = -30.0


@pytest.fixture(scope="module")
def negative_logits_hf_gpt2_dir(tmp_path_factory) -> Path:
    """A random ``transformers`` GPT-2 like conftest's ``hf_gpt2_dir``, but with all logits around -30."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=GPT2_VOCAB))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
        wte, final_bias = model.transformer.wte.weight, model.transformer.ln_f.bias
        wte.normal_(0.0, 1.0)  # logits a nat or so apart, so the loss depends on the target token
        # Every final hidden state carries ln_f's bias b, so moving each token row by c*b/|b|^2
        # moves each logit by about c.
        wte.add_(NEGATIVE_LOGIT * final_bias / final_bias.square().sum())
    directory = tmp_path_factory.mktemp("hf_gpt2_negative_logits")
    model.save_pretrained(directory)
    return directory


def token_ids(vocab_size: int = GPT2_VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def hf_logits(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(directory).eval()(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def hf_lm_loss(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # transformers shifts the labels itself: token t+1 is the target at t
        return GPT2LMHeadModel.from_pretrained(directory).eval()(idx, labels=idx).loss


def our_lm_loss(model: GPT, idx: torch.Tensor, loss_chunk_size: int) -> torch.Tensor:
    """The training loss (gradients enabled, so the chunked path runs its backward-ready Function)."""
    model.config.loss_chunk_size = loss_chunk_size
    return model(idx[:, :-1], idx[:, 1:]).lm_loss.detach()


def test_loaded_model_gives_the_logits_of_transformers(hf_gpt2_dir):
    model = load_hf_gpt2(str(hf_gpt2_dir))
    assert not model.training and not model.config.use_moe
    assert (model.config.block_size, model.config.vocab_size, model.config.n_embd) == (32, GPT2_VOCAB, 32)
    idx = token_ids()
    torch.testing.assert_close(our_logits(model, idx), hf_logits(hf_gpt2_dir, idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_chunk_size", [16, 0], ids=["chunked", "full-logits"])
def test_loaded_model_gives_the_lm_loss_of_transformers_when_logits_are_negative(
    negative_logits_hf_gpt2_dir, loss_chunk_size
):
    idx = token_ids()
    assert hf_logits(negative_logits_hf_gpt2_dir, idx).max() < -10
    model = load_hf_gpt2(str(negative_logits_hf_gpt2_dir))
    want = hf_lm_loss(negative_logits_hf_gpt2_dir, idx)
    torch.testing.assert_close(our_lm_loss(model, idx, loss_chunk_size), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss_chunk_size", [16, 0], ids=["chunked", "full-logits"])
def test_exported_and_reimported_model_gives_the_lm_loss_of_transformers(
    negative_logits_hf_gpt2_dir, tmp_path, loss_chunk_size
):
    export_hf_gpt2(load_hf_gpt2(str(negative_logits_hf_gpt2_dir)), tmp_path / "export")
    again = load_hf_gpt2(str(tmp_path / "export"))
    idx = token_ids()
    want = hf_lm_loss(tmp_path / "export", idx)
    torch.testing.assert_close(our_lm_loss(again, idx, loss_chunk_size), want, rtol=1e-5, atol=0)


def test_padded_vocabulary_rows_are_zero(hf_gpt2_dir):
    wte = load_hf_gpt2(str(hf_gpt2_dir)).transformer.wte.weight
    assert wte.shape[0] == 50304 and torch.all(wte[GPT2_VOCAB:] == 0) and torch.all(wte[:GPT2_VOCAB].abs().sum(1) > 0)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=32, use_moe=False)).eval()
    with torch.no_grad():  # nonzero biases and gains, so every weight's mapping shows in the logits
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    export_hf_gpt2(model, tmp_path / "export")
    idx = token_ids(1000)
    torch.testing.assert_close(hf_logits(tmp_path / "export", idx), our_logits(model, idx), rtol=1e-4, atol=1e-5)


def test_import_export_round_trip_keeps_every_weight(hf_gpt2_dir, tmp_path):
    model = load_hf_gpt2(str(hf_gpt2_dir))
    export_hf_gpt2(model, tmp_path / "export")
    again = load_hf_gpt2(str(tmp_path / "export"))
    assert again.config == model.config
    again_state = again.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(again_state[key], value), key


def test_our_layer_norms_use_the_epsilon_the_import_requires():
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8, use_moe=False))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(norm.eps == LAYER_NORM_EPS for norm in norms)


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"n_inner": 64}, "n_inner=64 is not supported"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
    ],
)
def test_hf_config_we_cannot_reproduce_is_a_one_line_error(tmp_path, setting, message):
    # The config is checked before any weight is read, so a config.json alone is enough.
    GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=1000, **setting).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_hf_gpt2(str(tmp_path))
    assert message in str(error.value) and str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_other_model_types_are_refused(tmp_path):
    BertConfig().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds a 'bert' model; only GPT-2"):
        load_hf_gpt2(str(tmp_path))


@pytest.mark.parametrize(
    "source,message",
    [
        ("{tmp}/no-such-model", "{tmp}/no-such-model does not exist"),
        ("{tmp}/config.json", "{tmp}/config.json is a file"),
        ("nobody/no-such-model", "nobody/no-such-model is neither a save_pretrained directory nor a reachable hub model"),
    ],
)
def test_missing_source_is_a_one_line_error(tmp_path, source, message):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        load_hf_gpt2(source.format(tmp=tmp_path))  # the hub name fails: tests run with HF_HUB_OFFLINE=1
    assert message.format(tmp=tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_export_refuses_an_moe_model(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8, use_moe=True))
    with pytest.raises(ConfigError, match="only dense models export"):
        export_hf_gpt2(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8, use_moe=False))
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not empty.*--overwrite"):
        export_hf_gpt2(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    export_hf_gpt2(model, tmp_path, overwrite=True)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_cli_writes_a_trained_checkpoint_and_tokenizer_that_transformers_load(
    tiny_checkpoint, load_script, tmp_path, capsys, gpt2
):
    cli = load_script("export_hf")
    assert cli.main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "hf")]) == 0
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert hf_model.config.n_positions == 32 and hf_model.config.vocab_size == GPT2_VOCAB
    from transformers import AutoTokenizer

    text = "def main():\n    return {'ü': 1}  <|endoftext|>"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == gpt2.encode(text, allowed_special="all")
    assert cli.main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "hf")]) == 2
    assert "is not empty" in capsys.readouterr().err
