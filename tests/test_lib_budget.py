"""lib/ stays small (issue 10 item 3), counted per module the way shared/tools/codelines.py
counts them: not blank lines, not comment-only lines, not docstrings. The count is printed at the
end of every run (tests/conftest.py), passing or not.

The budget: issue 10 asked for 1,500 code lines. Measured after its second pass of the
foundation, lib/ holds just under 2,000: one HTTP/1.1 connection machine with the bytes it
parses (about 430), the two transports that drive it and the runner (about 320), and the common contract every server
keeps (routing and OpenAPI, requests and their typed readers, validation naming every field,
the list contract, problems, middleware, trace, storage). Reaching 1,500 would mean moving body
validation and the list contract out of lib/, which level 01 uses (a level 01 project cannot
import a level 02 lesson) and whose unit tests would become tests of a project's internals. So
the budget is restated at 2,000 here, measured and explained in that issue's closing note; it is
a ceiling, so lib/ cannot grow without someone deciding it should.

Issue 12 then asked lib/ for two pieces of request parsing that uploads need: streamed request
bodies (a route's `body_sink`, about 20 lines across the connection machine, the decoders and
the transports) and the multipart/form-data parser (lib/multipart.py, about 115). The ceiling
moved with them to 2,150, the step of that issue's closing note (2,300 proposed for all thirty).
Issue 14 asked lib/ for `--log-to URL` (level06.md: every server can ship its access log to the
central logging service, batching, never blocking a request): about 45 lines, and the ceiling
is 2,200.
Issue 15 asked lib/ for the two mechanisms every server benefits from (level07.md section 30):
Prometheus metrics (lib/metrics.py: counters, gauges, histograms and `GET /metrics`, about 95
lines) and JSON logs with a level (lib/logs.py, which took the access log and `--log-to` out of
middleware.py: about 30 lines more). That is the last of what the thirty projects ask of lib/;
the ceiling is 2,350 (2,339 used at the end of that session, with two drain fixes in the
transports), against the 2,300 proposed before metrics were written and measured.
"""
import ast
import io
import tokenize

from tests.harness import ROOT

LIB_BUDGET = 2350
_NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENDMARKER}


def code_lines(source):
    """The number of lines that hold code: a docstring, a comment or a blank line is not code."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NOT_CODE:
            lines.update(n for n in range(token.start[0], token.end[0] + 1)
                         if n not in docstrings)
    return len(lines)


def lib_code_lines():
    """{module file name: code lines} for every module of lib/, in name order."""
    return {path.name: code_lines(path.read_text(encoding="utf-8"))
            for path in sorted((ROOT / "lib").glob("*.py"))}


def budget_report():
    counts = lib_code_lines()
    total = sum(counts.values())
    rows = [f"{count:6d}  lib/{name}" for name, count in counts.items()]
    verdict = "within" if total <= LIB_BUDGET else "OVER"
    return "\n".join(rows + [f"{total:6d}  lib/ in all, {verdict} the budget of {LIB_BUDGET:,}"])


def test_code_lines_counts_code_only():
    source = '"""Module doc."""\n\n# a comment\nimport os  # why\n\n\ndef f(x):\n    """Doc,\n' \
             '    two lines."""\n    return (x +\n            1)\n'
    assert code_lines(source) == 4  # import, def, and the return over two lines


def test_lib_is_within_its_budget():
    counts = lib_code_lines()
    assert counts, "no modules in lib/"
    total = sum(counts.values())
    assert total <= LIB_BUDGET, f"lib/ has {total} code lines, over its budget of " \
                                f"{LIB_BUDGET}:\n{budget_report()}"
