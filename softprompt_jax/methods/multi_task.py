"""Multi-task prompts: a prompt shared by every task of a mixture combined with each task's own
part, trained on mixed batches (each example's `prompt_ids` picks its task), as the official
prompt-tuning code's `extended/multitask_prompts.py` offers.

`train.method = @methods.multi_task_prompt(combine=...)` with `train.task = [a, b, ...]` (a
mixture: task k's examples carry prompt id k). Each task's prompt, [P, H] with P =
train.prompt_length (what the encoder sees), is made from the shared part and task k's part:

| combine | shared | per task (N tasks) | task k's prompt |
| --- | --- | --- | --- |
| `add` | [P, H] | [N, P, H] | shared + task[k] |
| `concat` | [P - P_t, H] | [N, P_t, H] | shared, then task[k] (along the length) |
| `concat_features` | [P, H_s] | [N, P, H - H_s] | [shared, task[k]] along the width |
| `project` | [P, H_s] | kernel [N, H_s, H], bias [N, H] | shared @ kernel[k] + bias[k] |

P_t is `task_length` (concat; default P // 2), H_s `shared_features` (concat_features: default
H // 2; project: default H). The parameters live under `multi_task_prompt/` (`shared`, `tasks`,
or `task_kernel` and `task_bias`); their logical axes (`prompt`, `prompts`, `prompt_embed`) are
replicated by partitioning.PROMPT_RULES.

Initialization: the run's prompt initializer (class labels, sampled vocabulary, a file, ...)
draws one [P, H] prompt v, split so that every task's prompt starts as v: add: shared v, tasks
zeros; concat: shared v[:P - P_t], each task v[P - P_t:]; concat_features: shared v[:, :H_s],
each task v[:, H_s:]; project: shared v[:, :H_s], each kernel the identity [H_s, H] (ones on
its diagonal), biases zeros (so v exactly when H_s = H, else v's first H_s columns then zeros).
Each task's part then moves only with its own examples' gradients, the shared part with all.

Evaluation during training evaluates each task with its prompt; the metrics are
`<task>/<metric>`, the mean over tasks of every metric all tasks report, and `tasks_mean` (the
mean of each task's first metric: the default best metric; see data.mixtures.TaskMixture).
`export --model_dir RUN --out DIR` writes DIR/<task>.npy, each task's combined [P, H] prompt, a
plain prompt that `eval` (PROMPT_FILE) and `infer` (PROMPTS) read as any other.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax import config_checks as cc
from softprompt_jax import output_files, prompts
from softprompt_jax.errors import ConfigError, UsageError
from softprompt_jax.methods.base import Method, register_method
from softprompt_jax.prompt_init import from_array, random_uniform
from softprompt_jax.prompted_t5 import PLACEMENTS, PromptedT5
from softprompt_jax.t5_layers import param_with_axes

# Where the parameters live in a parameter tree (and in the trainable subtree).
PARAMS = "multi_task_prompt"
# Logical axes of each parameter (all replicated: partitioning.PROMPT_RULES).
AXES = {"shared": ("prompt", "prompt_embed"), "tasks": ("prompts", "prompt", "prompt_embed"),
        "task_kernel": ("prompts", "prompt_embed", "prompt_embed"),
        "task_bias": ("prompts", "prompt_embed")}


def add(shared_PxH, tasks_NxPxH):
  """Task k's prompt: shared + tasks[k]."""
  return shared_PxH[None] + tasks_NxPxH


def concat(shared_PsxH, tasks_NxPtxH):
  """Task k's prompt: the shared rows, then task k's rows ([Ps + Pt, H])."""
  n = tasks_NxPtxH.shape[0]
  shared_NxPsxH = jnp.broadcast_to(shared_PsxH[None], (n,) + shared_PsxH.shape)
  return jnp.concatenate([shared_NxPsxH, tasks_NxPtxH], axis=1)


def concat_features(shared_PxHs, tasks_NxPxHt):
  """Task k's prompt: each row the shared features, then task k's ([P, Hs + Ht])."""
  n = tasks_NxPxHt.shape[0]
  shared_NxPxHs = jnp.broadcast_to(shared_PxHs[None], (n,) + shared_PxHs.shape)
  return jnp.concatenate([shared_NxPxHs, tasks_NxPxHt], axis=2)


def project(shared_PxHs, task_kernel_NxHsxH, task_bias_NxH):
  """Task k's prompt: the shared prompt through task k's affine map, shared @ kernel[k] +
  bias[k]."""
  return (jnp.einsum("ps,nsh->nph", shared_PxHs, task_kernel_NxHsxH)
          + task_bias_NxH[:, None, :])


# combine -> (the function, the names of its parameters in the order it takes them).
COMBINES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "add": (add, ("shared", "tasks")), "concat": (concat, ("shared", "tasks")),
    "concat_features": (concat_features, ("shared", "tasks")),
    "project": (project, ("shared", "task_kernel", "task_bias")),
}


def combined_prompts(combine: str, params: dict) -> jax.Array:
  """[N, P, H]: every task's prompt from the parameters under `multi_task_prompt/`."""
  fn, names = COMBINES[combine]
  return fn(*(jnp.asarray(params[name], jnp.float32) for name in names))


