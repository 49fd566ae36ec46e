"""The adapters over the loss family (``rnnt_xla.family``): validation of the new arguments through both
adapters, the generic operator's schema and opcheck, rnnt_type/delay_penalty plumbing, the regular path
unchanged, and the TDT / multi-blank wiring (durations, residuals, omega draws, vmap groups, NeMo drop-ins).

The TDT and multi-blank kernels are written elsewhere; the wiring tests here run the adapters on stand-in
kernel modules with the documented entry points and a trivial loss (``cost_b = factor * sum of logits over
the utterance's frames``, ``factor = 2`` in omega's label-head mode), so that every value is known exactly.
"""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest
import torch

from rnnt_xla import family
from rnnt_xla.kernels import cpu
from rnnt_xla.torch import (RESIDUAL_SLOTS, MultiblankRNNTLoss, MultiblankRNNTLossNumba, TDTLoss, TDTLossNumba,
                            loss_backward, loss_forward, multiblank_rnnt_loss, rnnt_loss, tdt_loss)

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from rnnt_xla import jax as rj  # noqa: E402

DURATIONS = [0, 1, 2]
BIG_BLANKS = [2, 4]


def inputs(width: int = 6 + len(DURATIONS), dtype=np.float32, B: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """``(B, 5, 4, width)`` logits with lengths ``[5, 3, ...]`` and labels in ``[0, 5)``."""
    rng = np.random.default_rng(seed)
    return dict(
        logits=rng.standard_normal((B, 5, 4, width)).astype(dtype),
        targets=rng.integers(0, 5, (B, 3)).astype(np.int32),
        logit_lengths=np.array([5, 3, 4, 2][:B] + [5] * max(B - 4, 0), np.int32),
        target_lengths=np.array([3, 2, 1, 0][:B] + [3] * max(B - 4, 0), np.int32),
    )


def call(adapter: str, loss: str, arrays: dict, options: dict):
    fn = {"rnnt": (rnnt_loss, rj.rnnt_loss), "tdt": (tdt_loss, rj.tdt_loss),
          "multiblank": (multiblank_rnnt_loss, rj.multiblank_rnnt_loss)}[loss][adapter == "jax"]
    convert = torch.from_numpy if adapter == "torch" else jnp.asarray
    return fn(**{k: convert(v) for k, v in arrays.items()}, **options)


def tdt(**options):
    return "tdt", inputs(), dict(durations=DURATIONS, **options)


def multiblank(**options):
    return "multiblank", inputs(6), dict(big_blank_durations=BIG_BLANKS, **options)


def rnnt(arrays=None, **options):
    return "rnnt", arrays or inputs(6), options


short = {**inputs(6), "logit_lengths": np.array([5, 1], np.int32)}  # utterance 1: 1 frame, 2 labels

BAD_OPTIONS = {
    # name: ((loss, arrays, options), exception, argument named, expected fragment)
    "durations empty": (tdt()[:2] + (dict(durations=[]),), ValueError, "durations", "must not be empty"),
    "durations float": (tdt()[:2] + (dict(durations=[0, 1.0, 2]),), TypeError, "durations", "ints"),
    "durations bool": (tdt()[:2] + (dict(durations=[0, True, 2]),), TypeError, "durations", "ints"),
    "durations not a sequence": (tdt()[:2] + (dict(durations=3),), TypeError, "durations", "sequence of ints"),
    "durations unsorted": (tdt()[:2] + (dict(durations=[1, 0, 2]),), ValueError, "durations", "ascending"),
    "durations repeated": (tdt()[:2] + (dict(durations=[0, 1, 1]),), ValueError, "durations", "distinct"),
    "durations negative": (tdt()[:2] + (dict(durations=[-1, 1, 2]),), ValueError, "durations", ">= 0"),
    "durations only zero": (tdt()[:2] + (dict(durations=[0]),), ValueError, "durations", "positive duration"),
    "logits narrower than the durations": (("tdt", inputs(3), dict(durations=DURATIONS)), ValueError, "logits",
                                           "V + len(durations)"),
    "tdt blank in the duration part": (tdt(blank=6), ValueError, "blank", "label part"),
    "tdt label in the duration part": (("tdt", {**inputs(), "targets": np.array([[1, 6, 0], [0, 0, 0]], np.int32)},
                                        dict(durations=DURATIONS)), ValueError, "targets", "[0, 6)"),
    "sigma negative": (tdt(sigma=-0.05), ValueError, "sigma", ">= 0"),
    "sigma nan": (tdt(sigma=float("nan")), ValueError, "sigma", "NaN"),
    "sigma inf": (multiblank(sigma=float("inf")), ValueError, "sigma", "finite"),
    "sigma string": (multiblank(sigma="0.05"), TypeError, "sigma", "real number"),
    "omega above 1": (tdt(omega=1.5), ValueError, "omega", "<= 1"),
    "omega negative": (tdt(omega=-0.1), ValueError, "omega", ">= 0"),
    "big_blank_durations empty": (multiblank()[:2] + (dict(big_blank_durations=[]),), ValueError,
                                  "big_blank_durations", "must not be empty"),
    "big_blank_durations of 1": (multiblank()[:2] + (dict(big_blank_durations=[1, 2]),), ValueError,
                                 "big_blank_durations", ">= 2"),
    "big_blank_durations float": (multiblank()[:2] + (dict(big_blank_durations=[2.0]),), TypeError,
                                  "big_blank_durations", "ints"),
    "multiblank blank without room for the big blanks": (multiblank(blank=1), ValueError, "blank", "big blanks"),
    "rnnt_type unknown": (rnnt(rnnt_type="one-per-frame"), ValueError, "rnnt_type", "'constrained'"),
    "rnnt_type None": (rnnt(rnnt_type=None), ValueError, "rnnt_type", "'modified'"),
    "delay_penalty nan": (rnnt(delay_penalty=float("nan")), ValueError, "delay_penalty", "NaN"),
    "delay_penalty inf": (rnnt(delay_penalty=float("inf")), ValueError, "delay_penalty", "finite"),
    "delay_penalty string": (rnnt(delay_penalty="0.1"), TypeError, "delay_penalty", "real number"),
    "modified with fewer frames than labels": (rnnt(short, rnnt_type="modified"), ValueError, "logit_lengths",
                                               "logit_lengths[1] = 1 < target_lengths[1] = 2"),
    "constrained with fewer frames than labels": (rnnt(short, rnnt_type="constrained"), ValueError,
                                                  "logit_lengths", ">= target_lengths for rnnt_type='constrained'"),
}


@pytest.fixture
def no_kernels(monkeypatch):
    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("a kernel ran on invalid input")

    for module, name in ((cpu, "forward"), (family, "forward"), (family, "residual_shapes")):
        monkeypatch.setattr(module, name, kernel_must_not_run)


@pytest.mark.parametrize("adapter", ["torch", "jax"])
@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_family_option_raises_naming_the_argument(case, adapter, no_kernels):
    (loss, arrays, options), exc, name, fragment = BAD_OPTIONS[case]
    with pytest.raises(exc) as info:
        call(adapter, loss, arrays, options)
    message = str(info.value)
    assert message.startswith(name), message
    assert fragment in message, message


def test_jax_tdt_needs_a_key_when_omega_is_positive(no_kernels):
    with pytest.raises(ValueError, match=r"^key must be given .* omega > 0"):
        call("jax", "tdt", inputs(), dict(durations=DURATIONS, omega=0.3))


def test_the_regular_lattice_still_allows_fewer_frames_than_labels():
    loss, arrays, options = rnnt(short)
    assert np.isfinite(float(call("torch", loss, arrays, dict(blank=0))))


# --- RNNT: the regular path unchanged, the variants' options reach the kernels ---------------------------

def test_regular_rnnt_is_bit_identical_to_the_kernels_called_directly():
    """What the adapters computed before the family: cpu.forward / cpu.backward on the same memory, with
    rnnt_type='regular' and delay_penalty=0 (given explicitly or by default)."""
    p = inputs(6, B=3)
    idx = [p[k].astype(np.int64) for k in ("targets", "logit_lengths", "target_lengths")]
    B, T, U1, _ = p["logits"].shape
    residuals = cpu.allocate_residuals(B, T, U1, np.float32)
    costs = np.empty(B, np.float32)
    cpu.forward(p["logits"], *idx, 0, True, 0.01, costs, residuals)
    grads = np.empty_like(p["logits"])
    cpu.backward(p["logits"], *idx, 0, True, 0.01, 0.5, np.ones(B), residuals, grads)
    for explicit in ({}, dict(rnnt_type="regular", delay_penalty=0.0)):
        options = dict(blank=0, fastemit_lambda=0.01, clamp=0.5, **explicit)
        x = torch.from_numpy(p["logits"]).requires_grad_()
        torch_costs = rnnt_loss(x, *(torch.from_numpy(p[k]) for k in list(p)[1:]), reduction="none", **options)
        torch_costs.sum().backward()
        assert np.array_equal(torch_costs.detach().numpy(), costs) and np.array_equal(x.grad.numpy(), grads)
        arrays = [jnp.asarray(p[k]) for k in p]
        jax_costs, jax_grads = jax.value_and_grad(
            lambda x: rj.rnnt_loss(x, *arrays[1:], reduction="none", **options).sum(), has_aux=False)(arrays[0])
        assert np.array_equal(np.asarray(jax_grads), grads)
        assert np.array_equal(np.asarray(rj.rnnt_loss(*arrays, reduction="none", **options)), costs)


@pytest.fixture
def recording_rnnt_kernels(monkeypatch):
    """cpu.forward/backward that record the variant keywords they get and compute the regular loss."""
    calls = []
    real_forward, real_backward = cpu.forward, cpu.backward

    def forward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda, costs,
                residuals, **variant):
        calls.append(("forward", variant))
        real_forward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
                     costs, residuals)

    def backward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda, clamp,
                 grad_scale, residuals, grads, rnnt_type="regular", delay_penalty=0.0):
        calls.append(("backward", dict(rnnt_type=rnnt_type, delay_penalty=delay_penalty)))
        real_backward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
                      clamp, grad_scale, residuals, grads)

    # The signature check looks for a parameter named rnnt_type.
    forward.__signature__ = inspect.signature(backward)
    monkeypatch.setattr(cpu, "forward", forward)
    monkeypatch.setattr(cpu, "backward", backward)
    return calls


