"""Unit: `make lint` on a machine without docker-compose, with `id` and `apt-get` faked on a PATH
that holds nothing else the Makefile would find docker-compose on. Nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


def make_without_docker_compose(tmp_path: Path, target: str, uid: int) -> subprocess.CompletedProcess[str]:
    """`make target` as user `uid` on a PATH without docker-compose; a fake apt-get records its
    arguments, and fails to install, so that nothing runs past the install step."""
    make = shutil.which("make")
    assert make, "make is not installed"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sort").symlink_to(shutil.which("sort") or "/usr/bin/sort")
    for name, script in {
        "id": f"echo {uid}",
        "apt-get": f'echo "$*" >> {tmp_path}/apt-get.log; [ "$1" = update ]',
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    # -o: never rebuild the virtual environment here, whatever the files' times say.
    return subprocess.run(
        [make, "-o", ".venv/.installed", target], cwd=ROOT, env={"PATH": str(bin_dir)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_lint_without_docker_compose_fails_and_says_what_to_install(tmp_path: Path) -> None:
    done = make_without_docker_compose(tmp_path, "lint", uid=1000)
    assert done.returncode != 0, done.stdout  # it used to print "NOT validated" and pass
    assert "sudo apt-get install docker-compose" in done.stderr
    assert "ruff" not in done.stdout  # it stopped before the checks, not after them


@pytest.mark.parametrize("target", ["lint", "test"])
def test_as_root_docker_compose_is_installed_before_anything_runs(tmp_path: Path, target: str) -> None:
    """As in CI on a fresh machine: `make test` and `make lint` install docker-compose first."""
    done = make_without_docker_compose(tmp_path, target, uid=0)
    assert done.returncode != 0  # the fake apt-get's install fails
    assert (tmp_path / "apt-get.log").read_text().splitlines() == [
        "update -qq",
        "install -y -qq --no-install-recommends docker-compose",
    ]
    assert "ruff" not in done.stdout and "pytest" not in done.stdout
