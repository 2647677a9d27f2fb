"""The seed tutorial's pingback receiver: Pattern 3, the idempotent Flask handler.

Reproduced as the tutorial gives it (a module-level dict guarded by a lock, ``200 OK`` whether
or not anything was stored), so the benchmark compares against what users would otherwise run.
It is *not durable*: a crash after answering loses the result, which is the point of the
comparison. Run it with Flask's threaded server or under gunicorn with threads::

    python -m bench.baselines.seed_flask --port 8000
    gunicorn -w 1 -k gthread --threads 8 -b 127.0.0.1:8000 bench.baselines.seed_flask:app
"""

from __future__ import annotations

import argparse
import threading
import time

from flask import Flask, request

app = Flask(__name__)

pending_tasks: dict[str, dict[str, object]] = {}
results: dict[str, str] = {}
lock = threading.Lock()


@app.route("/callback", methods=["GET", "POST"])
def idempotent_callback() -> tuple[str, int]:
    """Record the answer once; every later delivery is acknowledged and skipped."""
    task_id = request.values.get("id", "")
    solution = request.values.get("code", "")
    with lock:
        if task_id in results:
            return "OK", 200
        results[task_id] = solution
        pending_tasks.pop(task_id, None)
    return "OK", 200


@app.route("/submit/<task_id>", methods=["POST"])
def track(task_id: str) -> tuple[str, int]:
    """What the tutorial's submit_captcha() does after in.php answers: remember the task."""
    with lock:
        pending_tasks[task_id] = {"submitted_at": time.time(), "status": "pending"}
    return "OK", 200


def main() -> None:
    """Serve with Flask's own threaded server (the tutorial's ``app.run``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