@pytest.mark.parametrize("adapter", ["torch", "jax"])
def test_rnnt_type_and_delay_penalty_reach_both_kernel_passes(adapter, recording_rnnt_kernels):
    p = inputs(6)
    options = dict(blank=0, rnnt_type="constrained", delay_penalty=0.25)
    if adapter == "torch":
        x = torch.from_numpy(p["logits"]).requires_grad_()
        rnnt_loss(x, *(torch.from_numpy(p[k]) for k in list(p)[1:]), **options).backward()
    else:
        arrays = [jnp.asarray(p[k]) for k in p]
        jax.grad(lambda x: rj.rnnt_loss(x, *arrays[1:], **options))(arrays[0]).block_until_ready()
    variant = dict(rnnt_type="constrained", delay_penalty=0.25)
    assert recording_rnnt_kernels == [("forward", variant), ("backward", variant)]


def test_the_regular_path_calls_the_kernels_without_variant_keywords(recording_rnnt_kernels):
    p = inputs(6)
    rnnt_loss(*(torch.from_numpy(v) for v in p.values()), blank=0, rnnt_type="regular", delay_penalty=0.0)
    assert recording_rnnt_kernels == [("forward", {})]


def test_variants_without_variant_kernels_raise_not_implemented(monkeypatch):
    def plain_forward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
                      costs, residuals):
        raise AssertionError("the plain kernel must not compute a variant")

    monkeypatch.setattr(cpu, "forward", plain_forward)
    with pytest.raises(NotImplementedError, match="rnnt_type='modified'"):
        rnnt_loss(*(torch.from_numpy(v) for v in inputs(6).values()), blank=0, rnnt_type="modified")


