//! The in-memory index of live entities, for lists and code uniqueness.
//!
//! Built at start by replaying `ENTITIES` with an ordered consumer, and kept
//! current by the same consumer (so writes made by other replicas show up)
//! and by this replica's own writes as they are acknowledged. It holds per
//! entity only what lists filter on: the stream sequence of its latest
//! version, its code, its parent and its reference fields. Entity bodies are
//! read from the stream by sequence when a page is served.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use tokio::sync::watch;

/// What the index keeps of one live entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub code: Option<String>,
    /// Indexed field values (parent and reference fields), for filters.
    pub fields: Vec<(&'static str, String)>,
}

#[derive(Default)]
struct Inner {
    /// (org, type) → id → entry. Ids are ULIDs, so the order is creation order.
    by_type: HashMap<(String, String), BTreeMap<String, Entry>>,
    /// Highest stream sequence applied per entity subject, to ignore replays
    /// of older versions.
    applied: HashMap<(String, String, String), u64>,
}

pub struct Index {
    inner: RwLock<Inner>,
    /// Highest `ENTITIES` sequence the replay consumer has applied.
    caught_up: watch::Sender<u64>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            inner: RwLock::new(Inner::default()),
            caught_up: watch::channel(0).0,
        }
    }
}

impl Index {
    /// Records the latest version of an entity (or its deletion when `entry`
    /// is `None`). Older sequences than one already applied are ignored, so
    /// the replay and this replica's own writes can race safely.
    pub fn apply(&self, org: &str, ty: &str, id: &str, seq: u64, entry: Option<Entry>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let key = (org.to_owned(), ty.to_owned(), id.to_owned());
        if inner.applied.get(&key).is_some_and(|&s| s >= seq) {
            return;
        }
        inner.applied.insert(key, seq);
        let map = inner
            .by_type
            .entry((org.to_owned(), ty.to_owned()))
            .or_default();
        match entry {
            Some(e) => {
                map.insert(id.to_owned(), e);
            }
            None => {
                map.remove(id);
            }
        }
    }

    /// Marks the replay consumer as having applied everything up to `seq`.
    pub fn mark_caught_up(&self, seq: u64) {
        self.caught_up.send_if_modified(|s| {
            if seq > *s {
                *s = seq;
                true
            } else {
                false
            }
        });
    }

    pub fn caught_up(&self) -> u64 {
        *self.caught_up.borrow()
    }

    /// Waits until the replay consumer has applied `seq`.
    pub async fn wait_for(&self, seq: u64) {
        let mut rx = self.caught_up.subscribe();
        let _ = rx.wait_for(|s| *s >= seq).await;
    }

    /// Live entities of one type, in id order, starting after `after`,
    /// passing `keep`, at most `limit`. Returns (id, entry) pairs and whether
    /// more matched.
    pub fn page(
        &self,
        org: &str,
        ty: &str,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&str, &Entry) -> bool,
    ) -> (Vec<(String, Entry)>, bool) {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let Some(map) = inner.by_type.get(&(org.to_owned(), ty.to_owned())) else {
            return (Vec::new(), false);
        };
        let range = match after {
            Some(a) => {
                map.range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
            }
            None => map.range::<str, _>(..),
        };
        let mut out = Vec::new();
        for (id, e) in range {
            if !keep(id, e) {
                continue;
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push((id.clone(), e.clone()));
        }
        (out, false)
    }

    /// The live entity of a type with this code, if any.
    pub fn by_code(&self, org: &str, ty: &str, code: &str) -> Option<String> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_type
            .get(&(org.to_owned(), ty.to_owned()))?
            .iter()
            .find(|(_, e)| e.code.as_deref() == Some(code))
            .map(|(id, _)| id.clone())
    }

    pub fn contains(&self, org: &str, ty: &str, id: &str) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_type
            .get(&(org.to_owned(), ty.to_owned()))
            .is_some_and(|m| m.contains_key(id))
    }

    /// Number of live entities across all orgs and types.
    pub fn len(&self) -> usize {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner.by_type.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64, code: &str) -> Entry {
        Entry {
            seq,
            code: Some(code.into()),
            fields: vec![],
        }
    }

    #[test]
    fn older_versions_never_overwrite_newer_ones() {
        let ix = Index::default();
        ix.apply("o", "account", "A", 5, Some(e(5, "new")));
        ix.apply("o", "account", "A", 3, Some(e(3, "old")));
        assert_eq!(ix.by_code("o", "account", "new").as_deref(), Some("A"));
        assert_eq!(ix.by_code("o", "account", "old"), None);
        ix.apply("o", "account", "A", 6, None);
        assert!(!ix.contains("o", "account", "A"));
        ix.apply("o", "account", "A", 5, Some(e(5, "new")));
        assert!(
            !ix.contains("o", "account", "A"),
            "a replayed older version resurrected a deleted entity"
        );
    }

    #[test]
    fn pages_walk_in_id_order() {
        let ix = Index::default();
        for (i, id) in ["C", "A", "B", "D"].iter().enumerate() {
            ix.apply("o", "t", id, i as u64 + 1, Some(e(i as u64 + 1, id)));
        }
        let (p1, more) = ix.page("o", "t", None, 2, |_, _| true);
        assert_eq!(
            p1.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        assert!(more);
        let (p2, more) = ix.page("o", "t", Some("B"), 2, |_, _| true);
        assert_eq!(
            p2.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["C", "D"]
        );
        assert!(!more);
    }
}
