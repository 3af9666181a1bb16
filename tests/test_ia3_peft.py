"""IA3 against PEFT's IA3 on transformers' PyTorch T5: same weights, same vectors (random, not
ones); adapters written here load in PEFT and PEFT's load here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax import decoding, losses, optim
from softprompt_jax.checkpoints import peft_ia3
from softprompt_jax.methods.ia3 import IA3, IA3T5

import oracles

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _rel_close(ours, ref, rtol=1e-4):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  scale = max(np.abs(ref).max(), 1e-12)
  assert np.abs(ours - ref).max() / scale <= rtol, (np.abs(ours - ref).max(), scale)


def _peft_vectors(peft_model) -> dict:
  """{PEFT module path: its ia3_l parameter} ('encoder.block.0.layer.0.SelfAttention.k', ...)."""
  prefix, suffix = peft_ia3.PREFIX, peft_ia3.SUFFIX + ".default"
  return {name[len(prefix):-len(suffix)]: p for name, p in peft_model.named_parameters()
          if name.endswith(suffix)}


def _ours_from_peft(peft_model, config) -> dict:
  """Our vectors tree holding PEFT's values, through our path map (a wrong map shows up as
  different logits: every vector is random)."""
  theirs = _peft_vectors(peft_model)
  flat = {path: theirs[module].detach().numpy().reshape(shape)
          for path, (module, shape) in peft_ia3.ia3_paths(config).items()}
  assert len(flat) == len(theirs)  # PEFT's default targets exactly the vectors we have
  return unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module", params=["t5_1_1", "t5_1_0"])
def setup(request):
  hf_model = oracles.tiny_hf_t5(request.param, seed=3)
  config, t5_params = oracles.hf_to_ours(hf_model)
  peft_model = peft.get_peft_model(hf_model, peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
  rng = np.random.RandomState(0)
  with torch.no_grad():
    for p in _peft_vectors(peft_model).values():
      p.copy_(torch.tensor(rng.uniform(0.2, 1.8, tuple(p.shape)).astype(np.float32)))
  vectors = _ours_from_peft(peft_model, config)
  return request.param, peft_model, IA3T5(config), t5_params, vectors


def test_logits_loss_and_every_vector_gradient_match_peft(setup):
  _, peft_model, net, t5_params, vectors = setup
  enc, _ = oracles.random_batch(seed=5)
  targets = np.random.RandomState(6).randint(2, 100, (3, 6)).astype(np.int32)
  targets[0, 4:] = 0  # padded targets are excluded from both losses
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], axis=1)

  peft_model.zero_grad()
  labels = torch.tensor(np.where(targets > 0, targets, -100), dtype=torch.long)
  out = peft_model(input_ids=torch.tensor(enc, dtype=torch.long),
                   attention_mask=torch.tensor(enc > 0, dtype=torch.long), labels=labels)
  out.loss.backward()

  def loss_of(vectors):
    logits = net.apply({"params": optim.merge(vectors, t5_params)}, jnp.asarray(enc),
                       jnp.asarray(decoder_inputs), jnp.asarray(targets))
    return losses.t5x_loss(logits, jnp.asarray(targets), z_loss=0.0)[0], logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(vectors)
  real = targets > 0
  _rel_close(np.asarray(logits)[real], out.logits.detach().numpy()[real])
  _rel_close(loss, out.loss.item())
  theirs = _peft_vectors(peft_model)
  flat_grads = flatten_dict(grads, sep="/")
  for path, (module, shape) in peft_ia3.ia3_paths(net.config).items():
    ref = theirs[module].grad.numpy().reshape(shape)
    assert np.abs(ref).max() > 0, path
    _rel_close(flat_grads[path], ref)


def test_peft_generate_decodes_what_our_greedy_decoder_does(setup):
  _, peft_model, net, t5_params, vectors = setup
  enc, _ = oracles.random_batch(seed=7, input_len=12)
  ours = decoding.greedy_decode(net, optim.merge(vectors, t5_params), enc, max_decode_length=5)
  np.testing.assert_array_equal(np.asarray(ours), oracles.hf_greedy(peft_model.eval(), enc, 5))


def test_exported_adapter_loads_in_peft_and_reproduces_our_logits(setup, tmp_path):
  family, _, net, t5_params, vectors = setup
  trained = jax.tree_util.tree_map(lambda v: v * 1.25, vectors)  # not what PEFT holds now
  peft_ia3.save_ia3_adapter(tmp_path / "adapter", trained, net.config)
  loaded = peft.PeftModel.from_pretrained(oracles.tiny_hf_t5(family, seed=3),
                                          str(tmp_path / "adapter")).eval()
  for path, (module, shape) in peft_ia3.ia3_paths(net.config).items():
    np.testing.assert_array_equal(
        _peft_vectors(loaded)[module].detach().numpy().reshape(shape),
        flatten_dict(trained, sep="/")[path])
  enc, dec = oracles.random_batch(seed=8)
  ours = net.apply({"params": optim.merge(trained, t5_params)}, jnp.asarray(enc),
                   jnp.asarray(dec))
  _rel_close(ours, oracles.hf_logits(loaded, enc, dec))


def test_adapter_written_by_peft_starts_a_run_with_its_logits(setup, tmp_path):
  _, peft_model, net, t5_params, _ = setup
  peft_model.save_pretrained(str(tmp_path / "by_peft"))
  params = IA3(init_from=str(tmp_path / "by_peft")).init_params(net, t5_params,
                                                                jax.random.PRNGKey(0))
  enc, dec = oracles.random_batch(seed=9)
  ours = net.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  _rel_close(ours, oracles.hf_logits(peft_model.eval(), enc, dec))


def test_mt5_style_adapter_scaling_wi_1_reads_as_the_same_activations(tmp_path):
  """PEFT's mt5 default scales the output of wi_1, not the input of wo: in a gated MLP both
  multiply gelu(x W_0) * (x W_1), so it reads as our MLP vector, with PEFT's logits."""
  hf_model = oracles.tiny_hf_t5("t5_1_1", seed=4)
  config, t5_params = oracles.hf_to_ours(hf_model)
  peft_model = peft.get_peft_model(hf_model, peft.IA3Config(
      task_type="SEQ_2_SEQ_LM", target_modules=["k", "v", "wi_1"], feedforward_modules=[]))
  rng = np.random.RandomState(1)
  with torch.no_grad():
    for p in _peft_vectors(peft_model).values():
      p.copy_(torch.tensor(rng.uniform(0.2, 1.8, tuple(p.shape)).astype(np.float32)))
  peft_model.save_pretrained(str(tmp_path / "mt5_style"))
  vectors = peft_ia3.load_ia3_adapter(tmp_path / "mt5_style", config)
  enc, dec = oracles.random_batch(seed=10)
  ours = IA3T5(config).apply({"params": optim.merge(vectors, t5_params)}, jnp.asarray(enc),
                             jnp.asarray(dec))
  _rel_close(ours, oracles.hf_logits(peft_model.eval(), enc, dec))