def test_a_build_without_a_losss_cuda_kernels_raises_not_implemented(monkeypatch):
    monkeypatch.setitem(family._CUDA_MODULES, "tdt", "rnnt_xla.kernels.no_such_module")
    monkeypatch.setitem(family._CUDA_MODULES, "variant", "rnnt_xla.kernels.no_such_module")
    for spec, fragment in ((family.LossSpec(kind="tdt", durations=(0, 1)), "tdt loss's CUDA kernels"),
                           (family.LossSpec(delay_penalty=0.5), "rnnt loss's CUDA kernels")):
        with pytest.raises(NotImplementedError, match=fragment):
            family.cuda_forward(spec, *[None] * 6)
        with pytest.raises(NotImplementedError, match=fragment):
            family.cuda_backward(spec, *[None] * 7)


# --- the generic operator -----------------------------------------------------------------------------

def test_the_operators_schema_carries_the_family_arguments():
    for op in (torch.ops.rnnt_xla.loss_forward.default, torch.ops.rnnt_xla.loss_backward.default):
        arguments = {a.name: (str(a.type), a.default_value) for a in op._schema.arguments}
        assert arguments["kind"] == ("str", "rnnt")
        assert arguments["durations"] == ("List[int]", [])
        assert arguments["sigma"] == ("float", 0.0) and arguments["omega"] == ("float", 0.0)
        assert arguments["omega_draw"] == ("Optional[Tensor]", None)
        assert arguments["rnnt_type"] == ("str", "regular") and arguments["delay_penalty"] == ("float", 0.0)
    backward = [(a.name, str(a.type)) for a in torch.ops.rnnt_xla.loss_backward.default._schema.arguments]
    assert backward[5:5 + RESIDUAL_SLOTS] == [(f"residual{i}", "Tensor") for i in range(RESIDUAL_SLOTS)]
    returns = [str(r.type) for r in torch.ops.rnnt_xla.loss_forward.default._schema.returns]
    assert returns == ["Tensor"] * (4 + RESIDUAL_SLOTS)


