"""A capture's folder across runs: started afresh, or an interrupted capture of the same tokens
checked and its finished shards (those with a completion record) folded into the manifest."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import PackedTokens
from ..plumbing.checks import whole_number
from ..plumbing.files import atomic_save_npy, atomic_write_json, require_space
from .manifest import StoreError, hook_file, read_manifest


def plan_shards(n_seq: int, shard_sequences: int) -> list[tuple[int, int]]:
    """[start, end) sequences of each shard: whole sequences, shard_sequences at a time."""
    return [(s, min(s + shard_sequences, n_seq)) for s in range(0, n_seq, shard_sequences)]


def open_or_start(
    out: Path, manifest: dict, packed: PackedTokens, overwrite: bool, need_bytes: int
) -> dict:
    """Rank 0: check a store already at `out` is this capture and fold in its finished shards, or
    start one (after checking the folder takes the store's size)."""
    mpath = out / "manifest.json"
    if mpath.exists() and not overwrite:
        old = read_manifest(out)
        if not (whole_number(old.get("shard_sequences")) or 0) >= 1:
            raise StoreError(
                f"{mpath} is corrupt: field 'shard_sequences' is {old.get('shard_sequences')!r}, "
                "expected a whole number of at least 1. Capture into a new folder, or pass "
                "--overwrite to start this one again"
            )
        # what was captured, not how it was split
        keys = ("model", "hooks", "dtype", "seq_len", "tokens_sha256")
        diff = [k for k in keys if old.get(k) != manifest[k]]
        if diff:
            raise StoreError(
                f"{out} already holds a different capture (differs in: {', '.join(diff)}). Choose "
                "another output folder, or pass overwrite=True (--overwrite) to replace it."
            )
        for stale in out.glob("shards/.*.tmp"):  # a write a kill cut short
            stale.unlink(missing_ok=True)
        return (
            old
            if old.get("complete")
            else fold_done(out, old, len(plan_shards(old["n_sequences"], old["shard_sequences"])))
        )
    if overwrite and out.exists():
        for p in list(out.glob("shards/*.npy")) + list(out.glob("shards/*.done.json")) + [mpath]:
            p.unlink(missing_ok=True)
    require_space(out, need_bytes)  # the folder itself was checked before the lock was taken
    atomic_save_npy(out / "tokens.npy", packed.tokens)
    atomic_save_npy(out / "doc_ids.npy", packed.doc_ids)
    atomic_write_json(mpath, manifest)
    return manifest


def _done_record(path: Path) -> dict | None:
    """A shard's completion record, or None where it is damaged (its shard is then captured
    again)."""
    try:
        rec = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    keys = ("index", "seq_start", "seq_end", "n_rows", "d_model")
    whole = isinstance(rec, dict) and all(whole_number(rec.get(k)) is not None for k in keys)
    return rec if whole and rec["n_rows"] >= 0 and rec["d_model"] >= 1 else None


def fold_done(out: Path, manifest: dict, n_plan: int) -> dict:
    """Rank 0: the manifest with every shard that has a completion record (and all its files),
    written atomically."""
    listed = {s["index"] for s in manifest["shards"]}
    shards = list(manifest["shards"])
    for rec_path in sorted(out.glob("shards/*.done.json")):
        rec = _done_record(rec_path)
        # a damaged record, or another capture's shard: captured again
        if rec is None or rec.get("tokens_sha256") != manifest["tokens_sha256"]:
            continue
        i = rec["index"]
        files = [
            out / "shards" / f"{i:05d}.{hook_file(h)}.npy" for h in manifest["hooks"] + ["pos"]
        ]
        if i not in listed and all(f.exists() for f in files):
            shards.append(
                {k: rec[k] for k in ("index", "seq_start", "seq_end", "n_rows", "tokens_sha256")}
            )
            manifest["d_model"] = rec["d_model"]
    shards.sort(key=lambda x: x["index"])
    manifest = {
        **manifest,
        "shards": shards,
        "n_rows": sum(x["n_rows"] for x in shards),
        "complete": len(shards) == n_plan,
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
