"""The base every SAE shares: encoder `a = relu((x - b_dec) W_enc + b_enc)`, decoder `x_hat = z
W_dec + b_dec`, input normalisation, the training loss (the dense reference path here; the sparse
path in saekit.sae.fast), dead latents and AuxK, the unit-norm decoder, and writing the SAE's
folder. What differs between architectures (saekit/sae/architectures/) is `select` (which
pre-activations survive), the sparsity term, and the facts each class states about itself (the
class attributes below)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

from ..plumbing.files import atomic_write_bytes, atomic_write_json
from . import formats
from .auxk import DeadLatents
from .config import SAEConfig, SAEConfigError
from .fast import training_loss
from .outputs import ForwardOutput, Selection, TrainOutput
from .scaling import InputScaling
from .step import PLAIN, Step


class SAE(InputScaling, DeadLatents, torch.nn.Module):
    """Shared base. An architecture subclasses it, sets its facts, defines `select` (and where it
    has one, `sparsity_loss`), and registers itself with `config.register`."""

    # -- facts every architecture states (the trainer, metrics, sweeps, plots, files, CLI read them)
    arch = "base"  # the name in configs, files and the CLI
    label = "SAE"  # for people: tables and legends
    color = "#7f7f7f"  # its colour in every figure
    saelens_name = "standard"  # SAELens's inference architecture that reproduces the code
    saelens_training_name = "standard"  # SAELens's name for the training architecture
    has_k = False  # cfg.k sets its sparsity
    per_token_k = False  # exactly k latents on every token (TopK)
    has_theta = False  # one global inference threshold theta, fitted from data (BatchTopK family)
    has_prefixes = False  # nested prefixes that are SAEs themselves (Matryoshka)
    uses_auxk = False  # AuxK on dead latents
    # its sparse training path in saekit.sae.fast.paths (None: the reference path)
    fast_path: str | None = None
    graph_safe = False  # its sparse step can be recorded as CUDA graphs (saekit.train.graphs)
    sweep_knob = "k"  # which list of levels a sweep gives it: "k" (k or target L0) or "l1_coeff"
    # codes `encode(x, mode)` can give; the first is the inference code
    modes: tuple[str, ...] = ("default",)

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Architecture-specific checks (and normalisation) of a config; raise SAEConfigError."""

    @classmethod
    def sparsity_settings(cls, cfg: SAEConfig) -> dict:
        """The config fields that fix this SAE's sparsity (k; JumpReLU's target_l0 or l0_coeff;
        l1_coeff)."""
        return {"k": cfg.k}

    @classmethod
    def sparsity_label(cls, cfg: SAEConfig) -> str:
        """The sparsity settings as they appear in the SAE's name: k32, l032 (target L0), l0c2,
        l1c5."""
        short = {"k": "k", "target_l0": "l0", "l0_coeff": "l0c", "l1_coeff": "l1c"}
        return "".join(f"{short[k]}{v:g}" for k, v in cls.sparsity_settings(cfg).items())

    @classmethod
    def sweep_setting(cls, level: float) -> dict:
        """The config fields that put this architecture at sparsity `level` of a sweep (k, target
        L0, ...)."""
        return {"k": int(level)}

    @property
    def has_fast_path(self) -> bool:
        """Whether training takes a sparse path (saekit.sae.fast) where it pays."""
        return self.fast_path is not None

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_in, cfg.d_sae
        W_dec = torch.empty(f, d)
        torch.nn.init.kaiming_uniform_(W_dec)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec)  # [d_sae, d_in], unit-norm rows
        # the encoder is stored as W_enc_t [d_sae, d_in] and read as W_enc = W_enc_t.t(): the sparse
        # backward makes its gradient in this layout, and fused Adam walks a contiguous parameter
        self.W_enc_t = torch.nn.Parameter(W_dec * cfg.encoder_start_norm)
        self.b_enc = torch.nn.Parameter(torch.zeros(f))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        # dataset-wide scale (normalize="dataset")
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(f, dtype=torch.long))
        self.register_state_dict_post_hook(self._state_dict_out)
        self.register_load_state_dict_pre_hook(self._state_dict_in)
        # where the inference threshold came from (training's estimates or a
        # calibration); saved in cfg.json
        self.theta_info: dict | None = None

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder [d_in, d_sae] (a view of the parameter W_enc_t; write into it with copy_)."""
        return self.W_enc_t.t()

    @staticmethod
    def _state_dict_out(module, state_dict, prefix, local_metadata) -> None:
        """state_dict() names the encoder W_enc [d_in, d_sae], as the files and every earlier
        checkpoint do."""
        state_dict[prefix + "W_enc"] = state_dict.pop(prefix + "W_enc_t").t()

    @staticmethod
    def _state_dict_in(module, state_dict, prefix, *_) -> None:
        if prefix + "W_enc" in state_dict:
            state_dict[prefix + "W_enc_t"] = state_dict.pop(prefix + "W_enc").t().contiguous()

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take W_enc [d_in, d_sae], W_dec, b_enc and b_dec from a dict of tensors (a file's)."""
        self.W_enc_t.data = weights["W_enc"].t().contiguous().to(self.W_dec)
        for key in ("W_dec", "b_enc", "b_dec"):
            getattr(self, key).data = weights[key].clone().to(self.W_dec)

    # -- the shared encoder/decoder -----------------------------------------------------------
    def pre_acts(
        self, x: torch.Tensor, xc: torch.Tensor | None = None, relu: bool = True
    ) -> torch.Tensor:
        """relu((x - b_dec) W_enc + b_enc) for x already normalised [batch, d_sae]; xc: x -
        b_dec, if known."""
        # the bias inside the product and relu in place: no [batch, d_sae] copies
        a = torch.addmm(self.b_enc, x - self.b_dec if xc is None else xc, self.W_enc)
        return a.relu_() if relu else a

    def select(self, a: torch.Tensor, mode: str | None = None, step: Step = PLAIN) -> Selection:
        """The active entries of pre-activations a [batch, d_sae] in code `mode` ("train" in
        training; `step` says whether the batch is every rank's)."""
        raise NotImplementedError

    def activate(self, a: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Dense code from pre-activations (differentiable where the architecture is)."""
        return self._masked(a, self.select(a, mode))

    @staticmethod
    def _masked(a: torch.Tensor, sel: Selection) -> torch.Tensor:
        mask = torch.zeros_like(a, dtype=torch.bool)
        mask[sel.rows, sel.cols] = True
        return a * mask

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs [batch, d_in] checked and normalised, as the encoder takes them."""
        return self.normalize_input(self._check_input(x))[0]

    def encode(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Code [batch, d_sae] for inputs [batch, d_in] (input space)."""
        return self.activate(self.pre_acts(self.prepare(x)), mode)

    def decode(self, z: torch.Tensor, ctx=None) -> torch.Tensor:
        """Reconstruction in input space. Pass the context from normalize_input for
        normalize='token'."""
        if self.cfg.normalize == "token" and ctx is None:
            raise SAEConfigError(
                "decode() of a normalize='token' SAE needs the per-token context; use forward()"
            )
        return self.denormalize(z @ self.W_dec + self.b_dec, ctx)

    def forward(self, x: torch.Tensor, mode: str | None = None) -> ForwardOutput:
        xs, ctx = self.normalize_input(self._check_input(x))
        z = self.activate(self.pre_acts(xs), mode)
        return ForwardOutput(z, self.denormalize(z @ self.W_dec + self.b_dec, ctx))

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise SAEConfigError(
                f"input has last dimension {x.shape[-1]} but this SAE has d_in={self.cfg.d_in}; "
                f"train or load an SAE for this hook point's width"
            )
        if not x.is_floating_point():
            raise SAEConfigError(
                f"input dtype {x.dtype} is not floating point; pass activations as float tensors"
            )
        return x.to(self.W_dec.dtype)  # (W_enc is a view made on each access)

    # -- training ------------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor, step: Step = PLAIN, fast: bool = True):
        """The loss on a batch of inputs (input space): by the sparse path where the architecture
        has one and fast=True, else by `reference_loss`; both give the same loss and gradients.
        Returns saekit.sae.fast's TrainOutput with the path it took (`path`)."""
        return training_loss(self, x, step, enabled=fast)

    def reference_loss(self, x: torch.Tensor, step: Step = PLAIN) -> TrainOutput:
        """The loss with dense matrices throughout: encode, select, decode, the sparsity term,
        AuxK."""
        xs = self.prepare(x)
        dead = self.aux_dead_mask(step)
        a = self.pre_acts(xs)
        z, cut = self.train_code(a, step)
        x_hat = z @ self.W_dec + self.b_dec
        aux = None
        # AuxK: each row's k_aux largest dead pre-activations reconstruct the residual
        if dead is not None:
            aux = F.mse_loss(self.aux_code(a, *dead) @ self.W_dec, (xs - x_hat).detach())
        active = z != 0
        return self.train_output(
            xs,
            x_hat,
            mse=self.recon_loss(xs, x_hat, z),
            sparsity=self.sparsity_loss(a, z, step),
            aux=aux,
            fired=active.any(0),
            l0=active.sum(-1),
            cut=cut,
        )

    def train_output(
        self,
        xs,
        x_hat,
        *,
        mse,
        fired,
        l0,
        sparsity=None,
        aux=None,
        cut=None,
    ) -> TrainOutput:
        """A path's loss terms as a TrainOutput (sparsity None: no such term)."""
        loss = mse if sparsity is None else mse + sparsity
        if aux is not None:  # AuxK runs on one step in aux_every: weighted to match
            loss = torch.add(loss, aux, alpha=self.cfg.aux_alpha * self.cfg.aux_every)
        zero = None if sparsity is not None and aux is not None else xs.new_zeros(())
        terms = {
            "mse": mse.detach(),
            "sparsity": zero if sparsity is None else sparsity.detach(),
            "aux": zero if aux is None else aux.detach(),
        }
        return TrainOutput(loss, terms, x_hat, xs, fired, l0, cut)

    def train_code(
        self, a: torch.Tensor, step: Step = PLAIN
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference path's differentiable code from pre-activations, and the selection's
        cut."""
        sel = self.select(a, "train", step)
        return self._masked(a, sel), sel.cut

    def sparsity_loss(
        self, a: torch.Tensor, z: torch.Tensor, step: Step = PLAIN
    ) -> torch.Tensor | None:
        """The sparsity term from pre-activations a and code z; None: none (the TopK family)."""
        return None

    def recon_loss(self, xs: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction term: the mean squared error per element (z: the code, for
        architectures whose term looks inside it)."""
        return F.mse_loss(x_hat, xs)

    # -- around the optimiser step ------------------------------------------------------------
    def optim_groups(self) -> list[dict]:
        """Parameter groups for the optimiser; `lr_scale` multiplies the run's learning rate."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    @torch.no_grad()
    def init_from_data(self, xs: torch.Tensor) -> None:
        """Architecture-specific initialisation from a normalised sample (after b_dec is set)."""

    @torch.no_grad()
    def after_step(self, out: TrainOutput) -> dict:
        """Architecture-specific updates after an optimiser step (BatchTopK's θ), and figures to
        log."""
        return {}

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each decoder row's gradient parallel to the row."""
        if self.W_dec.grad is None:
            return
        W, g = self.W_dec.data, self.W_dec.grad
        coef = torch.linalg.vecdot(g, W) / torch.linalg.vector_norm(W, dim=-1).square().clamp_min(
            1e-24
        )
        g.addcmul_(W, coef[:, None], value=-1)  # in place: no [d_sae, d_in] temporaries

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data.div_(
            torch.linalg.vector_norm(self.W_dec.data, dim=-1, keepdim=True).clamp_min(1e-12)
        )

    # -- files --------------------------------------------------------------------------------
    @property
    def l0_target(self) -> float | None:
        """The L0 this SAE aims at: JumpReLU's target, else k where the architecture has one
        (None: neither)."""
        return self.cfg.target_l0 or (self.cfg.k if self.has_k else None)

    def inference_threshold(self) -> torch.Tensor | None:
        """Per-latent (or one global) threshold used at inference (JumpReLU-style), or None."""
        return None

    @torch.no_grad()
    def load_threshold(self, threshold: torch.Tensor) -> None:
        """Take the `threshold` tensor of a file (architectures with an inference threshold)."""

    @torch.no_grad()
    def weights(self) -> dict[str, torch.Tensor]:
        """W_enc, b_enc, W_dec, b_dec (and `threshold` where there is one) on the CPU in float32."""
        state = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        thr = self.inference_threshold()
        if thr is not None:
            state["threshold"] = thr.expand(self.cfg.d_sae)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def save(self, folder: str | Path) -> Path:
        """Write cfg.json + sae_weights.safetensors (SAELens's inference layout), atomically."""
        folder = Path(folder)
        scale = float(self.input_scale) if self.cfg.normalize == "dataset" else None
        cfg, state = formats.to_saelens(
            self.cfg, self.weights(), input_scale=scale, theta_info=self.theta_info
        )
        atomic_write_bytes(
            folder / formats.WEIGHTS_FILE,
            lambda fh: fh.write(safetensors_bytes(state, metadata={"format": "pt"})),
        )
        atomic_write_json(folder / formats.CFG_FILE, cfg)
        return folder