def param_shapes(combine: str, num_tasks: int, prompt_length: int, width: int,
                 shared_size: int) -> dict[str, tuple[int, ...]]:
  """Each parameter's shape. `shared_size`: the shared part's length (concat) or width
  (concat_features, project); unused by add."""
  n, p, h, s = num_tasks, prompt_length, width, shared_size
  return {"add": {"shared": (p, h), "tasks": (n, p, h)},
          "concat": {"shared": (s, h), "tasks": (n, p - s, h)},
          "concat_features": {"shared": (p, s), "tasks": (n, p, h - s)},
          "project": {"shared": (p, s), "task_kernel": (n, s, h), "task_bias": (n, h)}}[combine]


def initial_params(combine: str, prompt_PxH, num_tasks: int, shared_size: int) -> dict:
  """The parameters that make every task's prompt start as `prompt_PxH` (see the module doc)."""
  v_PxH, s = jnp.asarray(prompt_PxH, jnp.float32), shared_size
  (p, h), n = v_PxH.shape, num_tasks
  tile = lambda x: jnp.broadcast_to(x[None], (n,) + x.shape)
  if combine == "add":
    return {"shared": v_PxH, "tasks": jnp.zeros((n, p, h), jnp.float32)}
  if combine == "concat":
    return {"shared": v_PxH[:s], "tasks": tile(v_PxH[s:])}
  if combine == "concat_features":
    return {"shared": v_PxH[:, :s], "tasks": tile(v_PxH[:, s:])}
  return {"shared": v_PxH[:, :s], "task_kernel": tile(jnp.eye(s, h, dtype=jnp.float32)),
          "task_bias": jnp.zeros((n, h), jnp.float32)}


class MultiTaskPrompt(nn.Module):
  """Every task's prompt, [N, P, H], from the shared and per-task parameters."""
  combine: str
  num_tasks: int
  prompt_length: int
  features: int
  shared_size: int

  @nn.compact
  def __call__(self) -> jax.Array:
    shapes = param_shapes(self.combine, self.num_tasks, self.prompt_length, self.features,
                          self.shared_size)
    params = {name: param_with_axes(self, name, _standalone_init(name), shape, AXES[name])
              for name, shape in shapes.items()}
    return combined_prompts(self.combine, params)


def _standalone_init(name: str) -> Callable:
  """A parameter's init when the module is initialized alone (a run starts from
  `initial_params`): the shared part uniform, kernels the identity, the rest zeros."""
  if name == "shared":
    return lambda rng, shape, dtype: random_uniform()(rng, shape)
  if name == "task_kernel":
    return lambda rng, shape, dtype: jnp.broadcast_to(jnp.eye(*shape[1:], dtype=dtype), shape)
  return lambda rng, shape, dtype: jnp.zeros(shape, dtype)


class MultiTaskPromptedT5(PromptedT5):
  """PromptedT5 whose prompt bank (`num_prompts` = N tasks) is made by `MultiTaskPrompt`; each
  call takes `prompt_ids` [B], each example's task. `prompt_length` is each task's combined
  prompt's length, as the encoder sees it."""
  combine: str = "add"
  shared_size: int = 0  # the shared part's length (concat) or width (concat_features, project)

  def setup(self):
    super().setup()
    self.multi_task_prompt = MultiTaskPrompt(self.combine, self.num_prompts, self.prompt_length,
                                             self.config.emb_dim, self.shared_size)

  def encoder_inputs(self, encoder_input_tokens_BxT, prompt_ids=None):
    x_BxTxH = self.token_embedder(encoder_input_tokens_BxT)
    valid_BxT = encoder_input_tokens_BxT > 0
    prompts_NxPxH = self.multi_task_prompt()
    if prompt_ids is None:
      if not self.is_initializing():  # shapes alone (logical axes) need no task
        raise ValueError(f"this model has a prompt per task ({self.num_prompts}): pass "
                         "prompt_ids [batch] to choose each example's task")
      prompt_ids = jnp.zeros(encoder_input_tokens_BxT.shape[:1], jnp.int32)
    prompt_BxPxH = jnp.take(prompts_NxPxH, jnp.asarray(prompt_ids, jnp.int32), axis=0)
    return PLACEMENTS[self.placement](x_BxTxH, valid_BxT, prompt_BxPxH)


RULES = {"combine": cc.one_of(*COMBINES), "task_length": cc.integer(1, optional=True),
         "shared_features": cc.integer(1, optional=True)}


