"""CI runs what the README tells a new user to run: the two commands of its install block, each in a fresh
virtualenv, and the kernel-sensitive tests again on another instruction set."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"On a fresh machine.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ['pip install -e . && python -m nqp predict',
                        'pip install -e ".[test]" && python -m pytest -n 2']
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"))]
    for command in commands:
        assert any(line.startswith(command + " ||") for line in ci), command
    assert ci.index(next(line for line in ci if line.startswith(commands[0]))) < \
        ci.index(next(line for line in ci if line.startswith(commands[1])))
    rerun = next(line for line in ci if line.startswith("export MKL_ENABLE_INSTRUCTIONS="))
    assert "ATEN_CPU_CAPABILITY=default" in rerun and any("-m kernels" in line for line in ci)


def test_kernels_marker_is_registered():
    assert "kernels:" in open(os.path.join(ROOT, "pyproject.toml")).read()
