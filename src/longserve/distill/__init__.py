"""Distilling a domain draft model for speculative decoding (`longserve distill`)."""

from longserve.distill.data import DistillDataError, read_prompts, synthesize_prompts
from longserve.distill.export import export_model
from longserve.distill.pipeline import run_distill
from longserve.distill.teacher import TeacherData, build_teacher_data
from longserve.distill.train import DistillError, TrainConfig, evaluate, merge_lora

# `longserve.distill.train` stays the module (its `train()` is not re-exported, which would shadow it)
__all__ = [
    "DistillDataError",
    "DistillError",
    "TeacherData",
    "TrainConfig",
    "build_teacher_data",
    "evaluate",
    "export_model",
    "merge_lora",
    "read_prompts",
    "run_distill",
    "synthesize_prompts",
]
