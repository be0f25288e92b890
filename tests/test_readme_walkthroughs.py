"""Every project's README walk-through runs against a fresh server, so the READMEs cannot rot.

THE CONVENTION (for whoever writes `levelNN/<name>.md`)

- The walk-through is every fenced block whose info string is `sh` (a line of three backticks
  then `sh`), in the order they appear in the README. Use another info string (`bash`, `text`,
  `console`, none) for shell snippets that must not be run: output samples, commands for a second
  terminal, anything that needs tools beyond bash, curl and python3.
- A block whose first command line starts with `python ` or `python3 ` is how to run the server:
  it is not run. The test starts the server itself, with `--port 0` and a temporary `--db`, plus
  the other flags of the FIRST such line (`python level01/counter.py --memory` → `--memory`;
  `--host`, `--port` and `--db` are replaced; a `/tmp/` path among them is pointed at the
  test's own directory, as in the commands, so `--log /tmp/x.log` names the file the commands
  read). Keep the run command in a block of its own.
- Every other line is a shell command, run in order by one bash process (`set -e -o pipefail`),
  so a variable set on one line is visible to later lines:
      TOKEN=$(curl -s -X POST localhost:8008/auth/login -d '…' \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  A line ending in a backslash continues on the next line. Lines starting with `#` and blank
  lines are skipped. No here-documents; keep each command on its (continued) line.
- Every `localhost:<default port>` and `127.0.0.1:<default port>` is replaced with the test
  server's real `host:port` (the default port is 8000 + the project's number).
- A command may end with a comment `# → 201` (an arrow, then a status code; `# -> 201` works
  too): the test asserts that the LAST HTTP response of that command had that status.
- Every command must exit with status 0, and no response may be a 5xx unless the command's
  `# →` comment says so. `curl` is a bash function that adds `-sS` and reports each status on
  stderr (`-w '%{stderr}…'`), so a curl's stdout stays exactly the body (pipe it to python3
  freely), but a walk-through curl must not pass `-w`/`--write-out` itself.
- Commands run with the repository root as the working directory. Anything they create must go
  under `data/` (git-ignored) or `/tmp`; the test points `/tmp/` at a directory of its own, so
  concurrent runs never share a file.
- A README without a walk-through fails the test: every project has one.

OUTPUT BLOCKS: a fenced block that is not `sh` and follows a walk-through block with nothing but
blank lines between them (or follows such a block the same way) shows what the commands of that
walk-through block print. Each of its non-blank lines must match a line of their real output, in
order (lines the README leaves out are skipped), after normalising what legitimately varies:
RFC 3339 times, HTTP dates, request ids and other long tokens, JWTs, durations, and the values
of `Date`, `X-Request-Id`, `Server-Timing`, `Content-Length`. `...` or `…` stands for anything
within a line; a line of its own `...` is just a reminder that lines are left out. The header
lines under an `HTTP/1.1 …` status line may come in any order.

TRACE SAMPLES: a fenced block whose lines start with `trace <id> METHOD /path` followed by
`  +   0.013 ms    → step` lines is a `--trace` sample. The test runs the same request against
the server started with `--trace` and requires the same `→` steps in the same order (a `...`
line stands for steps left out).
"""
import datetime
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness import ROOT, clean_env
from tests.projects import NOT_STANDALONE, existing_projects

