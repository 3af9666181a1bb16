"""What t5x and prompt-tuning users type works as they expect, or is refused in one line naming
it: no binding is silently ignored.

The table below holds every macro name that google-research/prompt-tuning's gin files and demo
scripts set, t5x's finetune.gin macros, and the t5x bindings those files and scripts make; each
is either honoured (the setting here that it maps to has the value) or refused (a ConfigError
naming it)."""

import pathlib

import gin
import pytest

from softprompt_jax import gin_setup
from softprompt_jax.cli import main
from softprompt_jax.errors import ConfigError

SMOKE = ["--gin_file", "runs/smoke.gin"]
TESTDATA = pathlib.Path(__file__).parent / "testdata"
T5X_CHECKPOINT = str(TESTDATA / "t5x_t5_1_1_tiny" / "checkpoint_3")
SPM = str(TESTDATA / "t5_vocab" / "sentencepiece.model")

HONOURED = [  # (bindings, {our setting: the value it must have})
    (["MIXTURE_OR_TASK_NAME='taskless_glue_sst2_v200_examples'"],
     {"train.task": "taskless_glue_sst2_v200_examples"}),
    (["MIXTURE_OR_TASK_MODULE='prompt_tuning.data.glue'"], {}),
    (["TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4}"],
     {"train.input_length": 32, "train.target_length": 4}),
    (["BATCH_SIZE=4"], {"train.batch_size": 4}),
    (["TRAIN_STEPS=7"], {"train.num_steps": 7}),  # no checkpoint: it starts at step 0
    ([f"INITIAL_CHECKPOINT_PATH='{T5X_CHECKPOINT}'", "TRAIN_STEPS=13"],
     {"train.num_steps": 10, "frozen_model.checkpoint": T5X_CHECKPOINT}),  # 13 - step 3
    (["TRAIN_STEPS_RELATIVE=6"], {"train.num_steps": 6}),
    (["MODEL_DIR='/tmp/a_run'"], {"train.model_dir": "/tmp/a_run"}),
    (["USE_CACHED_TASKS=False"], {}),
    (["DROPOUT_RATE=0.2"], {"train.dropout_rate": 0.2}),
    (["RANDOM_SEED=5"], {"train.seed": 5}),
    (["EVAL_PERIOD=3"], {"train.eval_every": 3}),
    (["EVAL_STEPS=3"], {"train.eval_max_examples": 24}),  # 3 batches of smoke's 8
    (["EVALUATOR_NUM_EXAMPLES=12"], {"train.eval_max_examples": 12}),
    (["EVALUATOR_USE_MEMORY_CACHE=True"], {}),
    (["USE_HARDWARE_RNG=False"], {}),
    (["JSON_WRITE_N_RESULTS=None"], {}),
    (["EVAL_OUTPUT_DIR='/tmp/evals'"], {"evaluate.model_dir": "/tmp/evals"}),
    (["Z_LOSS=0.001"], {"train.z_loss": 0.001}),
    (["LABEL_SMOOTHING=0.1"], {"train.label_smoothing": 0.1}),
    (["LOSS_NORMALIZING_FACTOR=None"], {"train.loss_normalizer": "sum"}),
    (["PROMPT_LENGTH=6"], {"train.prompt_length": 6}),
    (["CLASS_LABELS=['positive', 'negative']"],  # the task's labels, in the slots' order
     {"prompts.class_labels.label_order": ["positive", "negative"]}),
    # (train.trainable set first, as a gin file might: the t5x name wins)
    (["train.trainable=['.*']", "PROMPT_REGEX=['.*/prompt/.*']"],
     {"train.trainable": [".*prompt.*"]}),
    (["PROMPT_REGEX=['prompt/p.*']"], {"train.trainable": ["prompt/p.*"]}),
    (["TRAINABLE_REGEX=['.*']"], {"train.trainable": [".*"]}),
    (["ACTIVATION_DTYPE='bfloat16'"], {"frozen_model.overrides": {"dtype": "bfloat16"}}),
    (["NUM_HEADS=2", "HEAD_DIM=16", "EMBED_DIM=32", "MLP_DIM=48", "NUM_EMBEDDINGS=384",
      "NUM_ENCODER_LAYERS=1", "NUM_DECODER_LAYERS=1"],
     {"frozen_model.overrides": {"num_heads": 2, "head_dim": 16, "emb_dim": 32, "mlp_dim": 48,
                                 "vocab_size": 384, "num_encoder_layers": 1,
                                 "num_decoder_layers": 1}}),
    (["ACTIVATION_PARTITIONING_DIMS=2"], {"train.activation_partitioning_dims": 2}),
    (["VOCABULARY=@seqio.SentencePieceVocabulary()",
      f"seqio.SentencePieceVocabulary.sentencepiece_model_file='{SPM}'"],
     {"train.vocabulary": SPM}),
    (["partitioning.PjitPartitioner.num_partitions=2"],
     {"train.num_partitions": 2, "evaluate.num_partitions": 2}),
    (["partitioning.PjitPartitioner.model_parallel_submesh=(1, 2, 1, 2)"],
     {"train.num_partitions": 4}),
    (["partitioning.PjitPartitioner.logical_axis_rules="
      "@partitioning.standard_logical_axis_rules()",
      "partitioning.standard_logical_axis_rules.parameter_partitioning_dims=2"],
     {"train.parameter_partitioning_dims": 2}),
    (["utils.SaveCheckpointConfig.period=5", "utils.SaveCheckpointConfig.keep=3"],
     {"train.eval_every": 5, "train.keep_checkpoints": 3}),
    (["utils.create_learning_rate_scheduler.factors='constant'",
      "utils.create_learning_rate_scheduler.base_learning_rate=0.5"],
     {"optim.adafactor.learning_rate": 0.5}),
    (["adafactor.Adafactor.decay_rate=0.7", "adafactor.Adafactor.weight_decay_rate=0.0"],
     {"optim.adafactor.decay_rate": 0.7, "optim.adafactor.weight_decay_rate": 0.0}),
    (["prompts.Prompt.length=7"], {"train.prompt_length": 7}),
    (["train/utils.DatasetConfig.pack=False"], {}),
    (["utils.DatasetConfig.batch_size=16", "utils.DatasetConfig.split='test'"],
     {"train.batch_size": 16, "evaluate.batch_size": 16, "evaluate.split": "test"}),
]

