"""Hostile and careless input (issue 17): recipe paths that would import code, config.json / recipe / data files
with the wrong types or bytes. Every one must be a clear error naming the file and field (or line), never a traceback
from deep inside, and never code execution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from litebert.config import ConfigError
from litebert.training import finetune
from litebert.training.finetune import resolve_path


# -- 1. pkg: paths never import ----------------------------------------------------------------------------------
def test_pkg_path_does_not_import_the_named_module(tmp_path):
    """`pkg:evil.sub/x` used to import `evil` (find_spec imports parents); the side effect must not happen."""
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\n")
    (tmp_path / "evilpkg").mkdir()
    (tmp_path / "evilpkg" / "__init__.py").write_text(f"open({str(tmp_path / 'pwned2')!r}, 'w').write('x')\n")
    (tmp_path / "evilpkg" / "sub").mkdir()
    code = ("import sys; from litebert.training.finetune import resolve_path; from litebert.config import ConfigError\n"
            "for v in ('pkg:evil.sub/t.csv', 'pkg:evil/t.csv', 'pkg:evilpkg.sub/t.csv', 'pkg:evilpkg/t.csv'):\n"
            "    try: print(resolve_path(v))\n"
            "    except ConfigError as e: print('refused', e)\n"
            "assert 'evil' not in sys.modules and 'evilpkg' not in sys.modules\n")
    env = {"PYTHONPATH": f"{tmp_path}:{Path(finetune.__file__).parents[2]}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused") and lines[1].startswith("refused")  # a module, not a package
    assert lines[2] == str(tmp_path / "evilpkg" / "sub" / "t.csv")  # a directory, located without running it


@pytest.mark.parametrize("value,match", [
    ("pkg:../x", "not a Python package name"),
    ("pkg:/etc/passwd", "not a Python package name"),
    ("pkg:litebert/../../../etc/passwd", "must stay inside"),
    ("pkg:litebert//etc/passwd", "must stay inside"),
    ("pkg:os;print(1)/x", "not a Python package name"),
    ("pkg:litebert.no_such_sub/x", "no installed Python package 'litebert.no_such_sub'"),
])
def test_pkg_path_names_are_validated_and_stay_inside(value, match):
    with pytest.raises(ConfigError, match=match):
        resolve_path(value)


def test_pkg_path_symlink_out_of_the_package_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "datapkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "link").symlink_to("/etc")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_path("pkg:datapkg/a.csv") == str(pkg / "a.csv")
    with pytest.raises(ConfigError, match="outside the package"):
        resolve_path("pkg:datapkg/link/passwd")
