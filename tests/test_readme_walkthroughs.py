"""Every project's README walk-through runs against a fresh server, so the READMEs cannot rot.

THE CONVENTION (for whoever writes `levelNN/<name>.md`)

- The walk-through is every fenced block whose info string is `sh` (a line of three backticks
  then `sh`), in the order they appear in the README. Use another info string (`bash`, `text`,
  `console`, none) for shell snippets that must not be run: output samples, commands for a second
  terminal, anything that needs tools beyond bash, curl and python3.
- A block whose first command line starts with `python ` or `python3 ` is how to run the server:
  it is not run. The test starts the server itself, with `--port 0` and a temporary `--db`, plus
  the other flags of the FIRST such line (`python level01/counter.py --memory` → `--memory`;
  `--host`, `--port` and `--db` are replaced). Keep the run command in a block of its own.
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
  under `data/` (git-ignored) or `/tmp`.
- A README without a walk-through fails the test: every project has one.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
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
  command curl -sS -w '%{{stderr}}\n{HTTP_MARK} %{{http_code}}\n' "$@"
}}
"""


# --------------------------------------------------------------------------------------------
# Parsing a README


def fenced_blocks(markdown):
    """(info string, [lines]) for every fenced code block, in order (CommonMark fences)."""
    blocks, current, opener, info = [], None, None, None
    for line in markdown.splitlines():
        if current is None:
            match = FENCE.match(line)
            if match:
                opener, info, current = match["fence"], match["info"], []
            continue
        stripped = line.strip()
        if stripped and set(stripped) == {opener[0]} and len(stripped) >= len(opener):
            blocks.append((info, current))
            current = None
        else:
            current.append(line)
    if current is not None:  # an unclosed fence runs to the end of the document
        blocks.append((info, current))
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
    def __init__(self, commands, run_line):
        self.commands = commands   # [(command, expected status or None)]
        self.run_line = run_line   # the README's first `python …` line, or None


def parse_walkthrough(markdown):
    commands, run_line = [], None
    for info, lines in fenced_blocks(markdown):
        if info != "sh":
            continue
        block = logical_lines(lines)
        if block and RUN_LINE.match(block[0].lstrip()):
            run_line = run_line or block[0]
            continue
        for command in block:
            match = EXPECTED.search(command)
            commands.append((command, int(match["status"]) if match else None))
    return Walkthrough(commands, run_line)


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


def build_script(walkthrough, project, server):
    parts = [PRELUDE]
    for n, (command, _) in enumerate(walkthrough.commands):
        parts.append(f"printf '\\n{CMD_MARK} {n}\\n'")
        parts.append(localise(command, project.port, server))
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

    script, extra = server_invocation(walkthrough.run_line, project)
    server = start_server(script, *extra)
    code, output, timed_out = run_script(build_script(walkthrough, project, server), tmp_path)
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
