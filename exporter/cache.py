"""An on-disk cache for expensive per-layer results (SVDs, collected statistics), so a rerun resumes.

Keys are content hashes of everything the result depends on: for an SVD the matrix itself; for a method's
statistics (activations, gradients, importance scores, relearned weights) the method, the model's fingerprint,
the calibration data's hash, the layers and their planned ranks. A stale entry can never serve other inputs.
Entries are safetensors files written atomically (temporary file + rename): an interrupted write leaves no
entry, never a torn one.
Location: `<cache dir>/tensors/` (see models.cache_dir: `$EDGESLIM_CACHE`, else `~/.cache/edgeslim`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "v3"  # bump when what a key's computation returns changes
ALIAS = "@"  # flatten: "layer/@owner" means layer shares owner's statistics
# Free disk an entry may not eat into: the export's own files come after the cache's (a Llama-2-7B export writes
# about 12 GB of graph data), and a factorizing plan at 7B width would cache about 1.4 GB of bases a block.
RESERVE_BYTES = 16 << 30
HASH_CHUNK = 1 << 24  # bytes hashed at once


class TensorCache:
    """`folder` None disables caching (`--no-cache`): every call computes."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.hits = 0
        self.misses = 0
        self.skipped = 0  # entries not written: the disk would have kept less than RESERVE_BYTES free

    def get_or_compute(self, parts: tuple[str | torch.Tensor, ...],
                       compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The entry keyed by `parts` (see `tensor_key`), computed and stored when missing. The key is hashed only
        when caching: at a 7B model's widths a layer's Gram matrix is 0.48 GB, a second of hashing."""
        if self.folder is None:
            return compute()
        path = self.folder / f"{tensor_key(*parts)}.safetensors"
        if path.is_file():
            try:
                result = load_file(path)
                self.hits += 1
                return result
            except Exception:  # a damaged entry is recomputed, never trusted
                path.unlink(missing_ok=True)
        result = compute()
        self.misses += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        size = sum(v.numel() * v.element_size() for v in result.values())
        if shutil.disk_usage(self.folder).free - size < RESERVE_BYTES:
            self.skipped += 1  # the run goes on uncached rather than fill the disk its export needs
            return result
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.folder)
        os.close(handle)
        try:
            save_file({k: v.contiguous() for k, v in result.items()}, tmp)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)  # a full disk costs the cache entry, not the run
        return result


def tensor_key(*parts: str | torch.Tensor) -> str:
    """A hash of strings and tensors' exact bytes (dtype and shape included)."""
    h = hashlib.sha256(FORMAT.encode())
    for part in parts:
        if isinstance(part, torch.Tensor):
            data = part.detach().contiguous().cpu()
            h.update(f"{data.dtype}{tuple(data.shape)}".encode())
            for chunk in data.reshape(-1).view(torch.uint8).split(HASH_CHUNK):  # copied a chunk at a time: a
                h.update(chunk.clone().numpy())  # whole copy is 0.48 GB at a 7B model's widths, and a tensor
                # handed to numpy itself can no longer be freed in place (exporter.quantize's consume)
        else:
            h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def flatten(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-layer statistics as one flat mapping, "layer/field" -> tensor, the form a cache entry holds. Layers that
    share one entry (projections reading the same input) store it once: the others hold "layer/@owner"."""
    flat, owners, stored = {}, {}, set()
    for layer, fields in stats.items():
        owner = owners.setdefault(id(fields), layer)
        if owner != layer:
            flat[f"{layer}/{ALIAS}{owner}"] = torch.zeros(0)
            continue
        for field, value in fields.items():  # a tensor shared by two different entries is stored twice
            flat[f"{layer}/{field}"] = value.clone() if id(value) in stored else value
            stored.add(id(value))
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    stats: dict[str, dict[str, torch.Tensor]] = {}
    aliases = {}
    for key, value in flat.items():
        layer, _, field = key.rpartition("/")
        if field.startswith(ALIAS):
            aliases[layer] = field.removeprefix(ALIAS)
        else:
            stats.setdefault(layer, {})[field] = value
    for layer, owner in aliases.items():
        stats[layer] = stats[owner]
    return stats
