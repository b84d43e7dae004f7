//! Following one service with delta watches: the registry sends only the instances that
//! changed since the last answer, and [`ServiceFollower`] keeps the whole set. A watcher
//! of a service with hundreds of instances then costs the server (and itself) one
//! instance per change, not the whole service.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_core::{InstanceView, ServiceInstances};

use crate::{Client, Result};

/// The instance set of one service, kept current from delta answers.
#[derive(Clone)]
pub struct ServiceFollower {
    client: Client,
    service: String,
    passing_only: bool,
    index: u64,
    instances: BTreeMap<String, InstanceView>,
}

impl ServiceFollower {
    /// A follower that has seen nothing yet: its first [`ServiceFollower::next`] answers
    /// at once with the whole service.
    pub fn new(client: Client, service: impl Into<String>, passing_only: bool) -> Self {
        ServiceFollower {
            client,
            service: service.into(),
            passing_only,
            index: 0,
            instances: BTreeMap::new(),
        }
    }

    /// Waits (at most `wait`) until the service changes after what this follower has
    /// seen, applies the answer and returns it as the server sent it (a delta or the
    /// whole service; an unchanged index after the wait is an empty delta).
    pub async fn next(&mut self, wait: Duration) -> Result<ServiceInstances> {
        let reply = self
            .client
            .service_changes(&self.service, self.index, wait, self.passing_only)
            .await?;
        self.apply(&reply);
        Ok(reply)
    }

    /// Applies one answer of `GET /v1/services/{name}` (delta or whole).
    pub fn apply(&mut self, reply: &ServiceInstances) {
        if !reply.delta {
            self.instances.clear();
        }
        for id in &reply.removed {
            self.instances.remove(id);
        }
        for i in &reply.instances {
            self.instances.insert(i.id.clone(), i.clone());
        }
        self.index = reply.index;
    }

    /// Forgets the index, so the next answer is the whole service (after an error: the
    /// registry may have been rebuilt with lower indexes).
    pub fn reset(&mut self) {
        self.index = 0;
    }

    /// The index of the last answer applied.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The service's instances (passing ones only if the follower was made so), by id.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceView> {
        self.instances.values()
    }

    /// How many instances the follower holds.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether the follower holds no instance.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, port: u16) -> InstanceView {
        serde_json::from_value(serde_json::json!({
            "id": id, "service": "web", "node": null, "address": "198.18.0.2",
            "port": port, "weight": 100, "meta": {}, "health": "passing",
            "output": "", "checks": []
        }))
        .unwrap()
    }

    fn reply(
        delta: bool,
        index: u64,
        instances: Vec<InstanceView>,
        removed: &[&str],
    ) -> ServiceInstances {
        ServiceInstances {
            service: "web".into(),
            index,
            instances,
            delta,
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn deltas_add_replace_and_remove_and_a_whole_answer_replaces_everything() {
        let mut f = ServiceFollower::new(Client::new("http://127.0.0.1:1", None), "web", false);
        f.apply(&reply(false, 5, vec![view("a", 1), view("b", 2)], &[]));
        assert_eq!((f.len(), f.index()), (2, 5));
        f.apply(&reply(true, 7, vec![view("b", 3), view("c", 4)], &["a"]));
        let held: Vec<(String, u16)> = f.instances().map(|i| (i.id.clone(), i.port)).collect();
        assert_eq!(held, [("b".into(), 3), ("c".into(), 4)]);
        f.apply(&reply(false, 9, vec![view("z", 9)], &[]));
        assert_eq!(
            f.instances().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["z"]
        );
        f.reset();
        assert_eq!(f.index(), 0);
        assert!(!f.is_empty());
    }
}
