"""`python -m nqp docs --quick`: every figure and the generated Markdown are produced, deterministically."""
import re

from nqp import closed_form as cf
from nqp.cli import main


def _build(path, capsys):
    assert main(["docs", "--out", str(path), "--quick"]) == 0
    out = capsys.readouterr().out
    return [line.split("wrote ", 1)[1] for line in out.splitlines() if line.startswith("wrote ")]


def test_docs_quick_build_is_complete_and_deterministic(tmp_path, capsys):
    files = _build(tmp_path / "a", capsys)
    md = (tmp_path / "a" / "theory.md").read_text()
    assert not re.search(r"\{\{(tex|itex|fig|val|table):", md)  # every placeholder filled
    for name in re.findall(r"\]\(figures/([a-z_A-Z]+\.png)\)", md):
        png = tmp_path / "a" / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len(re.findall(r"\]\(figures/", md)) == sum(f.endswith(".png") for f in files) >= 10
    assert cf.latex()["additive_mean_plain"] in md  # sympy's formulas are inserted, not typed
    files_b = _build(tmp_path / "b", capsys)
    assert (tmp_path / "b" / "theory.md").read_text() == md
    for fa, fb in zip(sorted(files), sorted(files_b)):
        assert open(fa, "rb").read() == open(fb, "rb").read(), fa
