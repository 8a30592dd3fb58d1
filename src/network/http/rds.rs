//! Route configurations by name, as RDS delivers them: one slot per name that HTTP connection managers read on every
//! request and the ADS client fills. An update swaps the slot's table, so it applies to the next request on every
//! connection without touching the connections themselves.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use super::route::RouteTable;

/// One route configuration name's current table; empty until RDS delivers it.
#[derive(Debug)]
pub struct RdsSlot {
    pub name: String,
    table: ArcSwapOption<RouteTable>,
    version: Mutex<String>,
}

impl RdsSlot {
    pub fn table(&self) -> Option<Arc<RouteTable>> {
        self.table.load_full()
    }

    pub fn is_ready(&self) -> bool {
        self.table.load().is_some()
    }

    pub fn version(&self) -> String {
        self.version.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Every route configuration name some listener refers to (or did, until [`RouteRegistry::collect`]).
#[derive(Debug, Clone, Default)]
pub struct RouteRegistry {
    slots: Arc<Mutex<HashMap<String, Arc<RdsSlot>>>>,
}

impl RouteRegistry {
    /// The slot for `name`, created empty on first use.
    pub fn slot(&self, name: &str) -> Arc<RdsSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(RdsSlot {
                    name: name.to_string(),
                    table: ArcSwapOption::empty(),
                    version: Mutex::new(String::new()),
                })
            })
            .clone()
    }

    /// Installs a table delivered by RDS; false when no listener asked for that name (the table is dropped, as
    /// Envoy ignores unrequested resources).
    pub fn set(&self, table: RouteTable, version: &str) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = slots.get(table.name()) else { return false };
        *slot.version.lock().unwrap_or_else(|p| p.into_inner()) = version.to_string();
        slot.table.store(Some(Arc::new(table)));
        true
    }

    /// RDS removed the configuration (delta `removed_resources`): requests get no route until it comes back.
    pub fn clear(&self, name: &str) {
        if let Some(slot) = self.slots.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            slot.table.store(None);
        }
    }

    /// Drops slots no listener holds any more and returns the names still in use: the RDS subscription.
    pub fn collect(&self) -> BTreeSet<String> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| Arc::strong_count(slot) > 1);
        slots.keys().cloned().collect()
    }

    /// Every slot with its table, for dumps.
    pub fn all(&self) -> Vec<Arc<RdsSlot>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Arc<RdsSlot>> = slots.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}
