"""Synthetic data generation: backends, resumable pipelines, critics, the contamination guard, QC and provenance.

`groundthink-datagen` (groundthink/datagen/cli.py, a Hydra app with its own primary config conf/datagen.yaml)
drives a pipeline (`responses`, `stage1`) against a backend (an OpenAI-compatible HTTP server, a GroundThink run,
a Hugging Face causal LM) over a prompt set, writing exactly-once resumable chat JSONL with provenance on every
record, a manifest per run and a QC gate (`groundthink-datagen qc <file or run>`).
"""
