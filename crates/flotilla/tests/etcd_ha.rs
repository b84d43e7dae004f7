//! Two registry servers on a real three-member etcd cluster: one catalog, one checker,
//! and the checking duty moves when its holder is killed; an etcd member may die.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, passing, Server};
use flotilla_testkit::EtcdCluster;
use serde_json::json;

async fn is_leader(server: &Server) -> bool {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/v1/status", server.url))
        .bearer_auth(server.token())
        .send()
        .await;
    match resp {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .map(|v| v["leader"] == true)
            .unwrap_or(false),
        Err(_) => false,
    }
}

#[tokio::test]
async fn two_servers_share_one_catalog_and_the_duty_moves_on_a_crash() {
    let mut etcd = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = etcd.store_url();
    let flags = ["--store", store.as_str()];
    let mut a = Server::start(dir.path(), "a", &flags);
    let mut b = Server::start(dir.path(), "b", &flags);
    let (ca, cb) = (a.client(), b.client());

    // One catalog: written through a, read through b (and blocking on b wakes).
    let idx = cb
        .service("shared", 0, Duration::ZERO, false)
        .await
        .unwrap()
        .index;
    let waiter = {
        let cb = cb.clone();
        tokio::spawn(async move {
            cb.service("shared", idx, Duration::from_secs(10), false)
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    ca.register(
        "s1",
        &serde_json::from_value(json!({"service":"shared","address":"127.0.0.1","port":1}))
            .unwrap(),
    )
    .await
    .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.instances.len(), 1, "b sees a's write");

    // Exactly one server holds the duty.
    eventually(Duration::from_secs(10), "a leader", || async {
        is_leader(&a).await ^ is_leader(&b).await
    })
    .await;
    let a_leads = is_leader(&a).await;

    // A TTL-checked instance: whoever leads must judge it.
    let ttl = json!({"service":"ttl","address":"127.0.0.1","port":2,"checks":[{"type":"ttl","ttl":"2s","interval":"200ms"}]});
    ca.register("t1", &serde_json::from_value(ttl).unwrap())
        .await
        .unwrap();
    cb.check_in("t1", true, "").await.unwrap();
    eventually(Duration::from_secs(5), "ttl instance passing", || async {
        passing(&ca, "ttl").await.len() == 1
    })
    .await;

    // Kill the leader without a goodbye: the survivor takes the duty within the TTL.
    let (dead, survivor) = if a_leads { (&mut a, &b) } else { (&mut b, &a) };
    let killed = Instant::now();
    dead.proc.kill();
    eventually(Duration::from_secs(8), "duty moved", || async {
        is_leader(survivor).await
    })
    .await;
    let moved = killed.elapsed();
    eprintln!("FIGURE duty failover: leader SIGKILL -> survivor leads: {moved:?}");
    assert!(
        moved <= Duration::from_millis(4500),
        "duty moved after {moved:?} (leader TTL 3 s)"
    );

    // The new leader checks: stop renewing and the instance goes critical.
    let cs = survivor.client();
    eventually(
        Duration::from_secs(8),
        "new leader expires the TTL check",
        || async { passing(&cs, "ttl").await.is_empty() },
    )
    .await;

    // An etcd member dies: the survivor keeps serving reads and writes.
    etcd.members[0].kill();
    eventually(
        Duration::from_secs(15),
        "write after member loss",
        || async {
            cs.register(
                "s2",
                &serde_json::from_value(json!({"service":"shared","address":"127.0.0.1","port":3}))
                    .unwrap(),
            )
            .await
            .is_ok()
        },
    )
    .await;
    let all = cs
        .service("shared", 0, Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(all.instances.len(), 2);
    cs.check_in("t1", true, "").await.unwrap();
    eventually(
        Duration::from_secs(5),
        "checking continues after member loss",
        || async { passing(&cs, "ttl").await.len() == 1 },
    )
    .await;
}
