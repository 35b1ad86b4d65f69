"""Tasks: what classification and detection each give the run (tasks/base.py says what that is).
`task_for` is the one place that chooses between them."""

from __future__ import annotations

from transferkit.config import Config
from transferkit.tasks.base import Task
from transferkit.tasks.classification import ClassificationTask
from transferkit.tasks.detection import DetectionTask

TASKS = {"classification": ClassificationTask, "detection": DetectionTask}


def task_for(cfg: Config) -> Task:
    """The task of a config (cfg.task), bound to that config."""
    return TASKS[cfg.task](cfg)
