"""The plain framework implementations of the transducer family that the benchmarks compare against
(``benchmarks/plain_torch_family.py``, ``benchmarks/plain_jax_family.py``), checked against NeMo's published
TDT answer, against Hugging Face transformers' pure-PyTorch TDT loss (when installed), and against brute-force
path enumeration on tiny lattices (TDT, multi-blank, k2's modified / constrained with a delay penalty). They are
independent of rnnt_xla's kernels, so where rnnt_xla has a loss they check it too."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from plain_torch_family import (modified_rnnt_loss_plain_torch, multiblank_rnnt_loss_plain_torch,  # noqa: E402
                                nemo_tdt_fixed_case, tdt_loss_plain_torch)

torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------------------- brute-force enumeration


def _paths(T: int, U: int, arcs) -> list[list[tuple[int, int, str, int]]]:
    """Every complete path of a lattice with nodes (t, u), t < T, u <= U, from (0, 0): ``arcs(t, u)`` yields
    ``(kind, index, t_next, u_next)``; an arc into (T, U) completes the path (only blank-kind arcs for the
    losses that need a final blank, as ``arcs`` decides), arcs past the lattice are dropped."""
    done: list[list[tuple[int, int, str, int]]] = []

    def walk(t: int, u: int, path: list) -> None:
        for kind, index, t2, u2 in arcs(t, u):
            step = path + [(t, u, kind, index)]
            if (t2, u2) == (T, U):
                done.append(step)
            elif t2 < T and u2 <= U:
                walk(t2, u2, step)

    walk(0, 0, [])
    return done


def _total(scores: list[torch.Tensor]) -> torch.Tensor:
    return -torch.logsumexp(torch.stack(scores), dim=0)


def brute_tdt(logits, labels, durations, blank, sigma=0.0):
    """``logits (T, U+1, V+D)`` of one utterance, ``labels (U,)``: the TDT cost by enumerating every path."""
    T, U1, VD = logits.shape
    D = len(durations)
    lp = torch.log_softmax(logits[..., :VD - D], -1) - sigma
    dp = torch.log_softmax(logits[..., VD - D:], -1)

    def arcs(t, u):
        for i, d in enumerate(durations):
            if d > 0:
                yield "blank", i, t + d, u
            if u < U1 - 1 and t + d < T:  # a label arc must land on a frame
                yield "label", i, t + d, u + 1

    def score(path):
        return sum(lp[t, u, blank if kind == "blank" else int(labels[u])] + dp[t, u, i] for t, u, kind, i in path)

    return _total([score(p) for p in _paths(T, U1 - 1, arcs) if p[-1][2] == "blank"])


def brute_multiblank(logits, labels, big_blank_durations, blank, sigma=0.0):
    T, U1, V = logits.shape
    lp = torch.log_softmax(logits, -1) - sigma
    steps = [(blank, 1)] + [(blank - 1 - i, d) for i, d in enumerate(big_blank_durations)]

    def arcs(t, u):
        for k, d in steps:
            yield "blank", k, t + d, u
        if u < U1 - 1:
            yield "label", int(labels[u]), t, u + 1

    return _total([sum(lp[t, u, k] for t, u, _, k in p) for p in _paths(T, U1 - 1, arcs) if p[-1][2] == "blank"])


def brute_modified(logits, labels, blank, rnnt_type="modified", delay_penalty=0.0):
    T, U1, V = logits.shape
    lp = torch.log_softmax(logits, -1)

    def arcs(t, u):
        yield "blank", blank, t + 1, u
        if u < U1 - 1:
            yield "label", int(labels[u]), t + 1, u + 1

    def score(path):
        total = 0.0
        for t, u, kind, k in path:
            total = total + lp[t, u, k]
            if kind == "label":
                total = total + delay_penalty * ((T - 1) / 2 - t)
                if rnnt_type == "constrained":
                    total = total + lp[t, u + 1, blank]
        return total

    # Here (T, U) is reached by any arc: every arc consumes a frame, there is no final blank.
    return _total([score(p) for p in _paths(T, U1 - 1, arcs)])


# ------------------------------------------------------------------------------- problems


def _problem(seed: int, B: int, T: int, U: int, V: int, extra: int = 0, modified: bool = False,
             min_frames: int = 1):
    """Random logits ``(B, T, U+1, V + extra)``, labels in [1, V-1) (so that neither blank 0 nor V-1 is a
    label), variable lengths (utterance 0 full; T_b >= min_frames, and U_b <= T_b when ``modified``), junk
    past each target length."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V + extra, generator=gen) * 2
    targets = torch.randint(1, V - 1, (B, U), generator=gen)
    logit_lengths = torch.randint(U if modified else min_frames, T + 1, (B,), generator=gen)
    target_lengths = torch.randint(0, U + 1, (B,), generator=gen)
    logit_lengths[0], target_lengths[0] = T, U
    for b in range(B):
        targets[b, target_lengths[b]:] = 10 * V  # junk: never read
    return logits, targets, logit_lengths, target_lengths


