"""What defines an SAE: `SAEConfig`, and the registry of architectures by name.

An architecture is one class (see `architectures/`) registered under its name with `@register`; the
config looks its architecture up here to validate itself, so this module depends on no SAE class.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from ..plumbing.checks import is_number, whole_number

NORMALIZATIONS = ("none", "token", "dataset")
# name -> SAE class, in registration order (the order tables and plots use)
ARCHITECTURES: dict[str, type] = {}


class SAEConfigError(ValueError):
    """An SAE configuration or file that cannot be used."""


# what each annotation of SAEConfig asks for, in words for messages
KIND_WORDS = {
    "str": "a string",
    "int": "a whole number",
    "float": "a finite number",
    "float | str": "a positive number or 'paper'",
    "float | None": "a finite number or null",
    "int | None": "a whole number or null",
    "str | None": "a string or null",
    "list | None": "a list or null",
}


def register(cls: type) -> type:
    """Class decorator: make an SAE class available under its `arch` name (configs, files, the
    CLI)."""
    ARCHITECTURES[cls.arch] = cls
    return cls


def architecture(name: str) -> type:
    """The SAE class registered as `name`, or an error listing the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise SAEConfigError(
            f"unknown architecture '{name}'; choose one of {', '.join(ARCHITECTURES)}"
        ) from None


