import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_MODULES = ["differad_rl", "differad_rl.coords", "differad_rl.parsing", "differad_rl.boxes", "differad_rl.rewards",
                "differad_rl.groups", "differad_rl.resampling", "differad_rl.prompts"]


def test_core_imports_no_framework():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE_MODULES)
        + "bad = [m for m in ('trl', 'verl', 'transformers', 'ray', 'vllm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_core_file_imports_a_framework():
    pattern = re.compile(r"^\s*(import|from)\s+(trl|verl|transformers|ray|vllm)\b", re.M)
    offenders = [str(p) for p in (ROOT / "differad_rl").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    test_cmd = [line for line in block.splitlines() if "pytest" in line]
    assert len(test_cmd) == 1
    # CI adds -q flags to pip for quieter logs; the commands themselves must be the README's
    normalise = lambda s: re.sub(r"\s+-q(?=\s)", "", s).strip()  # noqa: E731
    assert normalise(test_cmd[0]) in [normalise(line) for line in ci.splitlines()]
