"""The main job, ``python -m rnnt_xla demo``: a spoken-digit recogniser trained with the rnnt_xla loss in
PyTorch and in JAX/Flax.

``python -m rnnt_xla demo [--data speech|synthetic] [--steps N] [--framework torch|jax|both] [--loss rnnt|fused|tdt]
[--out DIR]`` (``--loss fused``: the joiner runs inside ``fused_rnnt_loss``, tile by tile;
``--loss tdt``: a Token-and-Duration Transducer, the joiner also scores durations 0-4, ``tdt_loss``, greedy
decoding skips frames by the predicted durations)

- :mod:`~rnnt_xla.demo.speech`: a corpus of spoken digit strings synthesised with eSpeak NG (optional
  ``demo`` extra, GPL-3.0, loaded at run time only) and its log-mel features, cached on disk;
- :mod:`~rnnt_xla.demo.data`: padded batches, the synthetic task (``--data synthetic``, fast) and a fixed
  corpus;
- :mod:`~rnnt_xla.demo.models`: the transducer (conv subsampling + GRU encoder, embedding + GRU
  predictor, joiner) in PyTorch and in Flax, trained on the same batches with the rnnt_xla loss;
- :mod:`~rnnt_xla.demo.decoding`: greedy decoding, error rates and the alignment posterior (numpy);
- :mod:`~rnnt_xla.demo.plots`: loss curves and the alignment picture (matplotlib);
- :mod:`~rnnt_xla.demo.cli`: the command (progress bars, summary table, ``results.json``, figures).
"""

from rnnt_xla.demo.data import BLANK, Batch, Corpus, SyntheticTask
from rnnt_xla.demo.decoding import (alignment_posterior, edit_distance, greedy_alignments, greedy_decode,
                                    greedy_tdt_alignments, label_error_rate, sequence_error_rate)
from rnnt_xla.demo.cli import main
from rnnt_xla.demo.models import (ModelConfig, align_jax, align_torch, decode_jax, decode_torch, encoded_lengths,
                                  flax_transducer, torch_transducer, train_jax, train_torch)

__all__ = ["BLANK", "Batch", "Corpus", "SyntheticTask", "alignment_posterior", "edit_distance", "greedy_alignments",
           "greedy_decode", "greedy_tdt_alignments", "label_error_rate", "sequence_error_rate", "main", "ModelConfig",
           "align_jax", "align_torch", "decode_jax", "decode_torch", "encoded_lengths", "flax_transducer",
           "torch_transducer", "train_jax", "train_torch"]