@dataclass
class SAEConfig:
    """What defines an SAE. Serialises into SAELens's cfg.json (our own fields under "saekit")."""

    arch: str = "batchtopk"
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32  # batchtopk/topk: latents per token (batchtopk: on average over the batch)
    # token: centre + unit std per token (the paper's code; SAELens "layer_norm") | dataset | none
    normalize: str = "token"
    # AuxK (batchtopk/topk): the k_aux largest dead pre-activations reconstruct the residual
    k_aux: int = 512
    aux_alpha: float = 1 / 32
    # AuxK on one step in this many, its loss weighted by aux_every (the same mean gradient)
    aux_every: int = 1
    # a latent is dead after this many tokens without firing (~5 batches)
    dead_tokens: int = 5 * 4096
    # starting norm of each encoder column (W_enc starts as the unit-norm decoder transposed, times
    # this): "paper" = sqrt(2 d_in / d_sae), the norm the paper's code draws (kaiming_uniform_ on a
    # [d_in, d_sae] W_enc; 0.5 at 8x); 1 = the decoder transposed; sparsify starts at sqrt(1/3)
    # ~0.58 (nn.Linear's). "paper" gave 7-22% lower NMSE than 1 on the embedded model
    # (benchmarks/results/enc_init_cpu.txt)
    enc_init_norm: float | str = "paper"
    # batchtopk: EMA of the smallest kept activation per batch -> theta
    threshold_beta: float = 0.99
    # JumpReLU: learned per-latent threshold, STE with a rectangle kernel, L0 penalty
    threshold_lr_scale: float = 10.0  # JumpReLU: the log-threshold's learning rate / the run's
    # SAELens's defaults; the paper's 0.001 needs far longer runs
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    l0_coeff: float = 1.0  # weight of the L0 penalty (or of the target-L0 penalty below)
    target_l0: float | None = None  # if set, penalty = l0_coeff * (L0/target - 1)^2
    # ReLU: L1 penalty on activations weighted by decoder row norms
    l1_coeff: float = 5.0
    # Matryoshka BatchTopK: nested groups of latents; each prefix of groups must reconstruct on its
    # own. group_sizes: latents per group (ints summing to d_sae) or fractions of d_sae (summing to
    # 1); None = prefixes of 1/16, 1/8, 1/4, 1/2 and all of the dictionary.
    group_sizes: list | None = None
    # loss weight of each prefix (default equal); normalised to sum 1
    group_weights: list | None = None
    # provenance
    hook_name: str | None = None
    model_name: str | None = None
    context_size: int | None = None
    dataset: str | None = None

    def __post_init__(self):
        self.validate()

    def _check_kinds(self) -> None:
        """Each field of the kind its annotation names (a whole-number float such as 4608.0 is
        taken as the integer), before any rule reads it."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = str(f.type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            if "int" in kinds and (whole := whole_number(value)) is not None:
                setattr(self, f.name, whole)
            elif "float" in kinds and is_number(value):
                pass
            elif not {"str", "list"} & set(kinds) or not isinstance(
                value, str if "str" in kinds else list
            ):
                raise SAEConfigError(
                    f"setting '{f.name}' is {value!r}; expected {KIND_WORDS[str(f.type)]}"
                )

    def validate(self) -> None:
        self._check_kinds()
        cls = architecture(self.arch)
        if self.normalize not in NORMALIZATIONS:
            raise SAEConfigError(
                f"unknown normalize '{self.normalize}'; choose one of {', '.join(NORMALIZATIONS)}"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEConfigError(
                f"d_in and d_sae must be positive (got d_in={self.d_in}, d_sae={self.d_sae})"
            )
        if self.enc_init_norm != "paper" and not (
            isinstance(self.enc_init_norm, (int, float))
            and not isinstance(self.enc_init_norm, bool)
            and self.enc_init_norm > 0
        ):
            raise SAEConfigError(
                f"enc_init_norm must be a positive number or 'paper' (got {self.enc_init_norm!r})"
            )
        if not isinstance(self.aux_every, int) or self.aux_every < 1:
            raise SAEConfigError(
                "aux_every must be a whole number >= 1 (got "
                f"{self.aux_every!r}); 1 runs AuxK every step"
            )
        rules = {
            "k_aux": (self.k_aux >= 1, "at least 1"),
            "aux_alpha": (self.aux_alpha >= 0, "0 or more"),
            "dead_tokens": (self.dead_tokens >= 1, "at least 1"),
            "threshold_beta": (0 <= self.threshold_beta < 1, "in [0, 1)"),
            "l1_coeff": (self.l1_coeff >= 0, "0 or more"),
            "l0_coeff": (self.l0_coeff >= 0, "0 or more"),
            "target_l0": (self.target_l0 is None or self.target_l0 > 0, "positive, or None"),
            "jumprelu_bandwidth": (self.jumprelu_bandwidth > 0, "positive"),
            "jumprelu_init_threshold": (self.jumprelu_init_threshold > 0, "positive"),
            "threshold_lr_scale": (self.threshold_lr_scale > 0, "positive"),
        }
        bad = [
            f"{k}={getattr(self, k)!r} (must be {rule})"
            for k, (ok, rule) in rules.items()
            if not ok
        ]
        if bad:
            raise SAEConfigError(f"invalid SAE settings: {'; '.join(bad)}")
        if cls.has_k and not 0 < self.k < self.d_sae:
            raise SAEConfigError(
                f"k must satisfy 0 < k < d_sae (got k={self.k}, d_sae={self.d_sae}); "
                f"use a larger dictionary (expansion) or a smaller k"
            )
        cls.check_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def encoder_start_norm(self) -> float:
        """The norm each encoder column starts at (see enc_init_norm)."""
        if self.enc_init_norm == "paper":
            # kaiming_uniform_ (a=0): entry variance 2 / fan_in=d_sae
            return (2 * self.d_in / self.d_sae) ** 0.5
        return float(self.enc_init_norm)

    @property
    def sparsity_label(self) -> str:
        """The setting that fixes this SAE's sparsity, as in its name: k32, l032 (target L0),
        l0c2, l1c5."""
        return architecture(self.arch).sparsity_label(self)

    @property
    def name(self) -> str:
        return f"{self.arch}_{self.sparsity_label}_{self.d_sae}"


def resolve_group_sizes(sizes, d_sae: int) -> list[int]:
    """Matryoshka group sizes as ints summing to d_sae, from ints, fractions of d_sae, or None
    (default)."""
    if sizes is None:
        sizes = [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2]
    sizes = list(sizes)
    if not sizes or any(v <= 0 for v in sizes):
        raise SAEConfigError(f"group_sizes must be positive numbers (got {sizes})")
    if all(isinstance(v, int) for v in sizes):
        if sum(sizes) != d_sae:
            raise SAEConfigError(
                f"group_sizes {sizes} sum to {sum(sizes)}, not d_sae={d_sae}; make them sum to "
                f"the dictionary size (or give fractions that sum to 1)"
            )
        return sizes
    if abs(sum(sizes) - 1) > 1e-6:
        raise SAEConfigError(
            f"group_sizes given as fractions {sizes} sum to {sum(sizes):g}, not 1; make them sum "
            f"to 1 (or give integer sizes that sum to d_sae={d_sae})"
        )
    ends = [round(d_sae * f) for f in itertools.accumulate(sizes)]
    out = [b - a for a, b in zip([0] + ends[:-1], ends)]
    if any(v <= 0 for v in out):
        raise SAEConfigError(
            f"group_sizes {sizes} leave an empty group at d_sae={d_sae}; use fewer or larger groups"
        )
    return out
