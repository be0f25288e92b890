"""The 30 projects: number, level, name and default port (spec/levelNN.md).

The table mirrors `PROJECTS` in shared/tools/contract_check.py. The default port is 8000 + the
project's number, except user_service, which shares number 22 with auth_service and listens on
8122. `existing_projects()` is what the suite parametrises over, so a project is checked as soon
as its file lands.
"""
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Project(NamedTuple):
    number: int
    level: int
    name: str
    port: int

    @property
    def script(self):
        """The path of the server, relative to the repository root: `level01/health_check.py`."""
        return f"level{self.level:02d}/{self.name}.py"

    @property
    def readme(self):
        return f"level{self.level:02d}/{self.name}.md"

    @property
    def test_file(self):
        return f"tests/level{self.level:02d}/test_{self.name}.py"

    def exists(self, root=ROOT):
        return (Path(root) / self.script).is_file()


_TABLE = [  # (number, level, name)
    (1, 1, "health_check"), (2, 1, "counter"), (3, 1, "request_logger"),
    (4, 2, "notes"), (5, 2, "todos"), (6, 2, "expenses"), (7, 2, "contacts"),
    (8, 3, "jwt_auth"), (9, 3, "session_auth"), (10, 3, "rbac"), (11, 3, "password_reset"),
    (12, 4, "file_upload"), (13, 4, "email_notifications"), (14, 4, "url_shortener"),
    (15, 4, "search_api"), (16, 4, "feature_flags"),
    (17, 5, "job_processor"), (18, 5, "email_queue"), (19, 5, "chat"), (20, 5, "notification_queue"),
    (21, 6, "api_gateway"), (22, 6, "auth_service"), (22, 6, "user_service"),
    (23, 6, "central_logging"), (24, 6, "rate_limiter"),
    (25, 7, "audit_log"), (26, 7, "analytics_collector"), (27, 7, "multi_tenant"),
    (28, 7, "payment_webhooks"), (29, 7, "saas_starter"), (30, 7, "deployment_ready"),
]

PROJECTS = [
    Project(number, level, name, 8122 if name == "user_service" else 8000 + number)
    for number, level, name in _TABLE
]
BY_NAME = {p.name: p for p in PROJECTS}

# Projects that cannot run alone: user_service authenticates every caller at auth_service, so the
# generic contract checks skip it (its own tests start both), as contract_check.py does.
NOT_STANDALONE = {"user_service"}


def existing_projects(root=ROOT):
    """The projects whose `levelNN/<name>.py` exists in the repository, in table order."""
    return [p for p in PROJECTS if p.exists(root)]


def project_for(script):
    """The `Project` whose script is `script` ("level01/counter.py"), or None."""
    name = Path(script).stem
    project = BY_NAME.get(name)
    if project and Path(script).as_posix().endswith(project.script):
        return project
    return None
