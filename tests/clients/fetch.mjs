// The client matrix's checks with Node's global fetch, as it comes.
//
//     node fetch.mjs BASE REUSE TOKEN UPSTREAM
const [base, reuse, token, upstream] = process.argv.slice(2);

function check(name, condition, detail) {
  if (!condition) {
    console.log(`FAILED ${name}: ${JSON.stringify(detail)}`);
    process.exit(1);
  }
  console.log(`ok ${name}`);
}

let r = await fetch(`${base}/anything?a=1&a=2&q=%2F%20x`);
let echo = await r.json();
check("query", r.status === 200 && JSON.stringify(echo.args) === JSON.stringify({ a: ["1", "2"], q: "/ x" }), echo.args);

const body = '{"name":"bearer","n":[1,2,3]}';
r = await fetch(`${base}/anything`, { method: "POST", body, headers: { "Content-Type": "application/json" } });
echo = await r.json();
check("json post", echo.data === body && echo.headers["Content-Type"] === "application/json", [echo.data, echo.headers]);

const upload = "x".repeat(5 * 1024 * 1024);
r = await fetch(`${base}/anything`, { method: "POST", body: upload, headers: { "Content-Type": "text/plain" } });
const text = await r.text();
echo = JSON.parse(text);
check("5 MiB upload, echoed back", echo.data.length === upload.length && text.length > upload.length, echo.data.length);

const target = encodeURIComponent(`${upstream}/anything/redirected`);
r = await fetch(`${base}/redirect-to?url=${target}`);
echo = await r.json();
check("redirect followed back through the proxy", r.status === 200 && r.url.startsWith(base) && echo.url.endsWith("/anything/redirected"), r.url);

for (let i = 0; i < 20; i++) {
  r = await fetch(`${reuse}/anything`);
  await r.arrayBuffer();
  if (r.status !== 200) check("20 sequential requests", false, r.status);
}
console.log("ok 20 sequential requests");

r = await fetch(`${base}/anything/status`);
const status = await r.text();
check("status path masked", status.includes("[masked]") && !status.includes(token), status.slice(0, 300));
r = await fetch(`${base}/anything`);
const headers = (await r.json()).headers;
check("token and User-Agent at the upstream", headers.Authorization === `Bearer ${token}` && headers["User-Agent"].startsWith("bearer-proxy/"), headers);
