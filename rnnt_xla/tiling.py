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

__all__ = ["DEFAULT_TILE_BYTES", "Tile", "plan_tiles"]

# Large enough for the joint's matrix products to run at full speed (a 32 MB tile of V=1024 float32 logits is
# 8K (b, t, u) rows, an (8K, joint_dim) @ (joint_dim, V) product), small enough that a fwd+bwd's peak - six to
# nine tiles' worth: the tile's logits, their gradient and the joint's activations - stays about a tenth of the
# unfused peak at the sizes that need fusing. Measured (benchmarks/results/joint_vm_mid_tiles.md, joint_tiles_vm.md)
# at (16, 300, 80, 512, 1024): peak RSS growth 0.58 / 0.40 / 0.18 GB with 64 / 32 / 16 MB tiles against 4.01 GB
# unfused; round-robin step time 1.25x / 1.38x / 1.47x unfused (medians on a shared 2-core VM).
DEFAULT_TILE_BYTES = 32 << 20


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
