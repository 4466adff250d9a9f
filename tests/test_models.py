import pytest
import torch
import transformers as T

from saekit.activations import forward_hooks
from saekit.models import (
    EMBEDDED_MODEL,
    HookPointError,
    ModelLoadError,
    d_model,
    load_model,
    model_name,
    n_layers,
    resolve_hook,
    valid_hooks,
    wrap_model,
)


def test_embedded_model_loads_with_expected_shape(model):
    assert model_name(model) == EMBEDDED_MODEL
    assert n_layers(model) == 30
    assert d_model(model) == 576
    ids = model.tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model._module(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_hook_resolution_names_modules(model):
    assert resolve_hook(model, "resid_pre.0").module_path == "model.layers.0"
    assert resolve_hook(model, "resid_pre.0").io == "input"
    assert resolve_hook(model, "resid_post.29").io == "output"
    assert resolve_hook(model, "mlp_out.4").module_path == "model.layers.4.mlp"
    assert resolve_hook(model, "attn_out.4").module_path == "model.layers.4.self_attn"
    hooks = valid_hooks(model)
    assert len(hooks) == 4 * 30 and "resid_post.15" in hooks


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("resid_post.30", "out of range"),
        ("resid.3", "unknown hook point"),
        ("mlp_out", "unknown hook point"),
        ("attn_out.-1", "unknown hook point"),
    ],
)
def test_bad_hook_names_list_valid_choices(model, bad, needle):
    with pytest.raises(HookPointError) as e:
        resolve_hook(model, bad)
    msg = str(e.value)
    assert needle in msg and "0..29" in msg or "resid_post.0 .. resid_post.29" in msg


def test_hub_model_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(ModelLoadError) as e:
        load_model("EleutherAI/pythia-70m")
    assert "EleutherAI/pythia-70m" in str(e.value) and EMBEDDED_MODEL in str(e.value)


TINY = {
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=128, n_positions=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    ),
    "gemma2": lambda: T.Gemma2Config(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        vocab_size=128,
    ),
    "llama": lambda: T.LlamaConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=128,
    ),
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_hook_points_across_architectures(arch, tokenizer):
    """The same names work on Llama, GPT-2, Gemma 2 and GPT-NeoX: resid values match
    output_hidden_states and the residual decomposes as resid_pre + attn_out + mlp_out."""
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(TINY[arch]())
    m = wrap_model(hf, tokenizer)
    ids = torch.randint(0, 128, (2, 12))
    names = ["resid_pre.1", "attn_out.1", "mlp_out.1", "resid_post.1"]
    pre, attn, mlp, post = forward_hooks(m, ids, [resolve_hook(m, h) for h in names])
    with torch.no_grad():
        hs = hf(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(pre, hs[1], atol=1e-6)
    assert torch.allclose(post, hs[2], atol=1e-6)
    assert torch.allclose(pre + attn + mlp, post, atol=1e-5), (
        "resid_post != resid_pre + attn_out + mlp_out"
    )
    with pytest.raises(HookPointError):
        resolve_hook(m, "resid_post.3")
