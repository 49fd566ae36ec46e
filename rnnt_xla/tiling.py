"""How the fused joint + loss cuts a batch into tiles (framework-neutral, numpy only).

The fused loss never holds the ``(B, T, U+1, V)`` logits: it evaluates the joint network on one tile of
utterances and frames at a time, once in the forward pass (row normalisers, blank and label
log-probabilities) and once more in the backward pass (the gradient of that tile's logits). A tile is a set
of utterances and a range of frames; its logits are ``(b, t1 - t0, positions, V)``, where ``positions`` is
the longest target length of its utterances plus one, so the padding of the batch is never evaluated.

Utterances are taken longest first (frames, then labels), so that utterances of similar length share a tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_TILE_BYTES", "DEFAULT_CUDA_TILE_BYTES", "default_tile_bytes", "Tile", "plan_tiles"]

# CPU: a tile whose logits stay in the caches is cheaper to normalise and to write the gradient of, and the
# joint's products still run at full speed (a 16 MB tile of V=1024 float32 logits is 4K (b, t, u) rows, a
# (4K, joint_dim) @ (joint_dim, V) product). A fwd+bwd's peak is six to nine tiles' worth (the tile's logits,
# their gradient and the joint's activations). Measured on a quiet 2-core Xeon (benchmarks/results/
# joint_tiles_vm_quiet.md, joint_vm_mid_quiet.md): step time vs unfused 0.75x / 0.78x / 0.88x / 0.88x with
# 8 / 16 / 32 / 64 MB tiles at (4, 300, 80, 512, 1024); at (16, 300, 80, 512, 1024) 1.02x and 1/21 of the
# unfused peak RSS with 16 MB, 1.21x and 1/10.3 with 32 MB.
DEFAULT_TILE_BYTES = 16 << 20
# CUDA: a GPU needs far larger products to be busy, and each tile costs a few kernel launches and host-side
# work; not yet measured on a GPU (none was lent), so a guess: 256 MB, about 1/20 of an H200's 141 GB.
DEFAULT_CUDA_TILE_BYTES = 256 << 20


def default_tile_bytes(on_gpu: bool) -> int:
    """The ``tile_bytes`` the fused losses use when the caller gives none: CPU or CUDA."""
    return DEFAULT_CUDA_TILE_BYTES if on_gpu else DEFAULT_TILE_BYTES


@dataclass(frozen=True)
class Tile:
    """One tile: utterances ``utterances`` (indices into the batch), frames ``[t0, t1)``, label positions
    ``[0, positions)``."""

    utterances: np.ndarray  # (b,) int64
    t0: int
    t1: int
    positions: int

    def logits_shape(self, vocab: int) -> tuple[int, int, int, int]:
        return (len(self.utterances), self.t1 - self.t0, self.positions, vocab)


def plan_tiles(logit_lengths: np.ndarray, target_lengths: np.ndarray, vocab: int, itemsize: int,
               tile_bytes: int) -> list[Tile]:
    """Tiles covering every used ``(b, t, u)`` cell once, each tile's logits at most ``tile_bytes``.

    Args:
        logit_lengths, target_lengths: ``(B,)`` int, already validated.
        vocab: V, the joint's output size; itemsize: bytes per logit.
        tile_bytes: the most bytes one tile's logits may take.

    Whole utterances are grouped while the group's logits fit; an utterance that does not fit alone is
    split along its frames. Raises ``ValueError`` if not even one frame of one utterance fits.
    """
    frames = np.asarray(logit_lengths, dtype=np.int64)
    positions = np.asarray(target_lengths, dtype=np.int64) + 1
    order = np.lexsort((-positions, -frames))  # longest first: frames, then labels
    tiles: list[Tile] = []
    i = 0
    while i < len(order):
        first = order[i]
        row_bytes = int(positions[first]) * vocab * itemsize  # one frame of one utterance
        if row_bytes > tile_bytes:
            raise ValueError(
                f"tile_bytes must hold at least one frame of one utterance: {row_bytes} bytes "
                f"((U_b + 1) * V * itemsize for utterance {first}), got tile_bytes={tile_bytes}")
        T_first = int(frames[first])
        if T_first * row_bytes > tile_bytes:  # a long utterance alone: split its frames
            step = tile_bytes // row_bytes
            for t0 in range(0, T_first, step):
                tiles.append(Tile(order[i:i + 1].copy(), t0, min(t0 + step, T_first), int(positions[first])))
            i += 1
            continue
        j, width = i + 1, int(positions[first])
        while j < len(order):  # frames only shrink along the order; the tile's width may grow
            grown = max(width, int(positions[order[j]]))
            if (j + 1 - i) * T_first * grown * vocab * itemsize > tile_bytes:
                break
            j, width = j + 1, grown
        tiles.append(Tile(order[i:j].copy(), 0, T_first, width))
        i = j
    return tiles
