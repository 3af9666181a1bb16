"""The package's structure, as the README's map states it: every module has a layer, an import
only ever points down (or within its layer), module imports form no loop, package imports sit at
module top, and no module grows past what one reader can hold."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "softprompt_jax"

# Bottom to top, as in the README's "What is here".
LAYERS = [
    ("foundations", ["errors", "config_checks", "output_files", "run_layout", "paths"]),
    ("config and math", ["t5_config", "t5_layers", "t5", "losses", "optim", "tokenizers",
                         "metrics", "flops"]),
    ("model variants", ["prompt_init", "prompt_masks", "prompted_t5", "decoding",
                        "nearest_tokens", "ensemble", "prompt_similarity"]),
    ("steps and sharding", ["partitioning", "train_step", "preemption", "multihost",
                            "sweep_step"]),
    ("checkpoints and data", ["checkpoints", "data", "model_spec", "peft_interop", "prompts",
                              "pretrained", "methods"]),
    ("the run", ["run_setup", "evaluation", "training_loop", "run_dir", "run_log",
                 "run_summary", "curves", "tensorboard_events", "progress", "run_lock",
                 "sweep_plan", "sweep"]),
    ("commands", ["inference", "prompt_reports", "demo", "generate", "t5x_compat", "serving",
                  "gin_setup",
                  "cli", "__main__"]),
]
MAX_LINES = 450
MAX_TRAINING_LOOP_LINES = 250


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    found[name] = path
  return found


MODULES = _modules()


def _layer(module: str) -> int:
  top = module.split(".")[0]
  for index, (_, members) in enumerate(LAYERS):
    if top in members:
      return index
  raise AssertionError(f"softprompt_jax.{module} has no layer in the map; add it to LAYERS "
                       "(and to the README's 'What is here')")


def _imports(path: pathlib.Path) -> tuple[set[str], list[str]]:
  """(package modules imported at module top, those imported inside functions), by name
  relative to the package."""
  tree = ast.parse(path.read_text())
  top, inner = set(), []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:  # `from pkg import module` imports the module, not pkg
        full = f"{node.module}.{alias.name}"
        names.append(full if full.removeprefix("softprompt_jax.") in MODULES else node.module)
    names = [n.removeprefix("softprompt_jax.") for n in names
             if n.startswith("softprompt_jax.")]
    if names:
      (top.update(names) if node in tree.body else inner.extend(names))
  return top, inner


def test_every_import_points_down_or_within_its_layer():
  wrong = []
  for module, path in MODULES.items():
    if not module:  # the package's face imports its public names from every layer
      continue
    for target in _imports(path)[0]:
      if target.split(".")[0] == module.split(".")[0]:
        continue  # inside one package (checkpoints/, data/)
      if _layer(target) > _layer(module):
        wrong.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "
                     f"({LAYERS[_layer(target)][0]})")
  assert not wrong, wrong


def test_module_imports_form_no_loop():
  graph = {m: {t for t in _imports(p)[0] if t in MODULES and t != m}
           for m, p in MODULES.items() if m}
  for module in graph:  # a package's __init__ importing its own modules is not a loop
    graph[module] -= {module.split(".")[0]} if "." in module else set()
  state = {}

  def visit(node, trail):
    state[node] = "open"
    for target in sorted(graph.get(node, ())):
      if state.get(target) == "open":
        raise AssertionError(f"import loop: {' -> '.join(trail + [node, target])}")
      if target not in state:
        visit(target, trail + [node])
    state[node] = "done"
  for module in sorted(graph):
    if module not in state:
      visit(module, [])


def test_package_imports_sit_at_module_top():
  inside = {m: _imports(p)[1] for m, p in MODULES.items() if _imports(p)[1]}
  assert sum(len(v) for v in inside.values()) <= 8, inside


def test_no_module_grows_past_what_one_reader_holds():
  sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
  assert max(sizes.values()) <= MAX_LINES, {m: n for m, n in sizes.items() if n > MAX_LINES}
  assert sizes["training_loop"] <= MAX_TRAINING_LOOP_LINES
