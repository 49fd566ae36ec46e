"""Every bad input raises TypeError/ValueError naming the argument, before any kernel runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from rnnt_xla.kernels import cpu
from rnnt_xla.torch import rnnt_loss


def good_inputs() -> dict[str, np.ndarray]:
    return dict(
        logits=np.random.default_rng(0).standard_normal((2, 5, 4, 6)).astype(np.float32),
        targets=np.array([[1, 2, 3], [4, 5, 9]], np.int32),  # 9 is padding past length 2
        logit_lengths=np.array([5, 3], np.int32),
        target_lengths=np.array([3, 2], np.int32),
    )


def with_(**changes):
    return {**good_inputs(), **changes}


def i32(*values):
    return np.array(values, np.int32)


f32 = np.float32
# Each case goes through both adapters (numpy arrays become torch tensors or JAX arrays).
BAD_INPUTS = {
    # name: (inputs, options, exception, argument named in the message, expected fragment)
    "logits rank 3": (with_(logits=np.zeros((2, 5, 4), f32)), {}, ValueError, "logits", "4 dimensions"),
    "logits rank 5": (with_(logits=np.zeros((2, 5, 4, 6, 1), f32)), {}, ValueError, "logits", "4 dimensions"),
    "logits int": (with_(logits=np.zeros((2, 5, 4, 6), np.int32)), {}, TypeError, "logits", "float32"),
    "logits complex": (with_(logits=np.zeros((2, 5, 4, 6), np.complex64)), {}, TypeError, "logits", "floating"),
    "logits empty vocab": (with_(logits=np.zeros((2, 5, 4, 0), f32)), {}, ValueError, "logits", "non-empty"),
    "logits empty frames": (with_(logits=np.zeros((2, 0, 4, 6), f32)), {}, ValueError, "logits", "non-empty"),
    "targets rank 1": (with_(targets=i32(1, 2, 3)), {}, ValueError, "targets", "2 dimensions"),
    "targets float": (with_(targets=np.ones((2, 3), f32)), {}, TypeError, "targets", "int32"),
    "targets batch": (with_(targets=np.ones((3, 3), np.int32)), {}, ValueError, "targets", "batch size 2"),
    "logit_lengths float": (with_(logit_lengths=np.array([5.0, 3.0], f32)), {}, TypeError, "logit_lengths",
                            "integer"),
    "logit_lengths rank 2": (with_(logit_lengths=i32(5, 3)[None]), {}, ValueError, "logit_lengths", "1 dimension"),
    "logit_lengths batch": (with_(logit_lengths=i32(5, 3, 2)), {}, ValueError, "logit_lengths", "batch size 2"),
    "logit_lengths zero": (with_(logit_lengths=i32(5, 0)), {}, ValueError, "logit_lengths", "[1, 5]"),
    "logit_lengths above T": (with_(logit_lengths=i32(6, 3)), {}, ValueError, "logit_lengths", "[1, 5]"),
    "target_lengths bool": (with_(target_lengths=np.array([True, True])), {}, TypeError, "target_lengths", "int"),
    "target_lengths batch": (with_(target_lengths=i32(3)), {}, ValueError, "target_lengths", "batch size 2"),
    "target_lengths negative": (with_(target_lengths=i32(3, -1)), {}, ValueError, "target_lengths", "[0, 3]"),
    "target_lengths above U": (with_(target_lengths=i32(4, 2)), {}, ValueError, "target_lengths", "U = logits"),
    "target_lengths above width": (with_(targets=np.ones((2, 2), np.int32)), {}, ValueError, "target_lengths",
                                   "targets.shape[1] = 2"),
    "label >= V": (with_(targets=np.array([[1, 6, 3], [4, 5, 0]], np.int32)), {}, ValueError, "targets",
                   "targets[0, 1] = 6"),
    "label negative": (with_(targets=np.array([[1, 2, 3], [-1, 5, 0]], np.int32)), {}, ValueError, "targets",
                       "[0, 6)"),
    "blank too large": (good_inputs(), dict(blank=6), ValueError, "blank", "[-6, 6)"),
    "blank too negative": (good_inputs(), dict(blank=-7), ValueError, "blank", "[-6, 6)"),
    "blank float": (good_inputs(), dict(blank=1.0), TypeError, "blank", "int"),
    "blank bool": (good_inputs(), dict(blank=True), TypeError, "blank", "int"),
    "clamp string": (good_inputs(), dict(clamp="1"), TypeError, "clamp", "real number"),
    "clamp nan": (good_inputs(), dict(clamp=float("nan")), ValueError, "clamp", "NaN"),
    "fastemit negative": (good_inputs(), dict(fastemit_lambda=-0.1), ValueError, "fastemit_lambda", ">= 0"),
    "fastemit inf": (good_inputs(), dict(fastemit_lambda=float("inf")), ValueError, "fastemit_lambda", "finite"),
    "fastemit None": (good_inputs(), dict(fastemit_lambda=None), TypeError, "fastemit_lambda", "real number"),
    "reduction unknown": (good_inputs(), dict(reduction="avg"), ValueError, "reduction", "'mean'"),
    "reduction not a string": (good_inputs(), dict(reduction=None), ValueError, "reduction", "'sum'"),
    "fused not bool": (good_inputs(), dict(fused_log_softmax="yes"), TypeError, "fused_log_softmax", "bool"),
}


def call_torch(inputs, options):
    return rnnt_loss(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()},
                     **options)


def call_jax(inputs, options):
    jax = pytest.importorskip("jax")
    from rnnt_xla.jax import rnnt_loss as jax_rnnt_loss

    return jax_rnnt_loss(**{k: jax.numpy.asarray(v) if isinstance(v, np.ndarray) and v.dtype != np.complex64
                            else v for k, v in inputs.items()}, **options)


@pytest.mark.parametrize("call", [call_torch, call_jax], ids=["torch", "jax"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case, call, monkeypatch):
    inputs, options, exc, name, fragment = BAD_INPUTS[case]

    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("a kernel ran on invalid input")

    monkeypatch.setattr(cpu, "forward", kernel_must_not_run)
    with pytest.raises(exc) as info:
        call(inputs, options)
    message = str(info.value)
    assert message.startswith(name) or name in message, message
    assert fragment in message, message


FRAMEWORK_SPECIFIC = {
    "torch: numpy logits": (call_torch, dict(logits=torch.randn(2, 5, 4, 6).numpy()), TypeError, "torch.Tensor"),
    "torch: inputs on two devices": (call_torch, dict(targets=torch.ones(2, 3, dtype=torch.int32, device="meta")),
                                     ValueError, "targets on meta"),
    "jax: list logits": (call_jax, dict(logits=[[[[0.0]]]]), TypeError, "JAX or numpy array"),
}


@pytest.mark.parametrize("case", sorted(FRAMEWORK_SPECIFIC))
def test_framework_specific_bad_inputs(case):
    call, changes, exc, fragment = FRAMEWORK_SPECIFIC[case]
    inputs = good_inputs()
    inputs = {k: changes.get(k, torch.from_numpy(v) if call is call_torch else v) for k, v in inputs.items()}
    with pytest.raises(exc, match=None) as info:
        if call is call_torch:
            rnnt_loss(**inputs)
        else:
            call(inputs, {})
    assert fragment in str(info.value)


@pytest.mark.parametrize("call", [call_torch, call_jax], ids=["torch", "jax"])
def test_padding_labels_are_ignored_whatever_they_hold(call):
    inputs = good_inputs()
    loss = np.asarray(call(inputs, dict(reduction="none")))
    inputs["targets"][1, 2] = -12345
    np.testing.assert_array_equal(np.asarray(call(inputs, dict(reduction="none"))), loss)


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