def _opcheck(arrays: dict, options: tuple) -> None:
    tensors = [torch.from_numpy(v) for v in arrays.values()]
    torch.library.opcheck(loss_forward, (tensors[0].clone().requires_grad_(), *tensors[1:], *options))
    loss, *saved = loss_forward(*tensors, *options)
    backward_args = (torch.rand_like(loss), tensors[0], *saved, *options)
    torch.library.opcheck(loss_backward, backward_args)


def test_opcheck_passes_for_the_generic_operator_with_every_argument_given():
    _opcheck(inputs(6, dtype=np.float64), (0, 0.5, "mean", True, 0.01, 1, "rnnt", [], 0.0, 0.0, None, "regular",
                                           0.0))


# --- TDT and multi-blank wiring, on stand-in kernels ---------------------------------------------------

def _factor(head_only: bool) -> float:
    return 2.0 if head_only else 1.0


def _fake_kernel_module(kind: str, calls: list) -> types.ModuleType:
    """A kernel module with the entry points of ``family.py``'s contract and the trivial loss above."""
    module = types.ModuleType(f"rnnt_xla.kernels.cpu_{kind}")

    def residual_shapes(batch, frames, positions, count, dtype):
        return (((batch,), np.dtype(np.float64)), ((batch, frames, positions, count), cpu.compute_dtype(dtype)))

    def costs_of(logits, logit_lengths, head_only):
        return np.array([_factor(head_only) * logits[b, :logit_lengths[b]].sum(dtype=np.float64)
                         for b in range(logits.shape[0])])

    def forward(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, *rest):
        head_only, costs, residuals = rest if kind == "tdt" else (False, *rest)
        calls.append(dict(entry="forward", blank=blank, durations=durations.tolist(), dtype=durations.dtype,
                          sigma=sigma, fastemit_lambda=fastemit_lambda, head_only=head_only, batch=len(costs)))
        residuals[0][:] = costs_of(logits, logit_lengths, head_only)
        residuals[1][:] = blank
        costs[:] = residuals[0]

    def backward(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, clamp,
                 *rest):
        head_only, grad_scale, residuals, grads = rest if kind == "tdt" else (False, *rest)
        calls.append(dict(entry="backward", clamp=clamp, head_only=head_only, batch=len(grad_scale)))
        assert np.array_equal(residuals[0], costs_of(logits, logit_lengths, head_only))  # the forward's
        assert (residuals[1] == blank).all()
        grads[:] = 0
        for b in range(grads.shape[0]):
            grads[b, :logit_lengths[b]] = _factor(head_only) * grad_scale[b]

    module.residual_shapes, module.forward, module.backward = residual_shapes, forward, backward
    return module


@pytest.fixture
def fake_kernels(monkeypatch):
    calls = []
    for kind in ("tdt", "multiblank"):
        monkeypatch.setitem(sys.modules, f"rnnt_xla.kernels.cpu_{kind}", _fake_kernel_module(kind, calls))
    return calls


