"""The float64 reference against published known-answer vectors and against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from rnnt_xla.reference import backward_variables, forward_variables, log_softmax, rnnt_loss_reference

# warp-transducer's small_test (HawkAaron/warp-transducer, tests/test_cpu.cpp and
# pytorch_binding/test/test.py): B=1, T=2, U=2, V=5, blank=0, labels [1, 2].
WARP_SMALL_LOGITS = np.array(
    [[[[0.1, 0.6, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.1, 0.1], [0.1, 0.1, 0.2, 0.8, 0.1]],
      [[0.1, 0.6, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.1, 0.1], [0.7, 0.1, 0.2, 0.1, 0.1]]]]
)
WARP_SMALL_COST = 4.495666
# Gradient w.r.t. the log-probabilities (warp-transducer pytorch_binding/test/test.py, small_test).
WARP_SMALL_GRAD_LOG_PROBS = np.array(
    [[[[-0.308198071906, -0.6918019280939998, 0.0, 0.0, 0.0],
       [-0.308198071906, 0.0, -0.3836038561880001, 0.0, 0.0],
       [-0.3836038561880001, 0.0, 0.0, 0.0, 0.0]],
      [[0.0, -0.308198071906, 0.0, 0.0, 0.0],
       [0.0, 0.0, -0.6163961438119995, 0.0, 0.0],
       [-0.9999999999999991, 0.0, 0.0, 0.0, 0.0]]]]
)
# Gradient w.r.t. the logits for the same case (NeMo's tests/collections/asr/numba/rnnt_loss, test_case_small).
WARP_SMALL_GRAD_LOGITS = np.array(
    [[[[-0.13116688, -0.3999269, 0.17703125, 0.17703125, 0.17703125],
       [-0.18572757, 0.12247056, -0.18168412, 0.12247056, 0.12247056],
       [-0.32091254, 0.06269141, 0.06928472, 0.12624499, 0.06269141]],
      [[0.05456069, -0.21824276, 0.05456069, 0.05456069, 0.05456069],
       [0.12073959, 0.12073959, -0.48295835, 0.12073959, 0.12073959],
       [-0.6925882, 0.16871116, 0.18645467, 0.16871116, 0.16871116]]]]
)

# torchaudio's get_B1_T2_U3_D5_data (test/torchaudio_unittest/rnnt/utils.py): the same logits, blank=-1.
TA_B1_COST = 5.09566688538
TA_B1_GRAD = np.array(
    [0.17703132, -0.39992708, 0.17703132, 0.17703132, -0.13116692, 0.12247062, 0.12247062, -0.181684,
     0.12247062, -0.1857276, 0.06269141, 0.06269141, 0.06928471, 0.12624498, -0.32091248, 0.05456069,
     -0.2182428, 0.05456069, 0.05456069, 0.05456069, 0.12073967, 0.12073967, -0.48295838, 0.12073967,
     0.12073967, 0.30741188, 0.16871123, 0.18645471, 0.16871123, -0.83128875]
).reshape(1, 2, 3, 5)
TA_B1_LOGITS = np.array(
    [0.1, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.6, 0.1, 0.1, 0.1, 0.1, 0.2, 0.8, 0.1,
     0.1, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.7, 0.1, 0.2, 0.1, 0.1]
).reshape(1, 2, 3, 5)

# torchaudio's get_B2_T4_U3_D3_data ("Test from D21322854"), blank=0, targets [[1, 2], [1, 1]].
TA_B2_LOGITS = np.array(
    [0.065357, 0.787530, 0.081592, 0.529716, 0.750675, 0.754135, 0.609764, 0.868140, 0.622532,
     0.668522, 0.858039, 0.164539, 0.989780, 0.944298, 0.603168, 0.946783, 0.666203, 0.286882,
     0.094184, 0.366674, 0.736168, 0.166680, 0.714154, 0.399400, 0.535982, 0.291821, 0.612642,
     0.324241, 0.800764, 0.524106, 0.779195, 0.183314, 0.113745, 0.240222, 0.339470, 0.134160,
     0.505562, 0.051597, 0.640290, 0.430733, 0.829473, 0.177467, 0.320700, 0.042883, 0.302803,
     0.675178, 0.569537, 0.558474, 0.083132, 0.060165, 0.107958, 0.748615, 0.943918, 0.486356,
     0.418199, 0.652408, 0.024243, 0.134582, 0.366342, 0.295830, 0.923670, 0.689929, 0.741898,
     0.250005, 0.603430, 0.987289, 0.592606, 0.884672, 0.543450, 0.660770, 0.377128, 0.358021]
).reshape(2, 4, 3, 3)
TA_B2_COSTS = np.array([4.2806528590890736, 3.9384369822503591])
TA_B2_GRAD = np.array(
    [-0.186844, -0.062555, 0.249399, -0.203377, 0.202399, 0.000977, -0.141016, 0.079123, 0.061893,
     -0.011552, -0.081280, 0.092832, -0.154257, 0.229433, -0.075176, -0.246593, 0.146405, 0.100188,
     -0.012918, -0.061593, 0.074512, -0.055986, 0.219831, -0.163845, -0.497627, 0.209240, 0.288387,
     0.013605, -0.030220, 0.016615, 0.113925, 0.062781, -0.176706, -0.667078, 0.367659, 0.299419,
     -0.356344, -0.055347, 0.411691, -0.096922, 0.029459, 0.067463, -0.063518, 0.027654, 0.035863,
     -0.154499, -0.073942, 0.228441, -0.166790, -0.000088, 0.166878, -0.172370, 0.105565, 0.066804,
     0.023875, -0.118256, 0.094381, -0.104707, -0.108934, 0.213642, -0.369844, 0.180118, 0.189726,
     0.025714, -0.079462, 0.053748, 0.122328, -0.238789, 0.116460, -0.598687, 0.302203, 0.296484]
).reshape(2, 4, 3, 3)

# Each known-answer case: logits, targets, logit lengths, target lengths, blank, fused, costs, gradient.
KNOWN_ANSWERS = {
    "warp_small_logits": (WARP_SMALL_LOGITS, [[1, 2]], [2], [2], 0, True, [WARP_SMALL_COST], WARP_SMALL_GRAD_LOGITS),
    "warp_small_log_probs": (log_softmax(WARP_SMALL_LOGITS), [[1, 2]], [2], [2], 0, False, [WARP_SMALL_COST],
                             WARP_SMALL_GRAD_LOG_PROBS),
    "torchaudio_B1_T2_U3_D5": (TA_B1_LOGITS, [[1, 2]], [2], [2], -1, True, [TA_B1_COST], TA_B1_GRAD),
    "torchaudio_B2_T4_U3_D3": (TA_B2_LOGITS, [[1, 2], [1, 1]], [4, 4], [2, 2], 0, True, TA_B2_COSTS, TA_B2_GRAD),
}


@pytest.mark.parametrize("case", sorted(KNOWN_ANSWERS))
def test_reference_matches_published_vectors(case):
    logits, targets, logit_lengths, target_lengths, blank, fused, costs, grad = KNOWN_ANSWERS[case]
    got_costs, got_grad = rnnt_loss_reference(logits, np.array(targets), np.array(logit_lengths),
                                              np.array(target_lengths), blank=blank, reduction="none",
                                              fused_log_softmax=fused)
    np.testing.assert_allclose(got_costs, costs, rtol=1e-6)
    np.testing.assert_allclose(got_grad, grad, atol=1e-6)


def test_alphas_and_betas_agree_on_the_likelihood(rng):
    log_probs = log_softmax(rng.standard_normal((7, 5, 6)))
    labels = rng.integers(0, 6, size=4)
    alpha, ll_alpha = forward_variables(log_probs, labels, blank=2)
    beta, ll_beta = backward_variables(log_probs, labels, blank=2)
    assert np.isclose(ll_alpha, ll_beta, rtol=1e-12)
    # alpha * beta summed over a diagonal t + u = n is the total probability for every n.
    for n in range(7 + 5 - 1):
        cells = [(t, n - t) for t in range(7) if 0 <= n - t < 5]
        total = np.logaddexp.reduce([alpha[t, u] + beta[t, u] for t, u in cells])
        assert np.isclose(total, ll_alpha, rtol=1e-12)


def _numeric_gradient(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_by_target_length", "mean_volume"])
def test_reference_gradient_is_the_derivative_of_its_loss(rng, fused, reduction):
    logits = rng.standard_normal((3, 4, 3, 5))
    targets = np.array([[1, 0], [3, 3], [2, 9]])  # a label equal to blank; padding past length 1 ignored
    logit_lengths, target_lengths = np.array([4, 3, 2]), np.array([2, 2, 1])

    def loss(x):
        return rnnt_loss_reference(x, targets, logit_lengths, target_lengths, blank=0, reduction=reduction,
                                   fused_log_softmax=fused)[0].sum()

    _, grad = rnnt_loss_reference(logits, targets, logit_lengths, target_lengths, blank=0, reduction=reduction,
                                  fused_log_softmax=fused)
    np.testing.assert_allclose(grad, _numeric_gradient(loss, logits), atol=1e-7)


def test_reference_fastemit_scales_cost_and_label_gradient():
    logits, targets = WARP_SMALL_LOGITS, np.array([[1, 2]])
    lengths = (np.array([2]), np.array([2]))
    lam = 0.25
    cost, grad = rnnt_loss_reference(log_softmax(logits), targets, *lengths, blank=0, reduction="none",
                                     fused_log_softmax=False, fastemit_lambda=lam)
    np.testing.assert_allclose(cost, [(1 + lam) * WARP_SMALL_COST], rtol=1e-6)
    expected = WARP_SMALL_GRAD_LOG_PROBS.copy()
    for t, u, k in [(0, 0, 1), (0, 1, 2), (1, 0, 1), (1, 1, 2)]:  # label transitions
        expected[0, t, u, k] *= 1 + lam
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_reference_clamp_bounds_the_per_utterance_gradient():
    _, grad = rnnt_loss_reference(WARP_SMALL_LOGITS, np.array([[1, 2]]), np.array([2]), np.array([2]), blank=0,
                                  clamp=0.2, reduction="none")
    np.testing.assert_allclose(grad, np.clip(WARP_SMALL_GRAD_LOGITS, -0.2, 0.2), atol=1e-6)
