"""Prints "task_path version" for every task of the seeded users (read through the API).

Scenarios that send a task's current version (get304, patch-if-match) start from these.
Usage: versions.py <base url> <users file>
"""
import json
import sys
import urllib.request

base, users = sys.argv[1], sys.argv[2]
for line in open(users):
    user, token, _first = line.split()
    request = urllib.request.Request(
        f"{base}/api/{user}/tasks", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request) as reply:
        for task in json.load(reply)["tasks"]:
            print(f"/api/{user}/tasks/{task['id']}", task["version"])
