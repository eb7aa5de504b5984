"""An Ansible callback for the fleet test: every task result and the recap, as JSON lines.

ansible-core has no machine-readable stdout callback of its own (``json`` lives in a separate
collection), and the recap text is for people. Enabled with ``ANSIBLE_CALLBACKS_ENABLED=
result_log`` and ``ANSIBLE_CALLBACK_PLUGINS`` pointing at this directory; it appends to the file
named by ``CMR_ANSIBLE_RESULT_LOG``, next to the normal output.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):  # type: ignore[misc]  # ansible ships no type hints
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "result_log"
    CALLBACK_NEEDS_ENABLED = True

    def _write(self, entry: dict[str, Any]) -> None:
        with open(os.environ["CMR_ANSIBLE_RESULT_LOG"], "a") as log:
            log.write(json.dumps(entry, default=str) + "\n")

    def _result(self, result: Any, status: str) -> None:
        self._write(
            {
                "host": result.host.get_name(),
                "task": result.task.name,  # as written, without the role prefix
                "status": status,
                "result": dict(result.result),
            }
        )

    def v2_runner_on_ok(self, result: Any) -> None:
        self._result(result, "changed" if result.result.get("changed") else "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._result(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._result(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._result(result, "unreachable")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        hosts = sorted(stats.processed)
        self._write({"stats": {host: stats.summarize(host) for host in hosts}})