def _expected(arrays: dict, head_only=False) -> tuple[np.ndarray, np.ndarray]:
    """The stand-in loss's costs and the gradient of their sum."""
    logits, frames = arrays["logits"], arrays["logit_lengths"]
    costs = np.array([_factor(head_only) * logits[b, :frames[b]].sum(dtype=np.float64) for b in range(len(frames))])
    grads = np.zeros_like(logits)
    for b in range(len(frames)):
        grads[b, :frames[b]] = _factor(head_only)
    return costs.astype(np.float32), grads


@pytest.mark.parametrize("loss", ["tdt", "multiblank"])
def test_torch_and_jax_run_the_kernels_with_the_options_and_agree_bit_for_bit(loss, fake_kernels):
    arrays = inputs(6 + len(DURATIONS) if loss == "tdt" else 6, B=3)
    values = DURATIONS if loss == "tdt" else BIG_BLANKS
    options = {"durations" if loss == "tdt" else "big_blank_durations": values}
    options.update(sigma=0.05, clamp=0.5, fastemit_lambda=0.01, reduction="none")
    x = torch.from_numpy(arrays["logits"]).requires_grad_()
    fn = tdt_loss if loss == "tdt" else multiblank_rnnt_loss
    torch_costs = fn(x, *(torch.from_numpy(arrays[k]) for k in list(arrays)[1:]), **options)
    torch_costs.sum().backward()
    costs, grads = _expected(arrays)
    assert np.array_equal(torch_costs.detach().numpy(), costs) and np.array_equal(x.grad.numpy(), grads)
    forward_call = fake_kernels[0]
    assert forward_call == dict(entry="forward", blank=5, durations=values, dtype=np.int64,
                                sigma=0.05, fastemit_lambda=0.01, head_only=False, batch=3)
    assert fake_kernels[1] == dict(entry="backward", clamp=0.5, head_only=False, batch=3)
    jfn = rj.tdt_loss if loss == "tdt" else rj.multiblank_rnnt_loss
    jarrays = [jnp.asarray(v) for v in arrays.values()]
    jax_costs, vjp = jax.vjp(lambda x: jfn(x, *jarrays[1:], **options), jarrays[0])
    assert np.array_equal(np.asarray(jax_costs), costs)
    assert np.array_equal(np.asarray(vjp(jnp.ones(3, jnp.float32))[0]), grads)


def test_reductions_modules_and_nemo_drop_ins(fake_kernels):
    arrays = inputs()
    tensors = [torch.from_numpy(v) for v in arrays.values()]
    costs, _ = _expected(arrays)
    assert float(tdt_loss(*tensors, DURATIONS)) == pytest.approx(costs.mean(), rel=1e-6)
    assert float(TDTLoss(DURATIONS, reduction="sum")(*tensors)) == pytest.approx(costs.sum(), rel=1e-6)
    nemo = TDTLossNumba(blank=5, durations=DURATIONS, reduction="mean", clamp=-1, sigma=0.05)
    nemo_loss = nemo(*tensors)
    assert nemo_loss.shape == (1,) and float(nemo_loss[0]) == pytest.approx(costs.mean(), rel=1e-6)
    assert fake_kernels[-1]["sigma"] == 0.05 and fake_kernels[-1]["blank"] == 5
    mb_arrays = inputs(6)
    mb = [torch.from_numpy(v) for v in mb_arrays.values()]
    mb_costs, _ = _expected(mb_arrays)
    assert MultiblankRNNTLossNumba(5, BIG_BLANKS, reduction="none")(*mb).shape == (2,)
    assert float(MultiblankRNNTLossNumba(5, BIG_BLANKS)(*mb)[0]) == pytest.approx(mb_costs.mean(), rel=1e-6)
    assert float(MultiblankRNNTLoss(BIG_BLANKS, reduction="sum")(*mb)) == pytest.approx(mb_costs.sum(), rel=1e-6)


