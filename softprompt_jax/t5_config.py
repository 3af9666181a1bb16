"""T5Config: the hyperparameters of every T5 family member, and their published sizes.

Field names follow t5x's `T5Config` (emb_dim, num_heads, head_dim, mlp_dim, ...) so a gin file
written for t5x's `network.T5Config` reads the same here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("t5_1_1", "t5_1_0", "mt5", "byt5")


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  head_dim: int = 64
  mlp_dim: int = 1024
  # ("gelu", "linear") is T5 1.1's gated GELU; ("relu",) is T5 1.0's plain ReLU MLP.
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.1
  # True for T5 1.0: the output layer reuses the token embedding and logits are scaled by
  # emb_dim**-0.5; T5 1.1, mT5 and ByT5 have a separate `decoder/logits_dense`.
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # Activation dtype; parameters stay float32 whatever this is.
  dtype: str = "float32"
  # Rematerialisation of each layer in the backward pass: "none", "full" (save only layer
  # inputs: least memory) or "minimal" (save matmul outputs). Numerics are unchanged.
  remat_policy: str = "none"

  def __post_init__(self):
    if isinstance(self.mlp_activations, list):
      object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    for act in self.mlp_activations:
      if act not in ACTIVATIONS:
        raise ValueError(
            f"T5Config.mlp_activations: unknown activation {act!r}; "
            f"use one of {sorted(ACTIVATIONS)}")
    if self.remat_policy not in ("none", "full", "minimal"):
      raise ValueError(f"T5Config.remat_policy: {self.remat_policy!r}; use 'none', 'full' or "
                       "'minimal'")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"T5Config.dtype: {self.dtype!r}; use 'float32', 'bfloat16' or 'float16'")

  @property
  def activation_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  def replace(self, **overrides) -> "T5Config":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mlp_activations"] = list(self.mlp_activations)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "T5Config":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"T5Config: unknown fields {unknown}; known fields are {sorted(known)}")
    return cls(**d)


def _gelu_tanh(x):
  import jax
  return jax.nn.gelu(x, approximate=True)


def _relu(x):
  import jax
  return jax.nn.relu(x)


def _linear(x):
  return x


ACTIVATIONS = {"gelu": _gelu_tanh, "gelu_new": _gelu_tanh, "relu": _relu, "linear": _linear}


def _shape(emb, heads, enc, dec, head_dim, mlp):
  return dict(emb_dim=emb, num_heads=heads, num_encoder_layers=enc, num_decoder_layers=dec,
              head_dim=head_dim, mlp_dim=mlp)


# Published dimensions (T5 1.1 / LM-adapted and mT5 share shapes; ByT5 has a deeper encoder).
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "t5_1_1": {
        "small": _shape(512, 6, 8, 8, 64, 1024),
        "base": _shape(768, 12, 12, 12, 64, 2048),
        "large": _shape(1024, 16, 24, 24, 64, 2816),
        "xl": _shape(2048, 32, 24, 24, 64, 5120),
        "xxl": _shape(4096, 64, 24, 24, 64, 10240),
    },
    "t5_1_0": {
        "small": _shape(512, 8, 6, 6, 64, 2048),
        "base": _shape(768, 12, 12, 12, 64, 3072),
        "large": _shape(1024, 16, 24, 24, 64, 4096),
        "xl": _shape(1024, 32, 24, 24, 128, 16384),
        "xxl": _shape(1024, 128, 24, 24, 128, 65536),
    },
    "byt5": {
        "small": _shape(1472, 6, 12, 4, 64, 3584),
        "base": _shape(1536, 12, 18, 6, 64, 3968),
        "large": _shape(1536, 16, 36, 12, 64, 3840),
        "xl": _shape(2560, 32, 36, 12, 64, 6720),
        "xxl": _shape(4672, 64, 36, 12, 64, 12352),
    },
}
SIZES["mt5"] = SIZES["t5_1_1"]

_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "t5_1_1": dict(vocab_size=32128, mlp_activations=("gelu", "linear"),
                   logits_via_embedding=False),
    "t5_1_0": dict(vocab_size=32128, mlp_activations=("relu",), logits_via_embedding=True),
    "mt5": dict(vocab_size=250112, mlp_activations=("gelu", "linear"), logits_via_embedding=False),
    "byt5": dict(vocab_size=384, mlp_activations=("gelu", "linear"), logits_via_embedding=False),
}


def t5_config(size: str = "small", family: str = "t5_1_1", **overrides) -> T5Config:
  """The published configuration of `family` at `size`, with `overrides` applied."""
  if family not in _FAMILY_DEFAULTS:
    raise ValueError(f"unknown T5 family {family!r}; use one of {list(FAMILIES)}")
  if size not in SIZES[family]:
    raise ValueError(f"unknown size {size!r} for {family}; use one of {list(SIZES[family])}")
  return T5Config(**{**_FAMILY_DEFAULTS[family], **SIZES[family][size], **overrides})


def tiny_config(family: str = "t5_1_1", **overrides) -> T5Config:
  """A few-kilobyte model for tests: 2+2 layers, 2 heads, d_model 16."""
  fields = dict(_FAMILY_DEFAULTS[family])
  fields.update(vocab_size=128, emb_dim=16, num_heads=2, num_encoder_layers=2,
                num_decoder_layers=2, head_dim=8, mlp_dim=32,
                relative_attention_num_buckets=8, relative_attention_max_distance=20)
  fields.update(overrides)
  return T5Config(**fields)

