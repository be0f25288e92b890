"""Start auth_service and user_service together, and never leave one running alone.

What it teaches
  - Supervising child processes: the launcher starts both services, waits for each one's
    `listening on` line, prints where they are, and then waits for one of three things: a
    SIGTERM or SIGINT (it stops both, gracefully, and exits 0), or either child exiting on its
    own (it stops the other and exits non-zero, so whatever supervises the launcher, a
    terminal, systemd or a container runtime, sees the failure). No orphan is left behind.
  - Wiring services that must know each other's address: user_service starts first, on its
    port, told where auth_service will listen; auth_service then starts on that port, told
    user_service's real address. With `--port 0` the launcher asks the OS for a free port for
    auth_service first (another process could take it in between; then auth_service exits 2
    and so does the launcher).
  - One credential for both: `--service-token`, else `SERVICE_TOKEN`, else a fresh random one,
    handed to both children in their environment (not on their command line, where `ps` would
    show it to every user of the machine).

    python level06/microservices.py [--port P] [--user-port P] [--auth-db PATH]
                                    [--user-db PATH] [--service-token T]

The first stdout line is auth_service's `listening on http://HOST:PORT` (it is the entry
users sign up at), then one line per service: `auth_service http://…`, `user_service http://…`.

Left out: restarting a child that died (systemd's Restart=, Kubernetes, supervisord do that),
the launcher itself killed with SIGKILL (it cannot act then; its children, in sessions of
their own, run on: a supervisor that kills the whole process group or cgroup covers that),
health-based readiness beyond the listening line, log multiplexing (both children write their
access logs to this process's stderr as they are).
"""
import argparse
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib.app import port_number

HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 30.0   # for a child's `listening on` line
STOP_TIMEOUT_S = 15.0    # from SIGTERM to a child's exit, before SIGKILL
LISTENING = re.compile(r"listening on (http://\S+)")


class Child:
    """One service as a subprocess: its stdout is read by a thread (the `listening on` line,
    then drained so the child never blocks on a full pipe); its stderr is ours."""

    def __init__(self, name, args, env, exited):
        self.name = name
        self.url = None
        self.ready = threading.Event()
        self.proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *args],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                                     # its own session: a terminal's Ctrl-C reaches the launcher
                                     # only, which stops each child once (a second signal would
                                     # make a child skip its graceful drain)
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, args=(exited,), daemon=True,
                                       name=f"{name}-stdout")
        self.reader.start()

    def _read(self, exited):
        match = LISTENING.fullmatch(self.proc.stdout.readline().decode("utf-8", "replace").strip())
        self.url = match[1] if match else None
        self.ready.set()
        for _ in self.proc.stdout:  # nothing more is expected; read till the child exits
            pass
        self.proc.wait()
        exited.set()

    def wait_until_listening(self):
        return self.ready.wait(START_TIMEOUT_S) and self.url is not None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def free_port(host):
    """A port the OS says is free now (it may be taken before auth_service binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def url_for(host, port):
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="microservices.py", description="Start auth_service "
                                     "and user_service; stop both together.")
    parser.add_argument("--host", default="127.0.0.1", help="address both listen on")
    parser.add_argument("--port", type=port_number, default=8022,
                        help="auth_service's port (default 8022; 0: free ports for both)")
    parser.add_argument("--user-port", type=port_number,
                        help="user_service's port (default 8122, or a free one with --port 0)")
    parser.add_argument("--auth-db", help="auth_service's sqlite file (default "
                                          "data/auth_service.sqlite3)")
    parser.add_argument("--user-db", help="user_service's sqlite file (default "
                                          "data/user_service.sqlite3)")
    parser.add_argument("--service-token", help="the credential between the two (default: "
                                                "SERVICE_TOKEN, else a fresh random one)")
    args = parser.parse_args(argv)
    if args.user_port is None:
        args.user_port = 0 if args.port == 0 else 8122
    return args


def main(argv=None):
    args = parse_args(argv)
    token = args.service_token or os.environ.get("SERVICE_TOKEN") or secrets.token_urlsafe(32)
    env = {**os.environ, "SERVICE_TOKEN": token}
    auth_port = args.port or free_port(args.host)
    exited = threading.Event()    # a child has exited, or a stop signal came
    stop_requested = []
    children = []

    def on_signal(signum, frame):
        stop_requested.append(signum)
        exited.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def stop_all():
        return [child.stop() for child in reversed(children)]  # the entry first, then its backend

    def start(name, port, db, peer_flag, peer_url):
        extra = ["--db", db] if db else []
        child = Child(name, ["--host", args.host, "--port", str(port), *extra,
                             peer_flag, peer_url], env, exited)
        children.append(child)
        if not child.wait_until_listening():
            sys.stderr.write(f"error: {name} did not start\n")
            stop_all()
            raise SystemExit(child.proc.poll() or 1)
        return child

    users = start("user_service", args.user_port, args.user_db, "--auth-service-url",
                  url_for(args.host, auth_port))
    auth = start("auth_service", auth_port, args.auth_db, "--user-service-url", users.url)
    sys.stdout.write(f"listening on {auth.url}\nauth_service {auth.url}\n"
                     f"user_service {users.url}\n")
    sys.stdout.flush()

    while not exited.wait(1.0):  # the timeout lets a signal's handler run promptly
        pass
    if stop_requested:
        codes = stop_all()
        raise SystemExit(0 if all(code == 0 for code in codes) else 1)
    gone = next(child for child in children if child.proc.poll() is not None)
    sys.stderr.write(f"error: {gone.name} exited with status {gone.proc.returncode}; stopping "
                     f"the other\n")
    stop_all()
    raise SystemExit(gone.proc.returncode if gone.proc.returncode > 0 else 1)


if __name__ == "__main__":
    main()
