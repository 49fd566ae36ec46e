"""The torch adapter as a compiler-native operator: torch.library.opcheck, torch.compile (fullgraph, dynamic
shapes, first call compiled), torch.export, TorchScript and torch.func."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_problem
from rnnt_xla.kernels import cpu
from rnnt_xla.torch import RNNTLoss, RNNTLossNumba, loss_backward, loss_forward, rnnt_loss

SECOND_ORDER = "rnnt_xla: the RNNT loss has no second derivative"

# The README's "torch.compile and export" example, verbatim: a whole training step under
# torch.compile(fullgraph=True, dynamic=True).
README_EXAMPLE = '''
import torch
from rnnt_xla.torch import RNNTLoss

torch._dynamo.config.trace_autograd_ops = True  # torch 2.13: lets fullgraph=True trace loss.backward()

B, T, U, V, F, H = 4, 40, 8, 32, 20, 64
encoder = torch.nn.Sequential(torch.nn.Linear(F, H), torch.nn.Tanh())
predictor = torch.nn.Embedding(V, H)
joiner = torch.nn.Linear(H, V)
params = [*encoder.parameters(), *predictor.parameters(), *joiner.parameters()]
criterion = RNNTLoss(blank=0)

@torch.compile(fullgraph=True, dynamic=True)
def train_step(features, targets, logit_lengths, target_lengths):
    for p in params:
        p.grad = None
    prediction_in = torch.nn.functional.pad(targets, (1, 0))  # the blank (0) as start symbol
    logits = joiner(torch.tanh(encoder(features)[:, :, None] + predictor(prediction_in)[:, None]))
    loss = criterion(logits, targets, logit_lengths, target_lengths)
    loss.backward()
    with torch.no_grad():  # plain SGD, inside the graph
        for p in params:
            p.sub_(0.1 * p.grad)
    return loss.detach()

features = torch.randn(B, T, F)
targets = torch.randint(1, V, (B, U))
logit_lengths = torch.tensor([40, 35, 30, 40])
target_lengths = torch.tensor([8, 6, 8, 5])
losses = [train_step(features, targets, logit_lengths, target_lengths).item() for _ in range(20)]
'''

# Run after the example in a fresh process, so that the loss's first call in the process is a compiled one.
CHECKS = '''
import json
from torch._dynamo.utils import counters

first = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}
frames = counters["stats"]["unique_graphs"]
shapes = [(12, 5), (13, 6), (20, 3), (7, 7), (30, 10), (9, 2), (15, 5), (25, 9), (11, 4), (18, 8)]
for T_i, U_i in shapes:
    train_step(torch.randn(B, T_i, F), torch.randint(1, V, (B, U_i)), torch.full((B,), T_i),
               torch.full((B,), U_i))

# Compiled vs eager, bit for bit: the loss and its gradient at the logits.
def loss_and_grad(logits):
    logits = logits.detach().requires_grad_()
    loss = RNNTLoss(blank=0, reduction="mean_by_target_length", clamp=0.5, fastemit_lambda=0.01)(
        logits, targets, logit_lengths, target_lengths)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad
logits = torch.randn(B, T, U + 1, V)
eager, compiled = loss_and_grad(logits), torch.compile(loss_and_grad, fullgraph=True)(logits)
print(json.dumps(dict(first=first, losses=losses, recompiles=counters["stats"]["unique_graphs"] - frames,
                      graph_breaks=sum(counters["graph_break"].values()),
                      bitwise=[torch.equal(a, b) for a, b in zip(eager, compiled)])))
'''


def test_the_readme_shows_this_example():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    if "## torch.compile and export" not in readme:
        pytest.skip("the README has no 'torch.compile and export' section yet")
    block = readme.split("## torch.compile and export", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert block.strip() == README_EXAMPLE.strip()


@pytest.fixture(scope="module")
def fresh_process_run():
    result = subprocess.run([sys.executable, "-c", README_EXAMPLE + CHECKS], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_readme_training_step_compiles_fullgraph_on_the_first_call_of_a_process(fresh_process_run):
    """Before (f45037d): the first compiled call crashed in Dynamo (it traced into Numba); after an eager
    warm-up this step (PyTorch's recipe, torch.optim) had 12 graphs and 27 graph breaks, and fullgraph=True
    failed in the validation."""
    assert fresh_process_run["first"] == {"graphs": 1, "graph_breaks": 0}
    losses = fresh_process_run["losses"]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]


def test_ten_shapes_cause_at_most_one_recompile(fresh_process_run):
    """Before: every new (T, U) recompiled (a guard on the validated shape; 20 more graphs over these ten
    shapes), and after 8 shapes the recompile limit sent the loss back to eager."""
    assert fresh_process_run["recompiles"] <= 1
    assert fresh_process_run["graph_breaks"] == 0


def test_compiled_loss_and_gradient_equal_eager_bit_for_bit(fresh_process_run):
    assert fresh_process_run["bitwise"] == [True, True]


def problem(seed=0, B=3, T=6, U=3, V=5, dtype=np.float32, index_dtype=np.int32, blank=0):
    p = random_problem(np.random.default_rng(seed), B, T, U, V, dtype=dtype, index_dtype=index_dtype, blank=blank)
    return (torch.from_numpy(p.logits), torch.from_numpy(p.targets), torch.from_numpy(p.logit_lengths),
            torch.from_numpy(p.target_lengths))


@pytest.mark.parametrize("dtype,reduction,groups", [(np.float32, "mean", 1), (np.float64, "none", 1),
                                                    (np.float32, "mean_volume", 2)])
def test_opcheck_passes_for_both_operators(dtype, reduction, groups):
    """Schema, autograd registration, fake tensors vs real ones, and AOTAutograd with dynamic shapes
    (which compares every output: the residuals' padding cells must be deterministic)."""
    logits, targets, logit_lengths, target_lengths = problem(1, B=4, dtype=dtype)
    options = (0, 0.5, reduction, True, 0.01, groups)
    torch.library.opcheck(loss_forward, (logits.requires_grad_(), targets, logit_lengths, target_lengths, *options))
    outputs = [t.detach() for t in loss_forward(logits, targets, logit_lengths, target_lengths, *options)]
    backward_args = (torch.rand_like(outputs[0]), logits.detach(), *outputs[1:], *options)
    torch.library.opcheck(loss_backward, backward_args)
    # With inputs that require grad, the backward operator's own derivative raises by design; its
    # registration is still checked.
    grad_args = (backward_args[0].requires_grad_(), logits.detach().requires_grad_(), *backward_args[2:])
    torch.library.opcheck(loss_backward, grad_args, test_utils="test_autograd_registration")


def test_fake_cuda_tensors_get_the_cuda_output_dtypes():
    """The meta path of the CUDA kernels, without a GPU: int32 index copies when no input is int64."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(3, 7, 4, 5, device="cuda", dtype=torch.bfloat16)
        index = torch.empty(3, dtype=torch.int32, device="cuda")
        outputs = loss_forward(logits, torch.empty(3, 2, dtype=torch.int32, device="cuda"), index, index, 0, -1.0,
                               "none", True, 0.0, 1)
        grads = loss_backward(outputs[0], logits, *outputs[1:], 0, -1.0, "none", True, 0.0, 1)
        assert rnnt_loss(logits, outputs[1], index, index).shape == ()
    outputs, unused = outputs[:9], outputs[9:]  # RNNT uses 5 of the residual slots; the others are empty
    assert [(tuple(o.shape), o.dtype) for o in unused] == [((3, 0), torch.float32)] * 3
    assert [(tuple(o.shape), o.dtype) for o in outputs] == [
        ((3,), torch.float32), ((3, 2), torch.int32), ((3,), torch.int32), ((3,), torch.int32),
        ((3, 7, 4), torch.float32), ((3, 7, 4), torch.float64), ((3, 7, 4), torch.float64),
        ((3, 7, 4), torch.float64), ((3,), torch.float64)]
    assert all(o.device.type == "cuda" for o in outputs)
    assert (grads.shape, grads.dtype, grads.device.type) == (logits.shape, torch.bfloat16, "cuda")


def test_a_compiled_graph_raises_the_same_errors_naming_the_argument():
    """The data-dependent checks run inside the operator, so a compiled graph checks every call."""
    logits, targets, logit_lengths, target_lengths = problem(2)
    step = torch.compile(lambda x, y, t, u, c: rnnt_loss(x, y, t, u, blank=0, clamp=c), fullgraph=True,
                         dynamic=True)
    expected = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, clamp=0.5)
    assert torch.equal(step(logits, targets, logit_lengths, target_lengths, 0.5), expected)
    bad_label = targets.clone()
    bad_label[0, 0] = 99
    cases = [((logits, targets, logit_lengths + 10, target_lengths, 0.5), "logit_lengths must be in"),
             ((logits, targets, logit_lengths, target_lengths + 10, 0.5), "target_lengths must be in"),
             ((logits, bad_label, logit_lengths, target_lengths, 0.5), "targets must hold labels"),
             ((logits, targets, logit_lengths, target_lengths, float("nan")), "clamp must not be NaN")]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            step(*args)
    with pytest.raises(Exception, match="logits must have 4 dimensions"):  # at trace time
        step(logits[0], targets, logit_lengths, target_lengths, 0.5)


def test_index_buffers_refilled_between_compiled_forward_and_backward_change_nothing():
    """The private index copies are operator outputs, so the compiled backward reads them, not the inputs."""
    logits, targets, logit_lengths, target_lengths = problem(7, index_dtype=np.int64)
    logits.requires_grad_()
    expected = torch.autograd.grad(rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0), logits)[0]
    loss = torch.compile(lambda x, y, t, u: rnnt_loss(x, y, t, u, blank=0), fullgraph=True, backend="aot_eager")(
        logits, targets, logit_lengths, target_lengths)
    for buffer in (targets, logit_lengths, target_lengths):
        buffer.fill_(10**12)
    assert torch.equal(torch.autograd.grad(loss, logits)[0], expected)


class LossModel(torch.nn.Module):
    def __init__(self, V: int = 5):
        super().__init__()
        self.joiner = torch.nn.Linear(V, V)
        self.loss = RNNTLoss(blank=0, reduction="sum", clamp=0.5)

    def forward(self, x, targets, logit_lengths, target_lengths):
        return self.loss(self.joiner(x), targets, logit_lengths, target_lengths)


@pytest.mark.parametrize("strict", [True, False])
def test_export_holds_the_custom_op_and_matches_eager(strict):
    """Before: strict export failed on data-dependent validation, non-strict on ``.numpy()`` of a fake."""
    torch.manual_seed(0)
    model = LossModel()
    inputs = problem(3)
    T, U = torch.export.Dim("T", min=2), torch.export.Dim("U", min=2)
    program = torch.export.export(model, inputs, strict=strict,
                                  dynamic_shapes=({1: T, 2: U + 1}, {1: U}, None, None))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "rnnt_xla.loss_forward.default" in targets
    assert torch.equal(program.module()(*inputs), model(*inputs))
    other = problem(4, T=9, U=4)  # another (T, U), same program
    assert torch.equal(program.module()(*other), model(*other))


def test_torchscript_script_save_load_and_trace():
    """Before: jit.script failed ("Unknown type name 'object'"), jit.trace on comparing numpy with tensors."""
    torch.manual_seed(0)
    model = LossModel()
    inputs = problem(5)
    expected = model(*inputs)
    scripted = torch.jit.script(model)
    assert "rnnt_xla::loss_forward" in str(scripted.loss.inlined_graph)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert torch.equal(loaded(*inputs), expected)
    loaded(*inputs).backward()
    expected.backward()
    assert torch.equal(loaded.joiner.weight.grad, model.joiner.weight.grad)
    with pytest.raises(Exception, match="logit_lengths must be in"):  # the operator checks the values
        loaded(inputs[0], inputs[1], inputs[2] + 10, inputs[3])
    seed_style = RNNTLossNumba(blank=0, reduction="mean", clamp=0.5)
    assert torch.equal(torch.jit.script(seed_style)(*inputs), seed_style(*inputs))
    assert torch.equal(torch.jit.script(rnnt_loss)(*inputs, 0), rnnt_loss(*inputs, 0))
    traced = torch.jit.trace(model, inputs)
    assert "rnnt_xla::loss_forward" in str(traced.inlined_graph)
    assert torch.equal(traced(*inputs), expected)


def batch_of_batches(N=3, **kwargs):
    """N independent problems stacked on a leading axis, with their own lengths and labels."""
    problems = [problem(10 + i, dtype=np.float64, **kwargs) for i in range(N)]
    return [torch.stack(column) for column in zip(*problems)]


def loss_fn(reduction):
    return lambda x, y, t, u: rnnt_loss(x, y, t, u, blank=0, reduction=reduction, clamp=0.5)


@pytest.mark.parametrize("reduction", ["none", "mean", "mean_volume"])
def test_torch_func_per_example_losses_and_gradients_match_the_loop(reduction):
    """Before: every torch.func transform raised "must override the setup_context staticmethod"."""
    x, y, t, u = batch_of_batches()
    xs = [x[i].clone().requires_grad_() for i in range(3)]
    loop = [rnnt_loss(xs[i], y[i], t[i], u[i], blank=0, reduction=reduction, clamp=0.5) for i in range(3)]
    loop_grads = torch.stack([torch.autograd.grad(loss.sum(), xs[i])[0] for i, loss in enumerate(loop)])
    f = loss_fn(reduction)
    assert torch.equal(torch.func.vmap(f)(x, y, t, u), torch.stack(loop).detach())
    scalar = lambda *args: f(*args).sum()  # noqa: E731
    assert torch.equal(torch.func.vmap(torch.func.grad(scalar))(x, y, t, u), loop_grads)
    assert torch.equal(torch.func.grad(scalar)(x[1], y[1], t[1], u[1]), loop_grads[1])
    value, vjp = torch.func.vjp(lambda a: f(a, y[2], t[2], u[2]), x[2])
    assert torch.equal(value, loop[2].detach())
    assert torch.equal(vjp(torch.ones_like(value))[0], loop_grads[2])
    shared = torch.func.vmap(lambda a: f(a, y[0], t[0], u[0]))(x)  # unbatched labels are broadcast
    assert torch.equal(shared[0], loop[0].detach())


def test_compiled_torch_func_grad():
    x, y, t, u = (a[0] for a in batch_of_batches(N=1))
    grad = torch.func.grad(lambda a: loss_fn("mean")(a, y, t, u))
    assert torch.equal(torch.compile(grad, fullgraph=True, backend="aot_eager")(x), grad(x))


def test_vmap_folds_the_vmapped_axis_into_one_kernel_launch(monkeypatch):
    x, y, t, u = batch_of_batches(N=4)
    calls = []
    forward = cpu.forward

    def counting_forward(logits, *args):
        calls.append(logits.shape)
        return forward(logits, *args)

    monkeypatch.setattr(cpu, "forward", counting_forward)
    torch.func.vmap(loss_fn("mean"))(x, y, t, u)
    assert calls == [(12, 6, 4, 5)]  # 4 problems of batch 3, one launch


def test_functional_call_with_grad():
    torch.manual_seed(0)
    model = LossModel()
    inputs = problem(6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, inputs))(params)
    model(*inputs).backward()
    for name, parameter in model.named_parameters():
        assert torch.equal(grads[name], parameter.grad)


def test_forward_mode_matches_the_jacobian():
    x, y, t, u = (a[0] for a in batch_of_batches(N=1))
    f = lambda a: loss_fn("none")(a, y, t, u)  # noqa: E731
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(f, (x,), (tangent,))
    jacobian = torch.func.jacrev(f)(x)
    torch.testing.assert_close(jvp, (jacobian * tangent).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(f)(x), jacobian, rtol=1e-12, atol=1e-12)


def test_second_derivatives_raise_through_torch_func_and_compile():
    x, y, t, u = (a[0] for a in batch_of_batches(N=1))
    f = lambda a: loss_fn("mean")(a, y, t, u)  # noqa: E731
    for second_order in (torch.func.hessian, lambda g: torch.func.jacrev(torch.func.jacrev(g))):
        with pytest.raises(RuntimeError, match=SECOND_ORDER):
            second_order(f)(x)

    def gradient_penalty(a):
        (g,) = torch.autograd.grad(f(a), a, create_graph=True)
        return g.pow(2).sum()

    with torch._dynamo.config.patch(trace_autograd_ops=True), pytest.raises(Exception, match=SECOND_ORDER):
        torch.compile(gradient_penalty, fullgraph=True, backend="aot_eager")(x.clone().requires_grad_()).backward()
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        gradient_penalty(x.clone().requires_grad_()).backward()
