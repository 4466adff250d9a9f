"""Training checkpoints: every SAE's weights and optimiser state, the RNG and the run's progress,
published atomically (a whole folder renamed into place) and without pickle (safetensors + JSON);
the run folder checked and locked before the work, and a checkpoint resumed only by the run that
made it."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..plumbing.files import prepare_output, refuse_overlap
from ..plumbing.locks import writer_lock


def _optim_to_tensors(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k, v in st.items():
            out[f"{i}.{k}"] = (
                v.detach().cpu().contiguous().clone() if torch.is_tensor(v) else torch.tensor(v)
            )
    return out


def _optim_from_tensors(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], t: dict
) -> None:
    for i, p in enumerate(params):
        # moments take the parameter's memory layout (fused Adam walks param, grad and moments as
        # flat memory); checkpoints of saekit <= 0.1 kept the encoder as [d_in, d_sae]: its moments
        # come back transposed
        def moment(v, p=p):
            if v.shape != p.shape and v.ndim == 2 and v.shape == p.shape[::-1]:
                v = v.t()
            return torch.empty_like(p).copy_(v) if v.shape == p.shape else v.to(p.device)

        st = {k.split(".", 1)[1]: moment(v) for k, v in t.items() if k.split(".", 1)[0] == str(i)}
        if st:
            if "step" in st:  # fused Adam keeps its step count on the parameter's device
                st["step"] = st["step"].to(p.device if opt.defaults.get("fused") else "cpu")
            opt.state[p] = st


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root (a half-written one is a hidden .tmp folder,
    never picked)."""
    if not root.exists():
        return None
    good = [p for p in sorted(root.glob("step_*")) if (p / "state.json").exists()]
    return good[-1] if good else None


def write(
    root: Path, step: int, saes, opts, device: torch.device, progress: dict, keep: int = 2
) -> Path:
    """Write root/step_NNNNNNNN (weights, optimiser state, RNG, `progress` as state.json)
    atomically; keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for i, (sae, opt) in enumerate(zip(saes, opts)):
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()},
            str(tmp / f"sae_{i}.safetensors"),
        )
        save_file(
            _optim_to_tensors(opt, list(sae.parameters())), str(tmp / f"optim_{i}.safetensors")
        )
    rng = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(progress))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic publish of the whole checkpoint
    olds = sorted(p for p in root.glob("step_*") if p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def progress(path: Path) -> dict:
    """The run's progress saved with a checkpoint (step, tokens, configs, logs)."""
    return json.loads((path / "state.json").read_text())


def restore(path: Path, saes, opts, device: torch.device) -> None:
    """Load every SAE's weights and optimiser state and the RNG from a checkpoint."""
    for i, (sae, opt) in enumerate(zip(saes, opts)):
        sae.load_state_dict(
            {k: v.to(device) for k, v in load_file(str(path / f"sae_{i}.safetensors")).items()}
        )
        _optim_from_tensors(
            opt, list(sae.parameters()), load_file(str(path / f"optim_{i}.safetensors"))
        )
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["torch_cuda"], device)


# -- the run folder: claimed before the work, resumed only by the run that started it --------------


def output_bytes(cfgs, keep: int) -> int:
    """About the most a run's folder holds at once: per SAE its weights with Adam's two moments in
    `keep` checkpoints and one being written, and the final weights."""
    params = sum(2 * c.d_in * c.d_sae + c.d_sae + c.d_in for c in cfgs)
    return 4 * params * (3 * (keep + 1) + 1)


def claim_output(held: contextlib.ExitStack, out: Path, cfgs, keep: int, data=None) -> None:
    """Check the run folder `out` (apart from the training `data`'s path; a folder, writable, with
    room for output_bytes) and hold its writer lock until `held` closes: a second training into it
    is refused."""
    refuse_overlap(out, {"training data": data}, "training output folder")
    prepare_output(out, output_bytes(cfgs, keep), "training output folder")
    held.enter_context(writer_lock(out, "train"))