REFUSED = [  # (bindings, what the one-line error must say besides the name)
    (["MIXTURE_OR_TASK_MODULE='my_project.tasks'"], "tasks here are built in"),
    (["USE_CACHED_TASKS=True"], "no seqio cache"),
    (["RANDOM_SEED=None"], "give an integer"),
    (["USE_HARDWARE_RNG=True"], "threefry"),
    (["JSON_WRITE_N_RESULTS=5"], "softprompt-jax infer"),
    ([f"INITIAL_CHECKPOINT_PATH='{T5X_CHECKPOINT}'", "TRAIN_STEPS=3"],
     "not past the initial checkpoint's step 3"),
    (["CLASS_LABELS=['great', 'terrible']"], "task taskless_synthetic_sentiment's labels"),
    (["TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4, 'extra': 1}"], "two features"),
    (["partitioning.PjitPartitioner.num_partitions=2",
      "partitioning.PjitPartitioner.model_parallel_submesh=(2, 2, 1, 2)"], "both set"),
    (["partitioning.PjitPartitioner.params_on_devices=False"], "params_on_devices"),
    (["utils.SaveCheckpointConfig.keep=None"], "keeping all is not offered"),
    (["utils.SaveCheckpointConfig.period=5", "EVAL_PERIOD=10"], "both set"),
    (["utils.create_learning_rate_scheduler.factors='constant * rsqrt_decay'"],
     "constant schedule"),
    (["train/utils.DatasetConfig.pack=True"], "never packed"),
    (["adafactor.Adafactor.step_offset=5"], "step_offset"),
    # Names with no meaning here: no setting reads them.
    *[([f"{name}=1"], "no setting reads") for name in (
        "PROMPT", "MODEL", "ARCHITECTURE", "OPTIMIZER", "PER_LAYER_PROMPT", "EMBEDDING_FILE",
        "VERBALIZERS", "TASK_STRING", "TASK_PIECES", "SCALE", "NUM_TASKS", "LAYER_REMAT",
        "DROPOUT_FACTORY", "BIAS_INIT", "LABELS", "PROMPT_FILE", "CHECKPOINT_PATH")],
    (["OPTIMIZER=@optim.MultiOptimizer()"], "MultiOptimizer"),  # a t5x class: unknown here
]


