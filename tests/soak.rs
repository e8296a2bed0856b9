//! A soak run, by hand (it takes over two minutes, so it is ignored in CI):
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! 10 s tokens from the fake provider, 2 minutes of steady load from 16
//! clients, the provider failing for 20 s in the middle. Checks that every
//! request either reached the upstream with an unexpired token or, only after
//! the token expired, got 503 `token_unavailable`; and that no token request
//! came inside a backoff.

mod support;

use std::time::{Duration, Instant};

use support::*;

const LIFETIME: u64 = 10;
const RUN: Duration = Duration::from_secs(120);
const OUTAGE_START: Duration = Duration::from_secs(50);
const OUTAGE: Duration = Duration::from_secs(20);
const CLIENTS: usize = 16;

#[derive(Debug)]
struct Outcome {
    at: Instant,
    status: u16,
    code: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a two-minute soak, run by hand"]
async fn soak_with_short_tokens_and_a_provider_outage() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.script((0..100).map(|_| TokenReply::Ok {
        expires_in: LIFETIME,
    }));
    let (upstream, proxy) =
        proxy_with_token(&token, &[("BEARER_PROXY_TOKEN_STARTUP_WAIT", "0s")]).await;
    wait_ready(&proxy).await;
    let start = Instant::now();

    let outage = {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(OUTAGE_START).await;
            token.set_down(true);
            tokio::time::sleep(OUTAGE).await;
            token.set_down(false);
        })
    };
    let client = http1();
    let mut workers = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url) = (client.clone(), proxy.url("/soak"));
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while start.elapsed() < RUN {
                let response = client.get(&url).send().await;
                let at = Instant::now();
                match response {
                    Ok(response) => {
                        let code = response
                            .headers()
                            .get("x-bearer-proxy-error")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        outcomes.push(Outcome {
                            at,
                            status: response.status().as_u16(),
                            code,
                        });
                        let _ = response.bytes().await;
                    }
                    Err(_) => outcomes.push(Outcome {
                        at,
                        status: 0,
                        code: None,
                    }),
                }
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await?);
    }
    outage.await?;

    let issued = token.issued();
    let expiry = |name: &str| {
        issued
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, at)| *at + Duration::from_secs(LIFETIME))
    };
    // 1. Every request that reached the upstream carried an unexpired token.
    let mut latest_margin = Duration::MAX;
    for request in upstream.requests() {
        let name = request
            .header("authorization")
            .unwrap_or_default()
            .trim_start_matches("Bearer ")
            .to_owned();
        let expires = expiry(&name).ok_or("the upstream saw a token that was never issued")?;
        let arrived = request.at.ok_or("arrival time")?;
        assert!(
            arrived < expires,
            "{name} reached the upstream {:?} after its expiry",
            arrived - expires
        );
        latest_margin = latest_margin.min(expires - arrived);
    }
    // 2. Every 503 came only after the newest token issued before it expired.
    let unavailable: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == 503).collect();
    for outcome in &unavailable {
        assert_eq!(outcome.code.as_deref(), Some("token_unavailable"));
        // A token whose answer was still on its way to the proxy does not
        // count: allow it 100 ms.
        let newest = issued
            .iter()
            .filter(|(_, at)| *at + Duration::from_millis(100) <= outcome.at)
            .map(|(_, at)| *at)
            .max()
            .ok_or("no token before a 503")?;
        // The proxy stops sending a 10 s token 1 s (a tenth) before expiry.
        assert!(
            outcome.at + Duration::from_millis(50) >= newest + Duration::from_secs(LIFETIME - 1),
            "a 503 at {:?} while a token from {:?} was valid",
            outcome.at - start,
            newest - start
        );
    }
    let other: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.status != 200 && o.status != 503)
        .collect();
    assert!(other.is_empty(), "unexpected outcomes: {other:?}");
    // 3. No token request inside a backoff: after a failure, the next
    // request waits at least token.retry_initial (5 s).
    let requests = token.requests();
    let failures: Vec<Instant> = requests
        .iter()
        .map(|r| r.at)
        .filter(|at| !issued.iter().any(|(_, i)| i == at))
        .collect();
    for pair in requests.windows(2) {
        if failures.contains(&pair[0].at) {
            let gap = pair[1].at - pair[0].at;
            assert!(
                gap >= Duration::from_secs(5),
                "a token request {gap:?} after a failure"
            );
        }
    }

    let last_unavailable = unavailable
        .iter()
        .map(|o| o.at)
        .max()
        .ok_or("the outage caused no 503")?;
    assert!(
        outcomes
            .iter()
            .any(|o| o.status == 200 && o.at > last_unavailable),
        "requests succeed again after the outage"
    );
    let ok = outcomes.iter().filter(|o| o.status == 200).count();
    let first_503 = unavailable.iter().map(|o| o.at).min().map(|t| t - start);
    let last_503 = unavailable.iter().map(|o| o.at).max().map(|t| t - start);
    println!(
        "soak: {} s, {CLIENTS} clients, {LIFETIME} s tokens, provider down from {:?} for {:?}",
        RUN.as_secs(),
        OUTAGE_START,
        OUTAGE
    );
    println!(
        "requests: {} ({ok} ok, {} 503 token_unavailable, {} other)",
        outcomes.len(),
        unavailable.len(),
        other.len()
    );
    println!("503s from {first_503:?} to {last_503:?} after start");
    println!(
        "token requests: {} ({} tokens issued, {} failed)",
        requests.len(),
        issued.len(),
        failures.len()
    );
    let timeline: Vec<String> = requests
        .iter()
        .map(|r| {
            let outcome = if failures.contains(&r.at) {
                "failed"
            } else {
                "ok"
            };
            format!(
                "{:.1}s {outcome}",
                r.at.saturating_duration_since(start).as_secs_f64()
            )
        })
        .collect();
    println!("token requests after start: {}", timeline.join(", "));
    let gaps: Vec<String> = requests
        .windows(2)
        .map(|w| format!("{:.1}", (w[1].at - w[0].at).as_secs_f64()))
        .collect();
    println!("gaps between token requests (s): {}", gaps.join(" "));
    println!("smallest time left on a token when it reached the upstream: {latest_margin:?}");
    Ok(())
}