# what a resumed run must share with the run that wrote the checkpoint: everything that changes
# the trajectory's arithmetic (docs/reliability.md); the name each difference is reported under
RESUME_KEYS = {
    "data": "the training data",
    "seed": "--seed",
    "total_tokens": "--tokens",
    "batch_size": "--batch-size",
    "lrs": "--lr (each SAE's learning rate)",
    "warmup_steps": "--warmup-steps",
    "decay_frac": "decay_frac (the learning rate's decay)",
    "betas": "betas (Adam's)",
    "grad_clip": "grad_clip",
    "b_dec_init": "b_dec_init",
    "init_tokens": "init_tokens",
    "buffer_rows": "buffer_rows (the shuffle buffer, which orders the batches)",
    "calibrate_batches": "calibrate_batches (theta's final estimate)",
    "autocast": "--precision (each SAE's; pass the one the run started with)",
    "sae_cfgs": "the SAE settings (AuxK's among them)",
}
# what may change between the segments of one run: how the same arithmetic is computed, or
# nothing about it; each segment's values are recorded in train_config.json
SEGMENT_KEYS = ("device", "fast", "sync_free", "step_graphs", "prefetch", "checkpoint_every")


def run_identity(source, train_cfg, cfgs, lrs, autocasts) -> dict:
    """What a checkpoint may only be resumed with (RESUME_KEYS): the data's identity, the
    schedule, the precision and the SAE configs."""
    tc = train_cfg.to_dict()
    return {
        "data": source.identity(),
        **{k: tc[k] for k in RESUME_KEYS if k in tc},
        "lrs": [float(lr) for lr in lrs],
        "autocast": ["bf16" if a else "fp32" for a in autocasts],
        "sae_cfgs": [c.to_dict() for c in cfgs],
    }


def segment(train_cfg, device, step: int) -> dict:
    """One stretch of a run, from `step`: the settings in SEGMENT_KEYS it was computed with."""
    import datetime

    tc = train_cfg.to_dict()
    return {
        "from_step": step,
        "to_step": step,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{k: tc[k] for k in SEGMENT_KEYS if k != "device"},
        "device": str(device),
    }


def check_resume(path: Path, saved: dict, now: dict) -> None:
    """TrainingError naming every difference between the run a checkpoint was made in and this one
    (a checkpoint older than these records has only its SAE configs checked)."""
    diff = list(_differences(saved, now))
    if diff:
        from .config import TrainingError

        raise TrainingError(
            f"checkpoint {path} was made by another run ({'; '.join(diff)}). Resume with the same "
            f"data and settings, or train into a new --out folder (--no-resume starts afresh)"
        )


def _differences(saved: dict, now: dict):
    for key, name in RESUME_KEYS.items():
        if key not in saved:
            continue
        then, new = saved[key], now[key]
        if key == "data" and "fields" in then and "fields" in new:  # a stream: field by field
            a, b = then["fields"], new["fields"]
            yield from (
                f"the stream's {f}: {a.get(f)} then, {b.get(f)} now"
                for f in sorted(set(a) | set(b))
                if a.get(f) != b.get(f)
            )
        elif key == "data":  # the same values wherever they now lie
            if then.get("sha256") != new.get("sha256"):
                yield f"{name}: {_data(then)} then, {_data(new)} now"
        elif key == "sae_cfgs" and len(then) != len(new):
            yield f"{name}: {len(then)} SAEs then, {len(new)} now"
        elif key == "sae_cfgs":
            for i, (a, b) in enumerate(zip(then, new)):
                yield from (
                    f"SAE {i}'s {f}: {a.get(f)} then, {b.get(f)} now"
                    for f in sorted(set(a) | set(b))
                    if a.get(f) != b.get(f)
                )
        elif then != new:
            yield f"{name}: {then} then, {new} now"


def _data(identity: dict) -> str:
    return (
        f"{identity.get('kind')} {identity.get('where', '')} ({str(identity.get('sha256'))[:12]})"
    )