WALKTHROUGH_TIMEOUT = 120  # s for a whole walk-through
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)[^`]*$")
EXPECTED = re.compile(r"#\s*(?:→|->)\s*(?P<status>[1-5][0-9]{2})\s*$")
RUN_LINE = re.compile(r"^(?:python3?)\s")
CMD_MARK = "@@WT_CMD"
HTTP_MARK = "@@WT_HTTP"
ERROR_MARK = "@@WT_ERROR"

PRELUDE = rf"""set -e -o pipefail
curl() {{
  local arg
  for arg in "$@"; do
    case "$arg" in
      -w|-w?*|--write-out|--write-out=*)
        printf '\n{ERROR_MARK} a walk-through curl may not use -w/--write-out\n' >&2
        return 97;;
    esac
  done
  # curl writes its -w text in several writes; held and printed at once, the status line
  # cannot be split by a pipe's reader (`| tee`) writing the body to the same output.
  local err rc=0
  {{ err=$(command curl -sS -w '%{{stderr}}\n{HTTP_MARK} %{{http_code}}\n' "$@" 2>&1 1>&3 3>&-) || rc=$?; }} 3>&1
  printf '%s\n' "$err" >&2
  return $rc
}}
"""


# --------------------------------------------------------------------------------------------
# Parsing a README


def fenced_blocks(markdown):
    """(info string, [lines], adjacent) for every fenced code block, in order (CommonMark
    fences); `adjacent`: only blank lines separate it from the block before."""
    blocks, current, opener, info, prose = [], None, None, None, True
    for line in markdown.splitlines():
        if current is None:
            match = FENCE.match(line)
            if match:
                opener, info, current = match["fence"], match["info"], []
                adjacent, prose = not prose, False
            elif line.strip():
                prose = True
            continue
        stripped = line.strip()
        if stripped and set(stripped) == {opener[0]} and len(stripped) >= len(opener):
            blocks.append((info, current, adjacent))
            current = None
        else:
            current.append(line)
    if current is not None:  # an unclosed fence runs to the end of the document
        blocks.append((info, current, adjacent))
    return blocks


def logical_lines(lines):
    """Join backslash continuations; drop blank lines and `#` comment lines."""
    commands, pending = [], []
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line.rstrip())
        if not line.rstrip().endswith("\\"):
            commands.append("\n".join(pending))
            pending = []
    if pending:
        commands.append("\n".join(pending))
    return commands


class Walkthrough:
    def __init__(self, commands, run_line, outputs):
        self.commands = commands   # [(command, expected status or None)]
        self.run_line = run_line   # the README's first `python …` line, or None
        self.outputs = outputs     # [(first command index, end index, [expected lines])]


def parse_walkthrough(markdown):
    commands, run_line, outputs, group = [], None, [], None
    for info, lines, adjacent in fenced_blocks(markdown):
        if info != "sh":
            if group is not None and adjacent:
                group[2].extend(lines + [""])
                continue
            group = None
            continue
        group = None
        block = logical_lines(lines)
        if block and RUN_LINE.match(block[0].lstrip()):
            run_line = run_line or block[0]
            continue
        first = len(commands)
        for command in block:
            match = EXPECTED.search(command)
            commands.append((command, int(match["status"]) if match else None))
        if len(commands) > first:
            group = [first, len(commands), []]
            outputs.append(group)
    return Walkthrough(commands, run_line, [tuple(g) for g in outputs if g[2]])


def server_invocation(run_line, project):
    """The script and extra flags from the README's run line (`python levelNN/x.py --flag`),
    without --host/--port/--db, which the test sets."""
    if not run_line:
        return project.script, []
    words = shlex.split(run_line.replace("\\\n", " "), comments=True)[1:]
    script = project.script
    if words and words[0].endswith(".py"):
        named = words.pop(0)
        if (ROOT / named).is_file():
            script = named
    extra, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--host", "--port", "--db"):
            skip = True
        elif not word.startswith(("--host=", "--port=", "--db=")) and word != "&":
            extra.append(word)
    return script, extra


def localise(command, default_port, server):
    return re.sub(rf"\b(?:localhost|127\.0\.0\.1):{default_port}(?![0-9])",
                  f"{server.host}:{server.port}", command)


# --------------------------------------------------------------------------------------------
# Running it


def private_tmp(command, tmp_dir):
    """`/tmp/x` → `<this test's temporary directory>/x`: two runs at once share no file."""
    return re.sub(r"(?<![\w.~/-])/tmp/", f"{tmp_dir}/", command)


def build_script(walkthrough, project, server, tmp_dir):
    parts = [PRELUDE]
    for n, (command, _) in enumerate(walkthrough.commands):
        parts.append(f"printf '\\n{CMD_MARK} {n}\\n'")
        parts.append(private_tmp(localise(command, project.port, server), tmp_dir))
    parts.append(f"printf '\\n{CMD_MARK} end\\n'")
    return "\n".join(parts) + "\n"


