"""The Redis Lua scripts live in ``kvstore/lua/`` and ship in the wheel."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from kvstore.redis_scripts import PRELUDE, SCRIPTS, load_scripts

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "kvstore" / "lua"


def test_every_script_file_is_loaded_once_with_its_folders_prelude() -> None:
    for family in ("store", "lane"):
        folder = LUA / family
        names = sorted(p.stem for p in folder.glob("*.lua") if p.name != PRELUDE)
        scripts = load_scripts(family)
        assert sorted(scripts) == names
        prelude = (folder / PRELUDE).read_text()
        assert all(body.startswith(prelude) for body in scripts.values())
        assert load_scripts(family) is scripts  # read once
    assert SCRIPTS is load_scripts("store")
    assert {"put", "get", "release", "match_prefix"} <= set(SCRIPTS)


def test_the_package_data_globs_cover_every_lua_file() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["kvstore"]
    files = [p.relative_to(ROOT / "kvstore").as_posix() for p in LUA.rglob("*.lua")]
    assert files
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)