def test_nemo_drop_ins_take_nemos_constructor_arguments():
    """nemo/collections/asr/parts/numba/rnnt_loss/rnnt_pytorch.py: TDTLossNumba, MultiblankRNNTLossNumba."""
    def parameters(cls):
        return [(p.name, p.default) for p in list(inspect.signature(cls).parameters.values())]

    empty = inspect.Parameter.empty
    assert parameters(TDTLossNumba) == [("blank", empty), ("durations", None), ("reduction", "mean"),
                                        ("fastemit_lambda", 0.0), ("clamp", -1), ("sigma", 0.0), ("omega", 0.0)]
    assert parameters(MultiblankRNNTLossNumba) == [("blank", empty), ("big_blank_durations", empty),
                                                   ("reduction", "mean"), ("fastemit_lambda", 0.0), ("clamp", -1),
                                                   ("sigma", 0.0)]
    assert list(inspect.signature(TDTLossNumba.forward).parameters)[1:] == ["acts", "labels", "act_lens",
                                                                           "label_lens"]


def test_torch_omega_draws_from_torchs_generator_and_backward_reuses_the_draw(fake_kernels):
    tensors = [torch.from_numpy(v) for v in inputs().values()]
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        head_only = bool(torch.rand(1)[0] < 0.5)
        seen.add(head_only)
        torch.manual_seed(seed)
        x = tensors[0].clone().requires_grad_()
        loss = tdt_loss(x, *tensors[1:], DURATIONS, omega=0.5, reduction="sum")
        loss.backward()
        assert [c["head_only"] for c in fake_kernels[-2:]] == [head_only, head_only]
        assert float(loss.detach()) == pytest.approx(_expected(inputs(), head_only)[0].sum(), rel=1e-6)
        assert float(x.grad.max()) == _factor(head_only)
    assert seen == {False, True}
    state = torch.get_rng_state()
    tdt_loss(*tensors, DURATIONS, omega=0.0)
    assert torch.equal(torch.get_rng_state(), state)  # no draw without omega


def test_torch_vmap_with_different_randomness_gives_each_example_its_own_draw(fake_kernels):
    arrays = inputs()
    tensors = [torch.from_numpy(v) for v in arrays.values()]
    stacked = torch.stack([tensors[0] * (i + 1) for i in range(6)])
    torch.manual_seed(0)
    head_only = (torch.rand(6) < 0.5).tolist()  # vmap(randomness="different") draws torch.rand(6, 1)
    torch.manual_seed(0)
    losses = torch.func.vmap(lambda x: tdt_loss(x, *tensors[1:], DURATIONS, omega=0.5, reduction="sum"),
                             randomness="different")(stacked)
    base = _expected(arrays)[0].sum()
    ratios = [float(losses[i]) / ((i + 1) * base) for i in range(6)]
    assert ratios == pytest.approx([_factor(h) for h in head_only], rel=1e-5)
    # mixed modes: the kernels ran on runs of groups (2 utterances each), not once over the folded 12
    assert len(fake_kernels) > 1 and all(c["batch"] < 12 and c["batch"] % 2 == 0 for c in fake_kernels)
    assert {c["head_only"] for c in fake_kernels} == {False, True}
    # omega=0: no draw, so plain vmap (randomness="error") works
    torch.func.vmap(lambda x: tdt_loss(x, *tensors[1:], DURATIONS, reduction="sum"))(stacked)


def test_jax_omega_follows_the_key_under_jit_and_vmap(fake_kernels):
    arrays = inputs()
    jarrays = [jnp.asarray(v) for v in arrays.values()]
    base = _expected(arrays)[0].sum()
    keys = jax.random.split(jax.random.key(0), 8)
    draws = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys))
    expected = np.where(draws < 0.5, 2.0, 1.0) * base
    assert len(set(expected)) == 2

    def loss(x, key):
        return rj.tdt_loss(x, *jarrays[1:], DURATIONS, omega=0.5, reduction="sum", key=key)

    jitted = jax.jit(loss)
    for key, value in zip(keys[:3], expected[:3]):
        assert float(jitted(jarrays[0], key)) == pytest.approx(value, rel=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(loss, in_axes=(None, 0))(jarrays[0], keys)), expected, rtol=1e-6)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(jarrays[0], keys)
    assert np.asarray(grads).max(axis=(1, 2, 3, 4)).tolist() == np.where(draws < 0.5, 2.0, 1.0).tolist()