def run_script(script_text, workdir):
    path = Path(workdir) / "walkthrough.sh"
    path.write_text(script_text, encoding="utf-8")
    proc = subprocess.Popen(["bash", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=clean_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=WALKTHROUGH_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    return proc.returncode, out.decode("utf-8", "replace"), timed_out


def split_output(output):
    """{command index or "end": its output} from the merged stdout/stderr of the script."""
    segments, key, current = {}, None, []
    for line in output.split("\n"):
        if line.startswith(CMD_MARK + " "):
            if key is not None:
                segments[key] = "\n".join(current)
            key, current = line.split()[1], []
            key = int(key) if key.isdigit() else key
        else:
            current.append(line)
    if key is not None:
        segments[key] = "\n".join(current)
    return segments


# --------------------------------------------------------------------------------------------
# Output blocks: what the README shows against what the commands printed


ELLIPSES = ("...", "…")
VOLATILE = [  # (pattern, placeholder): what differs from run to run
    (re.compile(r"^(date|x-request-id|server-timing|content-length|last-modified|age)"
                r"(:[ \t]*).*$", re.I), r"\1\2<value>"),
    (re.compile(r"\b\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)"), "<time>"),
    (re.compile(r"\b\d{8}T\d{6}Z\b"), "<time>"),
    (re.compile(r"\b[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\b"), "<date>"),
    (re.compile(r"\beyJ[\w-]*\.[\w-]*\.[\w-]*"), "<jwt>"),
    (re.compile(r"(?<![\w-])(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{16,}(?![\w-])"), "<token>"),
    (re.compile(r"\b\d+\.\d+(?= ?(?:ms|s)\b)"), "<n>"),
    (re.compile(r"\b(?:localhost|127\.0\.0\.1):\d{2,5}\b"), "<host>"),  # the test's own port
    (re.compile(r"(dur=|\"uptime\w*\": )\d+(?:\.\d+)?"), r"\1<n>"),
]
STATUS_LINE = re.compile(r"HTTP/\d(?:\.\d)? \d{3}\b")
HEADER_LINE = re.compile(r"[A-Za-z0-9-]+:( |$)")


DATE = re.compile(r"\b\d{4}-\d\d-\d\d\b")


def today_dates():
    """Yesterday, today and tomorrow (UTC): a walk-through's "due today" moves with the clock."""
    now = datetime.datetime.now(datetime.timezone.utc).date()
    return {str(now + datetime.timedelta(days=d)) for d in (-1, 0, 1)}


def normalise(line, *, actual=False):
    line = line.rstrip()
    for pattern, placeholder in VOLATILE:
        line = pattern.sub(placeholder, line)
    if actual:
        line = DATE.sub(lambda m: "<today>" if m[0] in today_dates() else m[0], line)
    return line


def line_pattern(expected):
    # a date the README shows may have been "today" when it was written
    parts = DATE.split(normalise(expected))
    dates = DATE.findall(normalise(expected))
    text = "".join(re.escape(part) + (f"(?:{dates[n]}|<today>)" if n < len(dates) else "")
                   for n, part in enumerate(parts))
    for ellipsis in ELLIPSES:
        text = text.replace(re.escape(ellipsis), ".*?")
    return re.compile(text)


def unbalanced(line):
    return sum(line.count(c) for c in "{[") > sum(line.count(c) for c in "}]")


def logical_output_lines(expected_lines):
    """Each expected line alone, and where a JSON line is wrapped (its brackets open), also the
    lines joined up to where they close: the README may wrap a long one-line answer."""
    for n, line in enumerate(expected_lines):
        joined, end = line.rstrip(), n
        while unbalanced(joined) and end + 1 < len(expected_lines) \
                and expected_lines[end + 1].strip():
            end += 1
            joined += " " + expected_lines[end].strip()
        yield n, line, (joined, end) if end > n else None


def printed_lines(output):
    """What the commands printed, line by line, without the test's own markers."""
    lines = output.replace("\r", "").split("\n")
    return [line for line in lines if not line.startswith((HTTP_MARK, CMD_MARK))]


def _find(pattern, actual, start, end=None):
    return next((n for n in range(start, len(actual) if end is None else end)
                 if actual[n].strip() and pattern.fullmatch(normalise(actual[n], actual=True))),
                None)


def unmatched_line(expected_lines, actual):
    """The first expected line with no match in `actual` (in order), or None."""
    position, head, skip_to = 0, None, -1  # head: (start, end) of the response head
    for n, line, wrapped in logical_output_lines(expected_lines):
        if n <= skip_to:
            continue
        if not line.strip():
            head = None
            continue
        if line.strip() in ELLIPSES:
            continue
        if head is not None and HEADER_LINE.match(line):
            if _find(line_pattern(line), actual, head[0], head[1]) is None:
                return line
            position = max(position, head[1])
            continue
        found = _find(line_pattern(line), actual, position)
        if found is None and wrapped:
            found = _find(line_pattern(wrapped[0]), actual, position)
            skip_to = wrapped[1] if found is not None else skip_to
        if found is None:
            return line
        position = found + 1
        head = None
        if STATUS_LINE.match(line):
            end = next((k for k in range(position, len(actual)) if not actual[k].strip()),
                       len(actual))
            head = (position, end)
    return None


def output_mismatches(walkthrough, segments, project):
    problems = []
    for first, end, expected in walkthrough.outputs:
        if any(n not in segments for n in range(first, end)):
            continue  # the script stopped earlier: reported by the status checks
        actual = printed_lines("\n".join(segments[n] for n in range(first, end)))
        missing = unmatched_line(expected, actual)
        if missing is not None:
            commands = "\n".join(walkthrough.commands[n][0] for n in range(first, end))
            printed = "\n".join(line for line in actual if line.strip())
            problems.append(
                f"{project.readme}: the output block after command {first + 1} shows\n"
                f"    {missing.strip()}\n  which its commands did not print.\n"
                f"  commands:\n{textwrap.indent(commands, '    ')}\n"
                f"  printed:\n{textwrap.indent(printed[-2500:] or '(nothing)', '    ')}")
    return problems


def report(project, n, command, output, problem, server):
    body = re.sub(rf"\n?{HTTP_MARK} (\d+)\n?", r"\n[HTTP \1]\n", output).strip()
    return (f"{project.readme}: walk-through command {n + 1} {problem}\n"
            f"  command:\n{textwrap.indent(command, '    ')}\n"
            f"  output:\n{textwrap.indent(body[-3000:] or '(none)', '    ')}\n"
            f"  server stderr (tail):\n{textwrap.indent(server.stderr_text()[-1500:], '    ')}")


PROJECTS = [pytest.param(p, id=p.name) for p in existing_projects()]


@pytest.mark.parametrize("project", PROJECTS)
def test_readme_walkthrough(project, start_server, tmp_path):
    if project.name in NOT_STANDALONE:
        pytest.skip(f"{project.name} needs auth_service beside it; its own tests cover it")
    readme = ROOT / project.readme
    assert readme.is_file(), f"{project.readme} is missing"
    walkthrough = parse_walkthrough(readme.read_text(encoding="utf-8"))
    assert walkthrough.commands, (f"{project.readme} has no walk-through: no ```sh block with "
                                  f"commands besides the run command (see this test's docstring)")
    assert shutil.which("curl") and shutil.which("bash"), "the walk-through needs bash and curl"

    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    script, extra = server_invocation(walkthrough.run_line, project)
    server = start_server(script, *(private_tmp(word, tmp_dir) for word in extra))
    code, output, timed_out = run_script(build_script(walkthrough, project, server, tmp_dir),
                                         tmp_path)
    segments = split_output(output)

    for n, (command, expected) in enumerate(walkthrough.commands):
        if n not in segments:
            break  # an earlier command stopped the script; reported below
        finished = (n + 1) in segments or (n == len(walkthrough.commands) - 1 and "end" in segments)
        out = segments[n]
        if not finished:
            why = (f"did not finish within {WALKTHROUGH_TIMEOUT} s" if timed_out
                   else f"failed with exit status {code}")
            if ERROR_MARK in out:
                why += " (a walk-through curl may not use -w/--write-out)"
            pytest.fail(report(project, n, command, out, why, server), pytrace=False)
        statuses = [int(s) for s in re.findall(rf"{HTTP_MARK} (\d{{3}})", out)]
        for status in statuses:
            if status >= 500 and status != expected:
                pytest.fail(report(project, n, command, out, f"got a {status}", server),
                            pytrace=False)
        if expected is not None:
            if not statuses:
                pytest.fail(report(project, n, command, out,
                                   f"expects {expected} but made no HTTP request", server),
                            pytrace=False)
            if statuses[-1] != expected:
                pytest.fail(report(project, n, command, out,
                                   f"answered {statuses[-1]}, the README says {expected}",
                                   server), pytrace=False)
    assert code == 0 and "end" in segments, f"walk-through script exit {code}:\n{output[-2000:]}"
    problems = output_mismatches(walkthrough, segments, project)
    assert not problems, "\n\n".join(problems)


# --------------------------------------------------------------------------------------------
# Trace samples: the steps a README shows against a real --trace run (issue 10, item 6)


TRACE_HEAD = re.compile(r"^trace (?P<id>\S+) (?P<method>[A-Z]+) (?P<path>/\S*)$")
STEP = re.compile(r"→ (?P<step>.+?)\s*$")


def trace_samples(markdown):
    """[(method, path, [step or "..."])] for every trace sample in the README, in order."""
    samples = []
    for _, lines, _ in fenced_blocks(markdown):
        steps = None  # the steps of the sample this block is showing, if any
        for line in lines:
            head = TRACE_HEAD.match(line.strip())
            if head:
                steps = []
                samples.append((head["method"], head["path"], steps))
            elif steps is not None and line.strip() in ELLIPSES:
                steps.append("...")
            elif steps is not None and (step := STEP.search(line)):
                steps.append(step["step"])
    return [s for s in samples if any(step != "..." for step in s[2])]


def shown_in_order(shown, real):
    """Whether the steps shown are the real ones in order: each run between `...` lines
    contiguous, the first at the start unless `...` comes before it."""
    position = 0
    runs = [list(g) for k, g in itertools.groupby(shown, lambda step: step == "...") if not k]
    anchored = bool(shown) and shown[0] != "..."
    for n, run in enumerate(runs):
        starts = [i for i in range(position, len(real) - len(run) + 1)
                  if real[i:i + len(run)] == run]
        if not starts or (n == 0 and anchored and starts[0] != 0):
            return False
        position = starts[0] + len(run)
    return True


def real_trace(server, method, path, rid, first_step):
    body = b"" if method in ("GET", "HEAD", "DELETE") else b"{}"
    command = ["curl", "-sS", "-o", "/dev/null", "-X", method, "-H", f"X-Request-Id: {rid}",
               "-H", "X-User-Id: alice", "-H", "Content-Type: application/json"]
    if body:
        command += ["--data-binary", body.decode()]
    subprocess.run(command + [f"{server.url}{path}"], check=True, timeout=30, env=clean_env())
    server.wait_for_stderr(f"trace {rid} ")
    closing = re.compile(rf"← {re.escape(first_step)}\b")
    deadline = time.monotonic() + 5
    while True:  # the trace's lines are printed as the request unwinds
        lines = server.stderr_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(f"trace {rid} "))
        block = list(itertools.takewhile(lambda line: line.startswith(" "), lines[start + 1:]))
        if any(closing.search(line) for line in block) or time.monotonic() > deadline:
            return [m["step"] for line in block if (m := STEP.search(line))]
        time.sleep(0.02)


TRACED = [pytest.param(p, id=p.name) for p in existing_projects()  # a missing README fails above
          if (ROOT / p.readme).is_file()
          and trace_samples((ROOT / p.readme).read_text(encoding="utf-8"))]


@pytest.mark.parametrize("project", TRACED)
def test_readme_trace_samples_show_the_real_order_of_steps(project, start_server, tmp_path):
    walkthrough = parse_walkthrough((ROOT / project.readme).read_text(encoding="utf-8"))
    script, extra = server_invocation(walkthrough.run_line, project)
    server = start_server(script, *(private_tmp(word, tmp_path) for word in extra), "--trace")
    problems = []
    for n, (method, path, shown) in enumerate(
            trace_samples((ROOT / project.readme).read_text(encoding="utf-8"))):
        first = next(step for step in shown if step != "...")
        real = real_trace(server, method, path, f"readme-trace-{n}", first)
        if not shown_in_order(shown, real):
            problems.append(f"{project.readme}: the trace sample of {method} {path} shows the "
                            f"steps\n    {shown}\n  a real --trace run takes\n    {real}")
    assert not problems, "\n".join(problems)
