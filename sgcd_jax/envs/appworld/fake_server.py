"""A stand-in for ``appworld serve environment`` (same routes and ``{"output": ...}`` replies) for
tests of the server lifecycle without the AppWorld venv or data.

Behaviour: every task has 4 unit tests; each ``execute`` call passes one more. Code containing
``complete_task`` completes the task; ``CRASH`` kills the process; ``SLEEP`` hangs for 60 s;
``RAISE`` answers HTTP 500. ``--startup-delay`` delays binding the port.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NUM_TESTS = 4
STATE: dict = {"task_id": None, "executed": 0, "completed": False}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._reply(200, {"message": "Welcome to (fake) AppWorld Server!"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        route = self.path.strip("/")
        if route == "initialize":
            STATE.update(task_id=body["task_id"], executed=0, completed=False)
            return self._reply(200, {"output": {
                "task_id": body["task_id"], "instruction": f"Fake instruction for {body['task_id']}.",
                "supervisor": {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@x.org",
                               "phone_number": "5550100"}, "datetime": "2023-05-18T12:00:00"}})
        if body.get("task_id") != STATE["task_id"]:
            return self._reply(500, {"detail": f"The active task world is {STATE['task_id']}."})
        if route == "execute":
            code = body["code"]
            if "CRASH" in code:
                os._exit(3)
            if "SLEEP" in code:
                time.sleep(60)
            if "RAISE" in code:
                return self._reply(500, {"detail": "Internal Server Error"})
            STATE["executed"] += 1
            STATE["completed"] |= "complete_task" in code
            return self._reply(200, {"output": f"Execution successful. ({STATE['executed']})"})
        if route == "task_completed":
            return self._reply(200, {"output": STATE["completed"]})
        if route == "evaluate":
            n = min(STATE["executed"], NUM_TESTS)
            tests = [{"requirement": f"requirement {i}", "label": "no_op_fail"} for i in range(NUM_TESTS)]
            return self._reply(200, {"output": {"success": n == NUM_TESTS, "difficulty": 1,
                                                "num_tests": NUM_TESTS, "passes": tests[:n],
                                                "failures": [{**t, "trace": "failed"} for t in tests[n:]]}})
        if route == "close":
            STATE.update(task_id=None)
            return self._reply(200, {"output": None})
        return self._reply(404, {"detail": f"unknown route {route}"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.startup_delay)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
