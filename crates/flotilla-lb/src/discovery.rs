//! Live backends: follows a service in the registry with blocking queries and swaps the
//! listener's backend set on every change. When the registry is unreachable the last
//! known set keeps serving while the watch retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::follow::ServiceFollower;
use flotilla_client::Client;
use flotilla_core::HealthStatus;

use crate::config::StaticBackend;
use crate::listener::Listener;

/// Longest single blocking query.
const WAIT: Duration = Duration::from_secs(30);

/// Watches `service` forever, updating `listener`.
pub async fn follow(client: Client, service: String, listener: Arc<Listener>) {
    // Delta watches: each answer carries only the instances that changed, so a service
    // of hundreds of backends costs one instance per change on both sides.
    let mut follower = ServiceFollower::new(client, service.clone(), true);
    let mut initial = true;
    let mut backoff = Duration::from_millis(100);
    loop {
        let index = follower.index();
        match follower.next(WAIT).await {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                if s.index == index && !initial {
                    continue;
                }
                let index = s.index;
                let wanted: Vec<StaticBackend> = follower
                    .instances()
                    .filter(|i| i.health == HealthStatus::Passing)
                    .map(|i| StaticBackend {
                        addr: std::net::SocketAddr::new(i.address, i.port),
                        weight: i.weight,
                    })
                    .collect();
                let (added, removed) = listener.update(&wanted, initial);
                // Warm start: weights the active lb published seed this lb's controller.
                for b in listener.backends().iter() {
                    if b.dynamic_weight().is_none() {
                        if let Some(w) = follower
                            .instances()
                            .find(|i| std::net::SocketAddr::new(i.address, i.port) == b.addr)
                            .and_then(|i| i.feedback_weight)
                        {
                            b.set_dynamic_weight(w);
                        }
                    }
                }
                tracing::info!(
                    listener = listener.cfg.name,
                    service,
                    index,
                    backends = wanted.len(),
                    added,
                    removed,
                    "backends updated"
                );
                initial = false;
            }
            Err(e) => {
                tracing::warn!(service, error = %e, retry_in_ms = backoff.as_millis() as u64, "registry watch failed; serving the last known backends");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                // Start over: the registry may have been rebuilt with lower indexes.
                follower.reset();
            }
        }
    }
}
