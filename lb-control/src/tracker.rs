//! Change tracker: what differs between the model last programmed and the
//! new one, per service port, so a sync touches only what changed.

use crate::model::{Frontend, Model, ServicePort};
use lb_common::ServiceScope;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Service ports to delete.
    pub removed: Vec<Frontend>,
    /// Service ports that are new or whose endpoints changed.
    pub upserted: Vec<ServicePort>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.upserted.is_empty()
    }
}

pub fn changes(old: &Model, new: &Model) -> ChangeSet {
    let removed = old
        .services
        .keys()
        .filter(|f| !new.services.contains_key(f))
        .copied()
        .collect();
    let mut upserted: Vec<ServicePort> = new
        .services
        .iter()
        .filter(|(f, sp)| old.services.get(f) != Some(sp))
        .map(|(_, sp)| sp.clone())
        .collect();
    // An internal-scope entry goes in before the frontend entry whose flag
    // points packets at it (until then the datapath uses the frontend entry).
    upserted.sort_by_key(|sp| sp.frontend.scope == ServiceScope::Cluster);
    ChangeSet { removed, upserted }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Protocol};

    fn sp(ip: &str, port: u16, eps: &[&str]) -> ServicePort {
        let frontend = Frontend::new(ip.parse().unwrap(), port, Protocol::Tcp);
        ServicePort::new(
            format!("ns/{ip}:{port}"),
            frontend,
            eps.iter()
                .map(|e| Endpoint {
                    ip: e.parse().unwrap(),
                    port: 80,
                })
                .collect(),
        )
    }

    fn model(sps: Vec<ServicePort>) -> Model {
        Model::from_ports(sps)
    }

    #[test]
    fn only_changed_service_ports_are_listed() {
        let a = sp("198.19.0.1", 80, &["198.18.1.1"]);
        let b = sp("198.19.0.2", 80, &["198.18.1.2"]);
        let c = sp("198.19.0.3", 80, &["198.18.1.3"]);
        let b2 = sp("198.19.0.2", 80, &["198.18.1.2", "198.18.1.4"]);
        let d = sp("198.19.0.4", 80, &[]);
        let set = changes(
            &model(vec![a.clone(), b, c.clone()]),
            &model(vec![a, b2.clone(), d.clone()]),
        );
        assert_eq!(set.removed, vec![c.frontend]);
        assert_eq!(set.upserted, vec![b2, d]);
        assert!(changes(&Model::default(), &Model::default()).is_empty());
    }

    #[test]
    fn internal_scope_entries_are_written_before_the_frontends_pointing_at_them() {
        let external = sp("198.18.0.11", 30080, &[]);
        let mut internal = sp("198.18.0.11", 30080, &["198.18.2.1"]);
        internal.frontend.scope = ServiceScope::Internal;
        let set = changes(&Model::default(), &model(vec![external.clone(), internal.clone()]));
        assert_eq!(set.upserted, vec![internal, external]);
    }
}