def _grad(fn, logits, *args, **kwargs):
    x = logits.clone().requires_grad_()
    cost = fn(x, *args, **kwargs)
    cost.sum().backward()
    return cost.detach(), x.grad


def _check_against_brute(plain, brute, problem, tol=2e-5, **options):
    logits, targets, logit_lengths, target_lengths = problem
    cost, grad = _grad(plain, logits, targets, logit_lengths, target_lengths, reduction="none", **options)
    assert torch.isfinite(grad).all()
    for b in range(len(cost)):
        T_b, U_b = int(logit_lengths[b]), int(target_lengths[b])
        x = logits[b, :T_b, :U_b + 1].clone().requires_grad_()
        expected = brute(x, targets[b, :U_b], **options)
        expected.backward()
        torch.testing.assert_close(cost[b], expected.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(grad[b, :T_b, :U_b + 1], x.grad, rtol=tol, atol=tol)
        # Padding (frames past T_b, positions past U_b) gets exactly zero gradient.
        assert float(grad[b, T_b:].abs().sum()) == 0.0 and float(grad[b, :, U_b + 1:].abs().sum()) == 0.0


# ------------------------------------------------------------------------------- TDT


def test_plain_torch_tdt_matches_nemo_fixed_case():
    """NeMo, tests/collections/asr/numba/rnnt_loss/test_rnnt_pytorch.py,
    TestTDTLoss.test_case_fixed_case_act_label: cost 4.155739 and its gradients."""
    case = nemo_tdt_fixed_case()
    cost, grad = _grad(tdt_loss_plain_torch, case["logits"], case["targets"], case["logit_lengths"],
                       case["target_lengths"], case["durations"], blank=case["blank"], sigma=case["sigma"],
                       reduction="sum")
    assert float(cost) == pytest.approx(case["cost"], abs=1e-5)
    torch.testing.assert_close(grad, case["grads"], rtol=0, atol=1e-5)
    expected = brute_tdt(case["logits"][0], case["targets"][0], case["durations"], case["blank"], case["sigma"])
    assert float(expected) == pytest.approx(case["cost"], abs=1e-5)


@pytest.mark.parametrize("durations, blank, sigma", [
    ((0, 1, 2, 3, 4), -1, 0.0), ((0, 1, 2), 0, 0.05), ((1, 2, 3), -1, 0.1), ((0, 2, 3), 2, 0.0), ((0, 1), 3, 0.0),
])
def test_plain_torch_tdt_matches_path_enumeration(durations, blank, sigma):
    V = 5
    # T_b >= 2: with durations (0, 2, 3) a single frame has no path.
    problem = _problem(sum(durations) + blank, B=3, T=5, U=2, V=V, extra=len(durations), min_frames=2)
    b = blank % V
    problem[1][problem[1] == b] = 1 if b != 1 else 2  # labels never equal the blank
    _check_against_brute(lambda x, *a, **k: tdt_loss_plain_torch(x, *a, durations, **k),
                         lambda x, y, **k: brute_tdt(x, y, durations, b, sigma), problem, blank=blank, sigma=sigma)


def test_plain_jax_tdt_matches_plain_torch_and_nemo():
    jax = pytest.importorskip("jax")
    from plain_jax_family import tdt_loss_plain_jax

    case = nemo_tdt_fixed_case()
    args = [np.asarray(case[k]) for k in ("logits", "targets", "logit_lengths", "target_lengths")]
    options = dict(durations=tuple(case["durations"]), blank=case["blank"], sigma=case["sigma"])
    cost, grad = jax.value_and_grad(lambda x: tdt_loss_plain_jax(x, *args[1:], reduction="sum", **options))(args[0])
    assert float(cost) == pytest.approx(case["cost"], abs=1e-5)
    np.testing.assert_allclose(np.asarray(grad), case["grads"].numpy(), atol=1e-5)

    for durations, blank in (((0, 1, 2, 3, 4), 0), ((1, 3), -1)):
        logits, targets, logit_lengths, target_lengths = _problem(7, B=4, T=9, U=4, V=6, extra=len(durations))
        torch_cost, torch_grad = _grad(tdt_loss_plain_torch, logits, targets, logit_lengths, target_lengths,
                                       durations, blank=blank, sigma=0.02, reduction="none")
        arrays = [t.numpy() for t in (targets, logit_lengths, target_lengths)]

        def costs(x):
            c = tdt_loss_plain_jax(x, *arrays, durations=durations, blank=blank, sigma=0.02, reduction="none")
            return c.sum(), c

        (_, jax_cost), jax_grad = jax.value_and_grad(costs, has_aux=True)(logits.numpy())
        np.testing.assert_allclose(np.asarray(jax_cost), torch_cost.numpy(), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(jax_grad), torch_grad.numpy(), atol=1e-5)


def _hf_tdt_loss():
    try:
        from transformers.loss.loss_tdt import tdt_loss
    except ImportError as exc:
        pytest.skip(f"Hugging Face transformers with loss_tdt not installed ({exc})")
    return tdt_loss


def test_hf_transformers_tdt_matches_nemo_and_plain_torch():
    """The Hugging Face pure-PyTorch TDT loss (a benchmark peer) computes the same loss as ours."""
    hf_tdt_loss = _hf_tdt_loss()
    case = nemo_tdt_fixed_case()
    D = len(case["durations"])
    x = case["logits"].clone().requires_grad_()
    cost = hf_tdt_loss(x[..., :-D], x[..., -D:], case["targets"], case["logit_lengths"], case["target_lengths"],
                       case["blank"], case["durations"], sigma=case["sigma"], reduction="sum")
    cost.backward()
    assert float(cost.detach()) == pytest.approx(case["cost"], abs=1e-5)
    torch.testing.assert_close(x.grad, case["grads"], rtol=0, atol=1e-5)

    durations = [0, 1, 2, 3, 4]
    logits, targets, logit_lengths, target_lengths = _problem(3, B=3, T=8, U=3, V=7, extra=len(durations))
    targets = targets.clamp(max=5)  # Hugging Face gathers every target, padding too: keep it in the vocabulary
    for blank in (0, 6):
        ours, our_grad = _grad(tdt_loss_plain_torch, logits, targets, logit_lengths, target_lengths, durations,
                               blank=blank, sigma=0.05, reduction="none")
        x = logits.clone().requires_grad_()
        theirs = hf_tdt_loss(x[..., :-5], x[..., -5:], targets, logit_lengths, target_lengths, blank, durations,
                             sigma=0.05, reduction="none")
        theirs.sum().backward()
        torch.testing.assert_close(theirs.detach(), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, our_grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- multi-blank


@pytest.mark.parametrize("big_blank_durations, sigma", [((2, 4, 8), 0.0), ((2, 3), 0.1), ((3,), 0.05)])
def test_plain_torch_multiblank_matches_path_enumeration(big_blank_durations, sigma):
    """NeMo's multi-blank tests (TestMultiblankRNNTLoss) publish no fixed answer, only agreement with its
    MultiblankRNNTLossPytorch; the enumeration here follows that code's arcs (big blank i at blank - 1 - i)."""
    K = len(big_blank_durations)
    V = 4 + K
    problem = _problem(K, B=3, T=6, U=2, V=V - K)  # labels in [1, V - K - 1): never a blank
    logits = torch.randn(3, 6, 3, V, generator=torch.Generator().manual_seed(11)) * 2
    problem = (logits, *problem[1:])
    _check_against_brute(lambda x, *a, **k: multiblank_rnnt_loss_plain_torch(x, *a, big_blank_durations, **k),
                         lambda x, y, **k: brute_multiblank(x, y, big_blank_durations, V - 1, sigma), problem,
                         blank=-1, sigma=sigma)


def test_plain_torch_multiblank_without_big_blanks_is_rnnt():
    from plain_torch import rnnt_loss_plain_torch

    logits, targets, logit_lengths, target_lengths = _problem(5, B=3, T=7, U=3, V=6)
    expected = rnnt_loss_plain_torch(logits, targets, logit_lengths, target_lengths, blank=0, reduction="none")
    got = multiblank_rnnt_loss_plain_torch(logits, targets, logit_lengths, target_lengths, [], blank=0,
                                           reduction="none")
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------- modified / constrained


@pytest.mark.parametrize("rnnt_type, delay_penalty, blank", [
    ("modified", 0.0, 0), ("modified", 0.3, -1), ("constrained", 0.0, 0), ("constrained", 0.2, -1)])
def test_plain_torch_modified_matches_path_enumeration(rnnt_type, delay_penalty, blank):
    V = 5
    problem = _problem(3, B=3, T=5, U=3, V=V, modified=True)
    _check_against_brute(modified_rnnt_loss_plain_torch,
                         lambda x, y, **k: brute_modified(x, y, blank % V, rnnt_type, delay_penalty),
                         problem, blank=blank, rnnt_type=rnnt_type, delay_penalty=delay_penalty)


def test_brute_force_counts_paths():
    """The enumerator itself: modified RNN-T on T frames with U labels has C(T, U) paths (the frames that
    emit a label)."""
    for T, U in ((4, 2), (5, 3), (3, 0)):
        modified = _paths(T, U, lambda t, u: [("blank", 0, t + 1, u)] + ([("label", 1, t + 1, u + 1)] if u < U else []))
        assert len(modified) == len(list(itertools.combinations(range(T), U)))


# ------------------------------------------------------------------------------- rnnt_xla's kernels


def _skip_unless_available(call) -> None:
    """Skip when this checkout's rnnt_xla lacks the loss: no such function, or an adapter whose kernels are
    not part of the build (it raises NotImplementedError)."""
    try:
        call()
    except (AttributeError, TypeError, NotImplementedError) as exc:
        pytest.skip(f"not in this checkout: {exc}")


def _tiny(V: int):
    return (torch.zeros(1, 2, 2, V), torch.tensor([[1]], dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32))


def test_rnnt_xla_tdt_matches_plain_torch_when_available():
    import rnnt_xla.torch as ours

    _skip_unless_available(lambda: ours.tdt_loss(*_tiny(6), [0, 1, 2], blank=0))
    durations = [0, 1, 2, 3, 4]
    logits, targets, logit_lengths, target_lengths = _problem(9, B=4, T=10, U=4, V=8, extra=len(durations))
    for blank in (0, 7):
        expected, expected_grad = _grad(tdt_loss_plain_torch, logits, targets, logit_lengths, target_lengths,
                                        durations, blank=blank, sigma=0.05, reduction="none")
        cost, grad = _grad(ours.tdt_loss, logits, targets.int(), logit_lengths.int(), target_lengths.int(),
                           durations, blank=blank, sigma=0.05, reduction="none")
        torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_rnnt_xla_multiblank_matches_plain_torch_when_available():
    import rnnt_xla.torch as ours

    _skip_unless_available(lambda: ours.multiblank_rnnt_loss(*_tiny(6), [2], blank=5))
    big = [2, 4, 8]
    logits = torch.randn(4, 12, 5, 9, generator=torch.Generator().manual_seed(4)) * 2
    _, targets, logit_lengths, target_lengths = _problem(4, B=4, T=12, U=4, V=5)
    expected, expected_grad = _grad(multiblank_rnnt_loss_plain_torch, logits, targets, logit_lengths,
                                    target_lengths, big, blank=-1, sigma=0.1, reduction="none")
    cost, grad = _grad(ours.multiblank_rnnt_loss, logits, targets.int(), logit_lengths.int(), target_lengths.int(),
                       big, blank=8, sigma=0.1, reduction="none")
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rnnt_type", ["modified", "constrained"])
def test_rnnt_xla_modified_matches_plain_torch_when_available(rnnt_type):
    import rnnt_xla.torch as ours

    _skip_unless_available(lambda: ours.rnnt_loss(*_tiny(4), blank=0, rnnt_type=rnnt_type))
    logits, targets, logit_lengths, target_lengths = _problem(6, B=4, T=9, U=4, V=7, modified=True)
    expected, expected_grad = _grad(modified_rnnt_loss_plain_torch, logits, targets, logit_lengths, target_lengths,
                                    blank=0, rnnt_type=rnnt_type, delay_penalty=0.1, reduction="none")
    cost, grad = _grad(ours.rnnt_loss, logits, targets.int(), logit_lengths.int(), target_lengths.int(), blank=0,
                       reduction="none", rnnt_type=rnnt_type, delay_penalty=0.1)
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
