"""Where the project's own files are, defined once. An editable install (pip install -e .) keeps
them in the checkout, beside train.py."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "train.py"  # every run is a subprocess of this script
PROJECT_MODEL = ROOT / "model.py"  # the model space; the one file code proposals replace
PROMPTS_DIR = ROOT / "prompts"  # the LLM's Jinja templates
CONFIGS_DIR = ROOT / "configs"  # the shipped literature configs (the warm start)
