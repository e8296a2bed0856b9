"""The client matrix's checks with Python's `requests` (a Session) or
`httpx` (a Client), each in its default configuration.

    python3 http_client.py requests|httpx BASE REUSE TOKEN UPSTREAM

BASE and REUSE are the proxy (behind counting relays), TOKEN the token the
upstream must see, UPSTREAM the upstream's own URL (httpbin). Prints one
line per check; exits 1 at the first that fails.
"""

import json
import sys
import urllib.parse

library, base, reuse, token, upstream = sys.argv[1:6]
if library == "requests":
    import requests

    client = requests.Session()

    def get(url):
        return client.get(url, timeout=30)

    def post(url, body, content_type):
        return client.post(url, data=body, headers={"Content-Type": content_type}, timeout=30)

    def final_url(response):
        return response.url

else:
    import httpx

    client = httpx.Client(follow_redirects=True, timeout=30)

    def get(url):
        return client.get(url)

    def post(url, body, content_type):
        return client.post(url, content=body, headers={"Content-Type": content_type})

    def final_url(response):
        return str(response.url)


def check(name, condition, detail=""):
    if not condition:
        print(f"FAILED {name}: {detail}")
        sys.exit(1)
    print(f"ok {name}")


r = get(base + "/anything?a=1&a=2&q=%2F%20x")
echo = r.json()
check("query", r.status_code == 200 and echo["args"] == {"a": ["1", "2"], "q": "/ x"}, echo.get("args"))

body = b'{"name":"bearer","n":[1,2,3]}'
r = post(base + "/anything", body, "application/json")
echo = r.json()
check(
    "json post",
    echo["data"] == body.decode() and echo["headers"]["Content-Type"] == "application/json",
    (echo["data"], echo["headers"].get("Content-Type")),
)

upload = b"x" * (5 * 1024 * 1024)
r = post(base + "/anything", upload, "text/plain")
echo = r.json()
check("5 MiB upload, echoed back", len(echo["data"]) == len(upload) and len(r.content) > len(upload), len(echo["data"]))

target = urllib.parse.quote(upstream + "/anything/redirected", safe="")
r = get(base + "/redirect-to?url=" + target)
check(
    "redirect followed back through the proxy",
    r.status_code == 200 and final_url(r).startswith(base) and r.json()["url"].endswith("/anything/redirected"),
    final_url(r),
)

for i in range(20):
    r = get(reuse + "/anything")
    check_ok = r.status_code == 200
    if not check_ok:
        check("20 sequential requests", False, r.status_code)
print("ok 20 sequential requests")

r = get(base + "/anything/status")
check("status path masked", "[masked]" in r.text and token not in r.text, r.text[:300])
r = get(base + "/anything")
headers = r.json()["headers"]
check(
    "token and User-Agent at the upstream",
    headers["Authorization"] == "Bearer " + token and headers["User-Agent"].startswith("bearer-proxy/"),
    headers,
)
