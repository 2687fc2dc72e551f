#!/usr/bin/env python3
"""Lists which Client-Server endpoints of the spec a running Hafen answers.

Usage: scripts/endpoint-coverage.py BASE_URL ACCESS_TOKEN [ENDPOINTS_TSV]
An endpoint counts as missing when the server answers its method and path (placeholders filled
with dummy values) with M_UNRECOGNIZED, the router's answer for unknown routes."""
import json, sys, urllib.request, urllib.error

base, token = sys.argv[1], sys.argv[2]
tsv = sys.argv[3] if len(sys.argv) > 3 else "../shared/matrix-spec/endpoints.tsv"
dummy = {"roomId": "!x:localhost", "userId": "@nobody:localhost", "eventId": "$x", "roomAlias": "#x:localhost",
         "roomIdOrAlias": "!x:localhost", "serverName": "localhost", "mediaId": "x", "deviceId": "X"}
missing, present = [], []
for line in open(tsv).read().splitlines()[1:]:
    api, method, path, file, op, deprecated, added = (line.split("\t") + [""] * 7)[:7]
    if api != "client-server":
        continue
    url = path
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            url = url.replace(part, urllib.request.quote(dummy.get(part[1:-1], "x"), safe=""))
    req = urllib.request.Request(base + url, method=method, headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
                                 data=b"{}" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    except Exception as e:  # transport errors count as missing
        body = json.dumps({"errcode": "M_UNRECOGNIZED", "error": str(e)}).encode()
    try:
        errcode = json.loads(body or b"{}").get("errcode")
    except Exception:
        errcode = None
    (missing if errcode == "M_UNRECOGNIZED" else present).append(f"{method} {path}" + (" (deprecated)" if deprecated else ""))
print(f"{len(present)} answered, {len(missing)} missing")
for m in missing:
    print("missing:", m)