def test_opcheck_passes_for_the_generic_operator_on_tdt(fake_kernels):
    _opcheck(inputs(), (-1, 0.5, "sum", True, 0.0, 1, "tdt", DURATIONS, 0.05, 0.5, torch.tensor([0.25]),
                        "regular", 0.0))
    assert fake_kernels[0]["head_only"] is True


def test_the_cuda_registrations_run_the_family_dispatch(monkeypatch):
    """No GPU here: the CUDA kernels of both operators on CPU tensors, with torch.cuda's stream and device
    stubbed and family.cuda_forward/backward running the CPU kernels on the same memory, give what the CPU
    registrations give (so the CUDA registrations pass their arguments and residuals in the right order)."""
    from types import SimpleNamespace

    from rnnt_xla import torch as rt

    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=0))
    as_np = lambda tensors: [t.numpy().astype(np.int64) for t in tensors]  # noqa: E731
    streams = []

    def cuda_forward(spec, logits, targets, logit_lengths, target_lengths, costs, residuals, stream=None,
                     label_head_only=False):
        streams.append(stream)
        family.forward(spec, logits.numpy(), *as_np((targets, logit_lengths, target_lengths)), costs.numpy(),
                       [r.numpy() for r in residuals], label_head_only)

    def cuda_backward(spec, logits, targets, logit_lengths, target_lengths, grad_scale, residuals, grads,
                      stream=None, betas=None, label_head_only=False):
        assert betas.shape == logits.shape[:3] and betas.dtype == torch.float64
        family.backward(spec, logits.numpy(), *as_np((targets, logit_lengths, target_lengths)),
                        grad_scale.numpy(), [r.numpy() for r in residuals], grads.numpy(), label_head_only)

    monkeypatch.setattr(family, "cuda_forward", cuda_forward)
    monkeypatch.setattr(family, "cuda_backward", cuda_backward)
    tensors = [torch.from_numpy(v) for v in inputs(6, dtype=np.float64).values()]
    options = (0, 0.5, "mean_by_target_length", True, 0.01, 2)
    cpu_outputs = loss_forward(*tensors, *options)
    cuda_outputs = rt._loss_forward_cuda(*tensors, *options)
    assert streams == [0]
    assert len(cuda_outputs) == len(cpu_outputs) == 4 + RESIDUAL_SLOTS
    for got, expected in zip(cuda_outputs, cpu_outputs):
        assert torch.equal(got, expected)
    grad_loss = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.equal(rt._loss_backward_cuda(grad_loss, tensors[0], *cuda_outputs[1:], *options),
                       loss_backward(grad_loss, tensors[0], *cpu_outputs[1:], *options))


def test_torchscript_of_the_new_modules_matches_eager(fake_kernels):
    tensors = [torch.from_numpy(v) for v in inputs().values()]
    mb = [torch.from_numpy(v) for v in inputs(6).values()]
    for module, args in ((TDTLossNumba(5, DURATIONS, sigma=0.05, omega=0.5), tensors), (TDTLoss(DURATIONS), tensors),
                         (MultiblankRNNTLossNumba(5, BIG_BLANKS), mb), (MultiblankRNNTLoss(BIG_BLANKS), mb)):
        scripted = torch.jit.script(module)
        assert "rnnt_xla::loss_forward" in str(scripted.inlined_graph)
        torch.manual_seed(1)
        expected = module(*args)
        torch.manual_seed(1)  # the same omega draw
        assert torch.equal(scripted(*args), expected)


def test_compiled_tdt_loss_with_omega_matches_eager_and_draws_each_call(fake_kernels):
    tensors = [torch.from_numpy(v) for v in inputs().values()]
    step = torch.compile(lambda x: tdt_loss(x, *tensors[1:], DURATIONS, omega=0.5, reduction="sum"),
                         fullgraph=True, backend="aot_eager")
    x = tensors[0].clone().requires_grad_()
    base = _expected(inputs())[0].sum()
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        loss = step(x)
        loss.backward()
        forward, backward = fake_kernels[-2:]
        assert backward["entry"] == "backward" and backward["head_only"] == forward["head_only"]
        seen.add(fake_kernels[-1]["head_only"])
        assert float(loss.detach()) == pytest.approx(_factor(fake_kernels[-1]["head_only"]) * base, rel=1e-6)
    assert seen == {False, True}  # a new draw per call, not one baked into the graph