@dataclasses.dataclass(frozen=True)
class MultiTaskPromptMethod(Method):
  """A shared prompt and a part per task, combined by `combine` (see the module doc)."""
  name: ClassVar[str] = "multi_task_prompt"
  trainable: ClassVar[tuple[str, ...]] = (f"{PARAMS}/.*",)
  # No single prompt.npy: each task has its own (export).
  has_prompt: ClassVar[bool] = False
  mixes_tasks: ClassVar[bool] = True
  combine: str = "add"
  task_length: Optional[int] = None
  shared_features: Optional[int] = None

  def shared_size(self, prompt_length: int, width: int) -> int:
    """The shared length (concat) or width (concat_features, project) for this model; a size
    that leaves a part empty is a ConfigError."""
    who = f"methods.multi_task_prompt(combine={self.combine!r})"
    if prompt_length < 1 or (self.combine == "concat" and prompt_length < 2):
      raise ConfigError(f"{who} needs train.prompt_length >= "
                        f"{2 if self.combine == 'concat' else 1}; got {prompt_length}")
    if self.combine == "concat":
      task_length = prompt_length // 2 if self.task_length is None else self.task_length
      if task_length >= prompt_length:
        raise ConfigError(f"{who}: task_length {task_length} leaves no shared rows of the "
                          f"prompt_length {prompt_length}; use task_length < {prompt_length}")
      return prompt_length - task_length
    if self.combine == "concat_features":
      features = width // 2 if self.shared_features is None else self.shared_features
      if not 1 <= features < width:
        raise ConfigError(f"{who}: shared_features {features} leaves no task features of the "
                          f"model's d_model {width}; use 1 <= shared_features < {width}")
      return features
    if self.combine == "project":
      features = width if self.shared_features is None else self.shared_features
      if features > width:
        raise ConfigError(f"{who}: shared_features {features} is more than the model's d_model "
                          f"{width}; use 1 <= shared_features <= {width}")
      return features
    return 0

  def model(self, config, *, prompt_length: int, prompt_init, num_prompts=None,
            placement: str = "prepend") -> nn.Module:
    if num_prompts is None:
      raise ConfigError("methods.multi_task_prompt needs the number of tasks: set train.task "
                        "to a list of task names (a mixture)")
    return MultiTaskPromptedT5(config, prompt_length=prompt_length, prompt_init=prompt_init,
                               num_prompts=num_prompts, placement=placement,
                               combine=self.combine,
                               shared_size=self.shared_size(prompt_length, config.emb_dim))

  def init_params(self, net: nn.Module, frozen_params: dict, rng: jax.Array,
                  prompt_values=None) -> dict:
    """The frozen params plus `multi_task_prompt/`, every task's prompt starting as one [P, H]
    prompt from the run's initializer (or `prompt_values`)."""
    if PARAMS in frozen_params:
      raise ValueError(f"these params already hold {PARAMS}/; pass the frozen T5's params")
    init = net.prompt_init if prompt_values is None else from_array(prompt_values)
    start_PxH = init(rng, (net.prompt_length, net.config.emb_dim),
                     frozen_params["token_embedder"]["embedding"])
    return {**frozen_params,
            PARAMS: initial_params(net.combine, start_PxH, net.num_prompts, net.shared_size)}

  def export(self, model_dir, trained: dict, meta: dict, out, *,
             base_model: Optional[str] = None) -> pathlib.Path:
    """DIR/<task>.npy: each task's combined [P, H] prompt (float32), named by the run's tasks."""
    out = pathlib.Path(out)
    if out.suffix == ".npy" or output_files.is_stream(out):
      raise UsageError(f"--out {out}: a {self.name} run has a prompt per task; give a "
                       "directory (it gets <task>.npy for each task)")
    if base_model is not None:
      raise UsageError(f"--base_model is for PEFT adapters; a {self.name} run exports a .npy "
                       "prompt per task")
    if out.exists() and not out.is_dir():
      raise UsageError(f"--out {out} is a file; give a directory")
    names = meta["task"]
    prompts_NxPxH = np.asarray(combined_prompts(self.combine, trained[PARAMS]), np.float32)
    if len(names) != prompts_NxPxH.shape[0]:
      raise ValueError(f"{model_dir}: {len(names)} tasks recorded but "
                       f"{prompts_NxPxH.shape[0]} task prompts trained")
    out.mkdir(parents=True, exist_ok=True)
    for name, prompt_PxH in zip(names, prompts_NxPxH):
      prompts.save_npy(out / f"{name}.npy", prompt_PxH)
    if meta.get("placement", "prepend") != "prepend":
      print(f"note: the run placed its prompts with {meta['placement']!r}; eval and infer "
            "prepend a prompt file, so their results may differ from the run's",
            file=sys.stderr, flush=True)
    return out


def multi_task_prompt(combine: str = "add", task_length: Optional[int] = None,
                      shared_features: Optional[int] = None) -> Method:
  """A shared prompt plus a part per task of the run's mixture (see the module doc)."""
  cc.check("methods.multi_task_prompt", locals(), RULES)
  if task_length is not None and combine != "concat":
    raise ConfigError(f"methods.multi_task_prompt.task_length is for combine='concat' (the "
                      f"task part's length); combine is {combine!r}")
  if shared_features is not None and combine not in ("concat_features", "project"):
    raise ConfigError("methods.multi_task_prompt.shared_features is for combine="
                      f"'concat_features' or 'project' (the shared part's width); combine is "
                      f"{combine!r}")
  return MultiTaskPromptMethod(combine=combine, task_length=task_length,
                               shared_features=shared_features)


register_method("multi_task_prompt", multi_task_prompt, RULES)
