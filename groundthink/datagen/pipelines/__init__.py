"""Pipelines, registered by name (the `pipeline=` choice; conf/pipeline/<name>.yaml holds the settings)."""

from __future__ import annotations

from groundthink.datagen.pipelines.base import Pipeline, PipelineError, RunContext
from groundthink.datagen.pipelines.responses import ResponsesPipeline
from groundthink.datagen.pipelines.stage1 import Stage1Pipeline

PIPELINES: dict[str, type[Pipeline]] = {"responses": ResponsesPipeline, "stage1": Stage1Pipeline}

__all__ = ["PIPELINES", "Pipeline", "PipelineError", "RunContext"]
