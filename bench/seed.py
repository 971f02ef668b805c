"""Seeds USERS users x TASKS tasks through the API; prints "user token first_id" lines.

Tokens come from the service's own `token` command, so they match its configuration.
"""
import json
import os
import subprocess
import sys
import urllib.request

base, binary = sys.argv[1], sys.argv[2]
users = int(os.environ.get("BENCH_SEED_USERS", "100"))
tasks = int(os.environ.get("BENCH_SEED_TASKS", "20"))

for n in range(users):
    user = f"bench-user-{n}"
    token = subprocess.run(
        [binary, "token", "--user", user, "--ttl", "2h"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    first = None
    for t in range(tasks):
        request = urllib.request.Request(
            f"{base}/api/{user}/tasks",
            data=json.dumps({"title": f"task {t}", "description": "seeded"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request) as reply:
            task = json.load(reply)
        first = task["id"] if first is None else first
    print(user, token, first, flush=True)
