//! In-memory `DatapathMaps` for tests (here, in lb-agent and in the golden
//! tests): after every write it checks what a packet could see — each
//! service's live revision resolves completely — and `dump` prints the
//! maps as readable text.

use std::collections::{BTreeSet, HashMap};

use lb_common::{Backend, BackendId, BackendSlotKey, ServiceKey, ServiceValue};

use crate::model::{Cidr, Endpoint, Frontend};
use crate::sync::{DatapathMaps, MapOpError, service_key};

/// In-memory maps that, after every write, check what a packet could
/// see: each service's live revision resolves completely.
#[derive(Default)]
pub struct FakeMaps {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub slots: HashMap<BackendSlotKey, BackendId>,
    pub backends: HashMap<BackendId, Backend>,
    pub ranges: BTreeSet<(u32, Cidr)>,
    pub maglev: HashMap<u32, Vec<BackendId>>,
    pub fail_backend_put_after: Option<usize>,
    pub writes: usize,
}

impl FakeMaps {
    pub fn check_consistent(&self) {
        for (k, v) in &self.services {
            for slot in 0..v.backend_count {
                let id = self.slots.get(&BackendSlotKey {
                    service_id: v.service_id,
                    revision: v.revision,
                    slot,
                });
                let id = id.unwrap_or_else(|| panic!("service {k:?} slot {slot} missing"));
                let b = self.backends.get(id).unwrap_or_else(|| panic!("backend {id} missing"));
                assert_eq!(b.service_id, v.service_id);
            }
        }
    }

    /// Endpoints a packet to this frontend could reach.
    pub fn resolve(&self, f: &Frontend) -> BTreeSet<Endpoint> {
        let Some(v) = self.services.get(&service_key(f)) else {
            return BTreeSet::new();
        };
        (0..v.backend_count)
            .map(|slot| {
                let id = self.slots[&BackendSlotKey {
                    service_id: v.service_id,
                    revision: v.revision,
                    slot,
                }];
                let b = self.backends[&id];
                Endpoint {
                    ip: lb_common::addr::to_ip(&b.addr),
                    port: b.port,
                }
            })
            .collect()
    }

    fn wrote(&mut self) {
        self.writes += 1;
        self.check_consistent();
    }
}

impl DatapathMaps for FakeMaps {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), MapOpError> {
        self.services.insert(*k, *v);
        self.wrote();
        Ok(())
    }
    fn delete_service(&mut self, k: &ServiceKey) -> Result<(), MapOpError> {
        self.services.remove(k);
        self.wrote();
        Ok(())
    }
    fn put_slot(&mut self, k: &BackendSlotKey, id: BackendId) -> Result<(), MapOpError> {
        self.slots.insert(*k, id);
        self.wrote();
        Ok(())
    }
    fn delete_slot(&mut self, k: &BackendSlotKey) -> Result<(), MapOpError> {
        self.slots.remove(k);
        self.wrote();
        Ok(())
    }
    fn put_backend(&mut self, id: BackendId, b: &Backend) -> Result<(), MapOpError> {
        if let Some(n) = self.fail_backend_put_after.as_mut() {
            if *n == 0 {
                return Err(MapOpError {
                    map: "BACKENDS",
                    op: "insert",
                    message: "map is full".into(),
                });
            }
            *n -= 1;
        }
        self.backends.insert(id, *b);
        self.wrote();
        Ok(())
    }
    fn delete_backend(&mut self, id: BackendId) -> Result<(), MapOpError> {
        self.backends.remove(&id);
        self.wrote();
        Ok(())
    }
    fn reset_service_stats(&mut self, _: u32) -> Result<(), MapOpError> {
        Ok(())
    }
    fn reset_backend_stats(&mut self, _: BackendId) -> Result<(), MapOpError> {
        Ok(())
    }
    fn put_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), MapOpError> {
        self.ranges.insert((service_id, *range));
        Ok(())
    }
    fn delete_source_range(&mut self, service_id: u32, range: &Cidr) -> Result<(), MapOpError> {
        self.ranges.remove(&(service_id, *range));
        Ok(())
    }
    fn dump_source_ranges(&self) -> Result<Vec<(u32, Cidr)>, MapOpError> {
        Ok(self.ranges.iter().copied().collect())
    }
    fn put_maglev(&mut self, service_id: u32, table: &[BackendId]) -> Result<(), MapOpError> {
        self.maglev.insert(service_id, table.to_vec());
        Ok(())
    }
    fn delete_maglev(&mut self, service_id: u32) -> Result<(), MapOpError> {
        self.maglev.remove(&service_id);
        Ok(())
    }
    fn dump_services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapOpError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn dump_slots(&self) -> Result<Vec<(BackendSlotKey, BackendId)>, MapOpError> {
        Ok(self.slots.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn dump_backends(&self) -> Result<Vec<(BackendId, Backend)>, MapOpError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
}
