"""Resumable training checkpoints: what a killed train run needs to carry on where it stopped.

A checkpoint directory holds the trainable weights (current and best so far) in safetensors,
the optimizer, scheduler and RNG states in a tensors-only torch file (loaded with
weights_only=True, so it cannot run code), and the loop's counters as JSON. It is stamped with a
fingerprint of everything the run's result depends on (params, data, base model); a checkpoint
with another fingerprint is never reused. It is written atomically, so a kill while saving
leaves the previous checkpoint intact.

It is a cache, not an output: it lives outside DVC (git-ignored), and anything wrong with it
(unreadable, from other params) means starting over, with a warning, never a failed stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from stages.lib.io import atomic_dir, read_json, sha256_files, write_json

log = logging.getLogger("qlora")

WEIGHTS, STATES, PROGRESS = "weights.safetensors", "states.pt", "progress.json"


def fingerprint(values: Mapping[str, Any], inputs: Iterable[Path]) -> str:
    """sha256 over the params values and the content of each input file, or of every file
    under an input directory."""
    h = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    for root in sorted(Path(p) for p in inputs):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path, digest in zip(files, sha256_files(files)):
            name = path.relative_to(root) if root.is_dir() else path.name  # the same run in a copied repo matches
            h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()


def rng_states() -> dict[str, Any]:
    """The global RNG states the loop draws from: torch (dropout) and Python's."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Checkpoint:
    """Save and restore a training loop's state in `directory`, for runs with `stamp`."""

    def __init__(self, directory: str | Path, stamp: str):
        self.directory, self.stamp = Path(directory), stamp

    def save(self, tensors: Mapping[str, torch.Tensor], states: Mapping[str, Any],
             progress: Mapping[str, Any]) -> None:
        """`tensors`: weights by name; `states`: state dicts and tensors; `progress`: JSON values."""
        from safetensors.torch import save_file

        with atomic_dir(self.directory) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            torch.save(dict(states), tmp / STATES)
            write_json(tmp / PROGRESS, {**progress, "fingerprint": self.stamp})

    def load(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
        """(tensors, states, progress) of a checkpoint made with the same stamp, else None."""
        from safetensors.torch import load_file

        if not (self.directory / PROGRESS).is_file():
            return None
        try:
            progress = read_json(self.directory / PROGRESS)
            if progress.get("fingerprint") != self.stamp:
                log.warning("checkpoint %s was made with other params, data or base model: "
                            "starting over", self.directory)
                return None
            tensors = load_file(str(self.directory / WEIGHTS), device=str(device))
            states = torch.load(self.directory / STATES, map_location="cpu", weights_only=True)
        except Exception as e:  # a cache: any damage means starting over, never a wrong resume
            log.warning("checkpoint %s is unreadable (%s): starting over", self.directory,
                        str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            return None
        return tensors, states, progress

    def remove(self) -> None:
        """Drop the checkpoint once the run it belongs to has finished."""
        import shutil

        if self.directory.exists():
            shutil.rmtree(self.directory)
