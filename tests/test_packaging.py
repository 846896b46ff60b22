"""What ships beside the code: the license, and the benchmark driver's exit status."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MIT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:
"""


def test_the_license_file_is_the_mit_license_pyproject_names() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the trio_relay authors\n")
    assert MIT in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def _compare(bench_dir: Path, bench_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENCH_DIR": str(bench_dir), "BENCH_HOME": str(bench_home)}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_compare_fails_when_the_shared_benchmark_is_missing(tmp_path: Path) -> None:
    result = _compare(tmp_path / "no-bench", tmp_path)
    assert result.returncode != 0
    assert (
        result.stderr == f"no benchmark driver at {tmp_path / 'no-bench'}/run.py (set BENCH_DIR)\n"
    )


def test_compare_fails_when_the_benchmark_gives_no_figures(tmp_path: Path) -> None:
    # A driver that runs and exits 0 but measures nothing (its servers failed, say): the
    # comparison is missing, and so must the exit status say.
    bench = tmp_path / "bench"
    bench.mkdir()
    home = tmp_path / "home"
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "python").touch()
    (home / "node_modules").mkdir()  # set up already: no setup.sh to run
    results = tmp_path / "results.jsonl"
    results.write_text("")
    (bench / "run.py").write_text(f"import sys\nprint('raw: {results}', file=sys.stderr)\n")
    result = _compare(bench, home)
    assert result.returncode == 1, result
    assert "no fan-out figures of both trio_relay and floor to compare" in result.stderr
    (bench / "run.py").write_text("pass\n")  # and one that names no results at all
    result = _compare(bench, home)
    assert result.returncode == 1, result
    assert "the benchmark named no results file" in result.stderr
