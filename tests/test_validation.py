"""Every bad input raises TypeError/ValueError naming the argument, before any kernel runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rnnt_xla.kernels import cpu
from rnnt_xla.torch import rnnt_loss


def good_inputs():
    torch.manual_seed(0)
    return dict(
        logits=torch.randn(2, 5, 4, 6),
        targets=torch.tensor([[1, 2, 3], [4, 5, 9]], dtype=torch.int32),  # 9 is padding past length 2
        logit_lengths=torch.tensor([5, 3], dtype=torch.int32),
        target_lengths=torch.tensor([3, 2], dtype=torch.int32),
    )


def with_(**changes):
    inputs = good_inputs()
    inputs.update(changes)
    return inputs


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD_INPUTS = {
    # name: (inputs, options, exception, argument named in the message, expected fragment)
    "logits rank 3": (with_(logits=torch.randn(2, 5, 4)), {}, ValueError, "logits", "4 dimensions"),
    "logits int": (with_(logits=torch.zeros(2, 5, 4, 6, dtype=torch.int32)), {}, TypeError, "logits", "float32"),
    "logits numpy": (with_(logits=torch.randn(2, 5, 4, 6).numpy()), {}, TypeError, "logits", "torch.Tensor"),
    "logits empty vocab": (with_(logits=torch.randn(2, 5, 4, 0)), {}, ValueError, "logits", "non-empty"),
    "targets rank 1": (with_(targets=i32(1, 2, 3)), {}, ValueError, "targets", "2 dimensions"),
    "targets float": (with_(targets=torch.ones(2, 3)), {}, TypeError, "targets", "int32"),
    "targets batch": (with_(targets=torch.ones(3, 3, dtype=torch.int32)), {}, ValueError, "targets", "batch size 2"),
    "logit_lengths float": (with_(logit_lengths=torch.tensor([5.0, 3.0])), {}, TypeError, "logit_lengths", "integer"),
    "logit_lengths rank 2": (with_(logit_lengths=i32(5, 3)[None]), {}, ValueError, "logit_lengths", "1 dimension"),
    "logit_lengths batch": (with_(logit_lengths=i32(5, 3, 2)), {}, ValueError, "logit_lengths", "batch size 2"),
    "logit_lengths zero": (with_(logit_lengths=i32(5, 0)), {}, ValueError, "logit_lengths", "[1, 5]"),
    "logit_lengths above T": (with_(logit_lengths=i32(6, 3)), {}, ValueError, "logit_lengths", "[1, 5]"),
    "target_lengths bool": (with_(target_lengths=torch.tensor([True, True])), {}, TypeError, "target_lengths", "int"),
    "target_lengths batch": (with_(target_lengths=i32(3)), {}, ValueError, "target_lengths", "batch size 2"),
    "target_lengths negative": (with_(target_lengths=i32(3, -1)), {}, ValueError, "target_lengths", "[0, 3]"),
    "target_lengths above U": (with_(target_lengths=i32(4, 2)), {}, ValueError, "target_lengths", "U = logits"),
    "target_lengths above width": (with_(targets=torch.ones(2, 2, dtype=torch.int32)), {}, ValueError,
                                   "target_lengths", "targets.shape[1] = 2"),
    "label >= V": (with_(targets=torch.tensor([[1, 6, 3], [4, 5, 0]])), {}, ValueError, "targets", "targets[0, 1] = 6"),
    "label negative": (with_(targets=torch.tensor([[1, 2, 3], [-1, 5, 0]])), {}, ValueError, "targets", "[0, 6)"),
    "blank too large": (good_inputs(), dict(blank=6), ValueError, "blank", "[-6, 6)"),
    "blank too negative": (good_inputs(), dict(blank=-7), ValueError, "blank", "[-6, 6)"),
    "blank float": (good_inputs(), dict(blank=1.0), TypeError, "blank", "int"),
    "clamp string": (good_inputs(), dict(clamp="1"), TypeError, "clamp", "real number"),
    "clamp nan": (good_inputs(), dict(clamp=float("nan")), ValueError, "clamp", "NaN"),
    "fastemit negative": (good_inputs(), dict(fastemit_lambda=-0.1), ValueError, "fastemit_lambda", ">= 0"),
    "fastemit inf": (good_inputs(), dict(fastemit_lambda=float("inf")), ValueError, "fastemit_lambda", "finite"),
    "fastemit None": (good_inputs(), dict(fastemit_lambda=None), TypeError, "fastemit_lambda", "real number"),
    "reduction unknown": (good_inputs(), dict(reduction="avg"), ValueError, "reduction", "'mean'"),
    "fused not bool": (good_inputs(), dict(fused_log_softmax="yes"), TypeError, "fused_log_softmax", "bool"),
    "devices differ": (with_(targets=good_inputs()["targets"].to("meta")), {}, ValueError, "targets on meta", "same device"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case, monkeypatch):
    inputs, options, exc, name, fragment = BAD_INPUTS[case]

    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("a kernel ran on invalid input")

    monkeypatch.setattr(cpu, "forward", kernel_must_not_run)
    with pytest.raises(exc) as info:
        rnnt_loss(**inputs, **options)
    message = str(info.value)
    assert message.startswith(name) or name in message, message
    assert fragment in message, message


def test_padding_labels_are_ignored_whatever_they_hold():
    inputs = good_inputs()
    loss = rnnt_loss(**inputs, reduction="none")
    inputs["targets"][1, 2] = -12345
    assert torch.equal(rnnt_loss(**inputs, reduction="none"), loss)


def test_worst_inputs_raise_in_a_subprocess_instead_of_crashing():
    """Out-of-range lengths and labels would read outside the arrays if they reached a kernel."""
    script = """
import torch
from rnnt_xla.torch import rnnt_loss
cases = [
    dict(logit_lengths=torch.tensor([10**6, 3])),
    dict(target_lengths=torch.tensor([10**6, 2])),
    dict(targets=torch.tensor([[1, 2, 10**9], [4, 5, 0]])),
    dict(targets=torch.tensor([[1, 2, -10**9], [4, 5, 0]])),
]
for case in cases:
    inputs = dict(logits=torch.randn(2, 5, 4, 6, requires_grad=True), targets=torch.tensor([[1, 2, 3], [4, 5, 0]]),
                  logit_lengths=torch.tensor([5, 3]), target_lengths=torch.tensor([3, 2]))
    inputs.update(case)
    try:
        rnnt_loss(**inputs).backward()
    except ValueError as e:
        print("ValueError", str(e).split()[0])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [
        "ValueError logit_lengths", "ValueError target_lengths", "ValueError targets", "ValueError targets"
    ]
