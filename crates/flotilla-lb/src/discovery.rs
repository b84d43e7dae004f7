//! Live backends: follows a service in the registry with blocking queries and swaps the
//! listener's backend set on every change. When the registry is unreachable the last
//! known set keeps serving while the watch retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::Client;
use flotilla_core::HealthStatus;

use crate::config::StaticBackend;
use crate::listener::Listener;

/// Longest single blocking query.
const WAIT: Duration = Duration::from_secs(30);

/// Watches `service` forever, updating `listener`.
pub async fn follow(client: Client, service: String, listener: Arc<Listener>) {
    let mut index = 0;
    let mut initial = true;
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.service(&service, index, WAIT, true).await {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                if s.index == index && !initial {
                    continue;
                }
                index = s.index;
                let wanted: Vec<StaticBackend> = s
                    .instances
                    .iter()
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
                        if let Some(w) = s
                            .instances
                            .iter()
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
                index = 0;
            }
        }
    }
}
