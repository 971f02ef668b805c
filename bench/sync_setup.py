"""Seeds what the sync and list scenarios read, through the API, and prints their inputs.

- 100 feed users ("bench-feed-N") x 20 tasks, never written by other scenarios: each
  user's feed cursor from before its creates (20 changes behind) and after (up to date).
  Writes "user token cursor_behind cursor_current" lines to the first file.
- One user ("bench-big") with 10,000 tasks: the keyset cursor of page 50 (limit=20) and
  the id it continues after. Writes "user token cursor after_id" to the second file.
Usage: sync_setup.py <base url> <binary> <feed file> <big file>
"""
import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

base, binary, feed_file, big_file = sys.argv[1:5]


def token(user):
    return subprocess.run(
        [binary, "token", "--user", user, "--ttl", "2h"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def call(method, path, tok, body=None):
    request = urllib.request.Request(
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request) as reply:
        return json.load(reply)


def feed_user(n):
    user = f"bench-feed-{n}"
    tok = token(user)
    behind = call("GET", f"/api/{user}/changes", tok)["cursor"]
    for t in range(20):
        call("POST", f"/api/{user}/tasks", tok, {"title": f"task {t}", "description": "seeded"})
    current = call("GET", f"/api/{user}/changes?cursor={behind}", tok)
    assert len(current["changes"]) == 20 and not current["has_more"], current
    return f"{user} {tok} {behind} {current['cursor']}"


with ThreadPoolExecutor(8) as pool:
    lines = list(pool.map(feed_user, range(100)))
with open(feed_file, "w") as out:
    out.write("\n".join(lines) + "\n")

user = "bench-big"
tok = token(user)
with ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda t: call("POST", f"/api/{user}/tasks", tok, {"title": f"big task {t}"}),
                  range(10_000)))
cursor = None
for page in range(49):
    path = f"/api/{user}/tasks?limit=20" + (f"&cursor={cursor}" if cursor else "")
    cursor = call("GET", path, tok)["next_cursor"]
last = call("GET", f"/api/{user}/tasks?limit=980", tok)["tasks"][-1]["id"]
check = call("GET", f"/api/{user}/tasks?limit=1&cursor={cursor}", tok)["tasks"][0]["id"]
offset = call("GET", f"/api/{user}/tasks?limit=1&offset=980", tok)["tasks"][0]["id"]
assert check == offset and check > last, (check, offset, last)
with open(big_file, "w") as out:
    out.write(f"{user} {tok} {cursor} {last}\n")
