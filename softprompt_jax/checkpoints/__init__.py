"""Checkpoints, apart from training: reading a frozen T5 (loading.py: `load_t5`, `open_checkpoint`,
over the t5x.py and hf.py readers), writing one (hf_writer.py, t5x_writer.py), converting between
the two formats (convert.py), the prompt-only checkpoints of a run (state.py) and whether files are
the ones written (integrity.py)."""
