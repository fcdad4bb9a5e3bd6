"""The repository keeps its promises: CI runs the README's test command verbatim."""

import os

from conftest import REPO


def test_ci_runs_the_readme_test_command():
  lines = [l.strip() for l in open(os.path.join(REPO, ".ci", "run")) if l.strip() and not l.startswith("#")]
  command = lines[-1]
  assert "pytest" in command
  assert command in open(os.path.join(REPO, "README.md")).read()


def test_readme_commands_use_files_that_exist():
  readme = open(os.path.join(REPO, "README.md")).read()
  for path in ("configs/tiny.py", "configs/tiny_prompts.txt", "configs/dit.py", "scripts/quality_tiny.py"):
    assert path in readme and os.path.exists(os.path.join(REPO, path)), path
