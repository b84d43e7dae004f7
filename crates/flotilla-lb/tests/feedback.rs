//! The `feedback` scheduler on real sockets: a slow backend is noticed by the controller
//! (its weight falls) and gets less traffic than under round-robin.

use std::time::{Duration, Instant};

use flotilla_lb::config::LbConfig;
use flotilla_testsvc::Running;

async fn lb(scheduler: &str, a: &Running, b: &Running) -> flotilla_lb::RunningLb {
    let text = format!(
        "[admin]\nlisten = \"\"\n[[listener]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\nscheduler = \"{scheduler}\"\nbackends = [\"{}\", \"{}\"]\nfeedback = {{ period = \"200ms\" }}\n",
        a.addr, b.addr
    );
    let config: LbConfig =
        flotilla_core::config::parse_toml(std::path::Path::new("f.toml"), &text).unwrap();
    config.validate().unwrap();
    flotilla_lb::start(config).await.unwrap()
}

/// Closed-loop load for `dur` with `concurrency` clients; returns the slow backend's share.
async fn drive(lb: &flotilla_lb::RunningLb, slow: &Running, dur: Duration) -> f64 {
    let url = format!("http://{}/", lb.addrs[0]);
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let end = Instant::now() + dur;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let _ = c.get(&url).send().await.unwrap().bytes().await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let st = &flotilla_lb::admin::status(&lb.listeners)[0];
    let total: u64 = st.backends.iter().map(|b| b.requests).sum();
    let slow_n: u64 = st
        .backends
        .iter()
        .filter(|b| b.addr == slow.addr.to_string())
        .map(|b| b.requests)
        .sum();
    slow_n as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_moves_traffic_off_a_slow_backend() {
    let fast = Running::start("fast", |_| {}).unwrap();
    let slow = Running::start("slow", |x| x.latency_ms = 15).unwrap();

    let rr = lb("round-robin", &fast, &slow).await;
    let rr_share = drive(&rr, &slow, Duration::from_secs(2)).await;
    drop(rr);

    let fb = lb("feedback", &fast, &slow).await;
    let weights = || {
        let st = &flotilla_lb::admin::status(&fb.listeners)[0];
        let weight = |addr: std::net::SocketAddr| {
            st.backends
                .iter()
                .find(|b| b.addr == addr.to_string())
                .unwrap()
                .feedback_weight
                .expect("controller ran")
        };
        (weight(fast.addr), weight(slow.addr))
    };
    // Drive until the controller has separated them (3 s on a quiet machine; a loaded
    // one slows the fast backend too and needs more periods), at most 8 rounds; the
    // share is the last round's, once the weights have settled.
    let mut fb_share = drive(&fb, &slow, Duration::from_secs(3)).await;
    let mut rounds = 1;
    while rounds < 8 && {
        let (wf, ws) = weights();
        wf <= ws * 1.5
    } {
        fb_share = drive(&fb, &slow, Duration::from_secs(2)).await;
        rounds += 1;
    }
    let (wf, ws) = weights();
    eprintln!("slow backend share: round-robin {rr_share:.3}, feedback {fb_share:.3}; weights fast {wf:.1} slow {ws:.1} after {rounds} rounds");
    assert!(
        (rr_share - 0.5).abs() < 0.02,
        "round-robin splits evenly: {rr_share}"
    );
    assert!(
        fb_share < 0.2,
        "feedback sends the slow backend much less: {fb_share}"
    );
    assert!(
        wf > ws * 1.5,
        "controller weights follow the latency: fast {wf}, slow {ws}"
    );
}
