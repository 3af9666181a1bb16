"""losses.t5x_loss against a NumPy transcription of its definition (KL to the smoothed targets,
plus z-loss, over real tokens) and against PyTorch's cross-entropy."""

import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax import losses

V = 7


def _case(seed=0):
  rng = np.random.RandomState(seed)
  logits_BxSxV = (rng.normal(size=(3, 5, V)) * 3).astype(np.float32)
  targets_BxS = rng.randint(1, V, (3, 5)).astype(np.int32)
  targets_BxS[0, 3:] = 0
  targets_BxS[2, 1:] = 0
  return logits_BxSxV, targets_BxS


def _numpy_loss(logits_BxSxV, targets_BxS, z_loss, label_smoothing, normalizer):
  """Per token: KL(q || softmax(logits)) + z_loss * logsumexp(logits)^2, where q puts
  1 - label_smoothing on the target and spreads the rest evenly over the other V - 1 ids."""
  logits = logits_BxSxV.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  log_p = logits - log_z[..., None]
  q = np.full(logits.shape, label_smoothing / (V - 1))
  np.put_along_axis(q, targets_BxS[..., None], 1.0 - label_smoothing, axis=-1)
  log_q = np.log(np.where(q > 0, q, 1.0))  # 0 log 0 = 0
  kl = np.sum(q * (log_q - log_p), axis=-1)
  real = targets_BxS > 0
  xent_sum, z_sum = kl[real].sum(), (z_loss * log_z ** 2)[real].sum()
  denom = {"num_real_target_tokens": max(real.sum(), 1), "sum": 1.0}.get(normalizer, normalizer)
  return (xent_sum + z_sum) / denom, xent_sum / denom, z_sum / denom, real.sum()


@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.1])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("normalizer", ["num_real_target_tokens", "sum", 20.0])
def test_matches_the_numpy_definition(z_loss, label_smoothing, normalizer):
  logits, targets = _case()
  loss, aux = losses.t5x_loss(jnp.asarray(logits), jnp.asarray(targets), z_loss=z_loss,
                              label_smoothing=label_smoothing, normalizer=normalizer)
  loss_np, xent_np, z_np, count = _numpy_loss(logits, targets, z_loss, label_smoothing, normalizer)
  np.testing.assert_allclose(float(loss), loss_np, rtol=1e-5)
  np.testing.assert_allclose(float(aux["cross_entropy"]), xent_np, rtol=1e-5)
  np.testing.assert_allclose(float(aux["z_loss"]), z_np, rtol=1e-5, atol=1e-12)
  assert float(aux["num_tokens"]) == count


def test_a_perfect_prediction_scores_zero_cross_entropy_with_smoothing():
  """The smoothed targets' entropy is subtracted: predicting q exactly gives 0."""
  smoothing, targets = 0.1, np.array([[2, 5]], np.int32)
  q = np.full((1, 2, V), smoothing / (V - 1))
  np.put_along_axis(q, targets[..., None], 1.0 - smoothing, axis=-1)
  xent, _ = losses.cross_entropy_with_z_loss(jnp.asarray(np.log(q), jnp.float32),
                                             jnp.asarray(targets), label_smoothing=smoothing)
  np.testing.assert_allclose(np.asarray(xent), 0.0, atol=1e-5)


def test_matches_pytorch_cross_entropy():
  """torch's smoothing eps spreads eps / V over every id; eps = s V / (V - 1) gives our q, and
  torch does not subtract q's entropy."""
  torch = pytest.importorskip("torch")
  logits, targets = _case(1)
  for smoothing in (0.0, 0.2):
    torch_eps = smoothing * V / (V - 1)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.astype(np.float64)).reshape(-1, V),
        torch.from_numpy(targets.astype(np.int64)).reshape(-1), ignore_index=0,
        label_smoothing=torch_eps).item()
    if smoothing:
      conf, low = 1 - smoothing, smoothing / (V - 1)
      expected += conf * np.log(conf) + (V - 1) * low * np.log(low)
    loss, _ = losses.t5x_loss(jnp.asarray(logits), jnp.asarray(targets), z_loss=0.0,
                              label_smoothing=smoothing)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_padding_is_ignored_and_all_padding_is_zero_not_nan():
  logits, targets = _case()
  noisy = logits.copy()
  noisy[targets == 0] = 1e3  # whatever the model says at padded positions
  a, _ = losses.t5x_loss(jnp.asarray(logits), jnp.asarray(targets))
  b, _ = losses.t5x_loss(jnp.asarray(noisy), jnp.asarray(targets))
  assert float(a) == float(b)
  empty, aux = losses.t5x_loss(jnp.asarray(logits), jnp.zeros_like(jnp.asarray(targets)))
  assert float(empty) == 0.0 and float(aux["num_tokens"]) == 0.0


@pytest.mark.parametrize("normalizer", ["mean", 0, -1.0, True])
def test_a_bad_normalizer_is_a_value_error(normalizer):
  logits, targets = _case()
  with pytest.raises(ValueError, match="loss normalizer"):
    losses.t5x_loss(jnp.asarray(logits), jnp.asarray(targets), normalizer=normalizer)