def _value(selector: str):
  try:
    value = gin.query_parameter(selector)
  except ValueError:  # not bound: the function's default applies
    return "<unbound>"
  if isinstance(value, gin.config.ConfigurableReference) and value.selector == "gin.macro":
    value = gin.query_parameter(str(value))
  return value


@pytest.mark.parametrize("bindings, expected", HONOURED, ids=lambda x: str(x)[:60])
def test_a_t5x_name_is_honoured(bindings, expected):
  before = {}
  gin_setup.parse(["runs/smoke.gin"], [b for b in bindings if b.startswith("train.")], None)
  for selector in expected:
    before[selector] = _value(selector) if selector != "frozen_model.overrides" else {}
  gin_setup.parse(["runs/smoke.gin"], bindings, None)
  for selector, value in expected.items():
    got = _value(selector)
    if selector == "frozen_model.overrides":  # merged into the models file's overrides
      got = {k: got[k] for k in value}
    assert got == value, (selector, got)
    assert got != before[selector], f"{selector} had that value anyway: the test proves nothing"


@pytest.mark.parametrize("bindings, says", REFUSED, ids=lambda x: str(x)[:60])
def test_a_t5x_name_is_refused_naming_it(bindings, says):
  with pytest.raises(ConfigError) as error:
    gin_setup.parse(["runs/smoke.gin"], bindings, None)
  message = str(error.value)
  assert "\n" not in message and says in message, message
  names = [b.split("=")[0].split("/")[-1] for b in bindings]
  assert any(name in message or name.rsplit(".", 1)[-1] in message for name in names), message


def test_refusal_is_exit_2_before_any_work(tmp_path, capsys, no_expensive_work):
  run = tmp_path / "run"
  capsys.readouterr()
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.USE_CACHED_TASKS=True"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "USE_CACHED_TASKS" in err[0], err
  assert not run.exists()


def test_an_unread_macro_in_a_gin_file_is_refused(tmp_path):
  mine = tmp_path / "mine.gin"
  mine.write_text("include 'runs/smoke.gin'\nTRAIN_STEP = 5  # a typo: nothing reads it\n")
  with pytest.raises(ConfigError, match="macro TRAIN_STEP is set in a gin file, but no setting"):
    gin_setup.parse([str(mine)], [], None)


@pytest.mark.parametrize("init", ["sampled_vocab", "random_uniform", "from_file"])
@pytest.mark.parametrize("prompts_first", [True, False])
def test_a_prompt_init_file_wins_wherever_it_stands(init, prompts_first):
  files = [f"prompts/{init}.gin", "runs/smoke.gin"]
  gin_setup.parse(files if prompts_first else files[::-1], [], None)
  expected = {"from_file": "from_npy"}.get(init, init)
  assert gin.query_parameter("train.prompt_init").selector == f"prompts.{expected}"


def test_batch_size_macro_sets_the_batch(tmp_path):
  run = tmp_path / "run"
  assert main(["train", *SMOKE, "--model_dir", str(run), "--gin.BATCH_SIZE=16",
               "--gin.TRAIN_STEPS=2", "--gin.train.eval_every=2"]) == 0
  operative = (run / "operative_config.gin").read_text()
  assert "BATCH_SIZE = 16" in operative and "train.batch_size = %BATCH_SIZE" in operative
  assert "train.num_steps = 2" in operative


def test_prompt_tuning_task_names_with_version_suffixes_resolve():
  from softprompt_jax.data import get_task
  assert get_task("taskless_glue_sst2_v200_examples").name == "taskless_glue_sst2"
  assert get_task("glue_rte_v002").name == "glue_rte"


def test_gin_search_paths_are_looked_in_first(tmp_path, capsys, no_expensive_work):
  mine = tmp_path / "my configs"
  (mine / "runs").mkdir(parents=True)
  # A file named like a shipped one: the search path's copy wins, and its setting is refused
  # here (a bad value), which shows it was the one read.
  (mine / "runs" / "smoke.gin").write_text("include 'models/tiny.gin'\n"
                                           "include 'runs/prompt_finetune.gin'\n"
                                           "TASK = 'taskless_synthetic_sentiment'\n"
                                           "train.num_steps = -5\n")
  capsys.readouterr()
  status = main(["train", "--gin_search_paths", f"{tmp_path / 'elsewhere'},{mine}",
                 *SMOKE, "--model_dir", str(tmp_path / "run")])
  err = capsys.readouterr().err
  assert status == 2 and "train.num_steps=-5" in err, err
