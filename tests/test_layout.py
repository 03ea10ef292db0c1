"""The platform/models boundary, checked from the source: models never import the platform, and
the platform never names an architecture outside docstrings and comments (it reads specs from the
registry), so a new architecture touches only models/ and a preset."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE_NAMES = re.compile(r"mvptr|semvlp|simla", re.IGNORECASE)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _code_mentions(path: Path) -> list[str]:
    """Tokens that are neither comments nor docstrings and name an architecture."""
    text = path.read_text()
    docstrings = _docstring_lines(ast.parse(text))
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE) or tok.start[0] in docstrings:
            continue
        if ARCHITECTURE_NAMES.search(tok.string):
            hits.append(f"{path.relative_to(REPO)}:{tok.start[0]}: {tok.string}")
    return hits


def test_models_never_import_the_platform():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.startswith("alignlab.platform"))
                 for p in sorted((REPO / "models").glob("*.py"))}
    assert {p: m for p, m in offenders.items() if m} == {}


def test_the_platform_imports_models_but_names_no_architecture():
    assert any("alignlab.models.registry" in _imports(p) for p in (REPO / "platform").rglob("*.py"))
    hits = [h for p in sorted((REPO / "platform").rglob("*.py")) for h in _code_mentions(p)]
    assert hits == []


def test_the_checker_sees_code_but_not_docstrings_or_comments(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text('"""About MVPTR."""\n# SIMLA here\nx = "semvlp"  # fine\n\n\ndef f():\n    """SIMLA."""\n    mvptr = 1\n')
    global REPO
    old, REPO = REPO, tmp_path
    try:
        assert [h.split(": ")[1] for h in _code_mentions(src)] == ['"semvlp"', "mvptr"]
    finally:
        REPO = old


def test_the_data_stage_and_config_import_without_torch():
    """Every Ray Data CPU worker imports these (the Preprocessor and the configs it holds); torch
    would add about two seconds to each worker's start, every epoch."""
    import subprocess
    import sys

    code = ("import sys; import alignlab.platform.ingest, alignlab.platform.config, alignlab.platform.tokenization; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
