//! The registry's write path under group commit, in process on a real store: a failed
//! commit answers every writer with the error and changes nothing; concurrent writers
//! read their own writes at once on both stores.

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::{Client, InstanceSpec};
use flotilla_core::config::ServerConfig;
use flotilla_registry::server::{start, RunningServer};
use flotilla_store::{EmbeddedStore, EtcdStore, Store};
use flotilla_testkit::{unique, EtcdCluster};

fn spec(service: &str, n: usize) -> InstanceSpec {
    InstanceSpec {
        service: service.into(),
        node: None,
        address: std::net::IpAddr::from([198, 18, 0, (n % 250 + 1) as u8]),
        port: 8000 + n as u16,
        weight: 100,
        meta: Default::default(),
        checks: vec![],
        node_checks: false,
    }
}

async fn serve(dir: &std::path::Path, store: Arc<dyn Store>) -> (RunningServer, Client) {
    serve_with(dir, store, ServerConfig::default()).await
}

async fn serve_with(
    dir: &std::path::Path,
    store: Arc<dyn Store>,
    base: ServerConfig,
) -> (RunningServer, Client) {
    let config = ServerConfig {
        insecure_http: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_owned(),
        dns_listen: None,
        ..base
    };
    let server = start(config.clone(), store).await.unwrap();
    let token = std::fs::read_to_string(config.token_path()).unwrap();
    let client = Client::new(
        &format!("http://{}", server.http_addr),
        Some(token.trim().to_owned()),
    );
    for _ in 0..100 {
        if server.shared.is_synced() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (server, client)
}

#[tokio::test]
async fn a_failed_commit_answers_every_writer_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("data")).unwrap();
    let (server, client) = serve(dir.path(), Arc::new(store.clone())).await;
    for n in 0..5 {
        client
            .register(&format!("kept-{n}"), &spec("web", n))
            .await
            .unwrap();
    }
    let before_index = server.shared.catalog().index();
    let before = client.instances().await.unwrap();
    let revision_before = store.list("").await.unwrap().revision;

    // Every commit fails from here (a full disk): forty concurrent writers, batched.
    store.fail_next_commits(usize::MAX);
    let mut writers = Vec::new();
    for n in 0..40 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            client.register(&format!("lost-{n}"), &spec("api", n)).await
        }));
    }
    for w in writers {
        let err = w.await.unwrap().unwrap_err();
        assert_eq!(err.status(), Some(503), "{err}");
        assert!(err.to_string().contains("injected"), "{err}");
    }
    let counts = store.write_counts();
    assert!(
        counts.failed_commits >= 1 && counts.failed_commits < 40,
        "the writes were batched into fewer failed commits: {counts:?}"
    );
    assert_eq!(
        server.shared.catalog().index(),
        before_index,
        "index unchanged"
    );
    assert_eq!(
        client.instances().await.unwrap(),
        before,
        "catalog unchanged"
    );
    assert_eq!(store.list("").await.unwrap().revision, revision_before);
    assert!(store
        .get(&flotilla_registry::keys::instance("lost-0"))
        .await
        .unwrap()
        .is_none());

    // The store recovers; the same writes then land.
    store.fail_next_commits(0);
    client.register("lost-0", &spec("api", 0)).await.unwrap();
    assert_eq!(client.instances().await.unwrap().len(), 6);
}

/// 200 concurrent writers through a server on `store` read their own writes at once,
/// and shared commits doing it.
async fn writers_read_their_own_writes_on(store: Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client) = serve(dir.path(), store.clone()).await;
    writers_read_their_own_writes(client).await;
    let counts = store.write_counts();
    assert!(
        counts.commits < counts.writes,
        "200 concurrent writers shared commits: {counts:?}"
    );
}

async fn writers_read_their_own_writes(client: Client) {
    let mut writers = Vec::new();
    for n in 0..200 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let id = format!("ryw-{n}");
            let reply = client.register(&id, &spec("ryw", n)).await.unwrap();
            // The write's index is applied on this server before the answer: the very
            // next read sees it, in the instance and in its service.
            let index = reply["index"].as_u64().unwrap();
            let mine = client.instances().await.unwrap();
            assert!(mine.iter().any(|i| i.id == id), "{id} not visible at once");
            let service = client
                .service("ryw", 0, Duration::ZERO, false)
                .await
                .unwrap();
            assert!(
                service.index >= index,
                "{id}: service index behind its write"
            );
            assert!(service.instances.iter().any(|i| i.id == id), "{id}");
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

#[tokio::test]
async fn concurrent_writers_read_their_own_writes_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("data")).unwrap();
    writers_read_their_own_writes_on(Arc::new(store)).await;
}

#[tokio::test]
async fn concurrent_writers_read_their_own_writes_on_etcd() {
    let cluster = EtcdCluster::start(3).unwrap();
    let store = EtcdStore::connect(&cluster.endpoints(), &format!("/{}/", unique("ryw")))
        .await
        .unwrap();
    writers_read_their_own_writes_on(Arc::new(store)).await;
}

#[tokio::test]
async fn the_leader_compacts_etcd_and_a_blocking_watch_across_it_answers() {
    let cluster = EtcdCluster::start(1).unwrap();
    let store = EtcdStore::connect(&cluster.endpoints(), &format!("/{}/", unique("compact")))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        insecure_http: true,
        compact_interval: Duration::from_millis(200),
        compact_keep: 5,
        ..ServerConfig::default()
    };
    let (server, client) = serve_with(dir.path(), Arc::new(store), config).await;
    let index = client
        .service("watched", 0, Duration::ZERO, false)
        .await
        .unwrap()
        .index;
    let watcher = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .service("watched", index, Duration::from_secs(20), false)
                .await
                .unwrap()
        })
    };
    // Enough history for a compaction, then wait for one past the watcher's index.
    for n in 0..30 {
        client
            .register(&format!("noise-{n}"), &spec("noise", n))
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.shared.metrics.compacted_revision.get() as u64 <= index {
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction past {index}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !watcher.is_finished(),
        "the watch answered before its service changed"
    );
    client.register("w1", &spec("watched", 99)).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the blocking watch answers after the compaction")
        .unwrap();
    assert_eq!(seen.instances.len(), 1);
    assert_eq!(seen.instances[0].id, "w1");
}
