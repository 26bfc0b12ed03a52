//! The exact uid index: which uids each organization had accepted in the
//! last 35 days.
//!
//! Per uid partition of an organization (keyed `<org>.<partition>`, see
//! `commit`) it keeps a map from a 64-bit fingerprint of the uid to
//! the commit marker that accepted it (a `u32` index into the org's marker
//! table). A fingerprint match is never trusted on its own: the marker, which
//! holds the real uids, is read from the stream and the uid looked up in it,
//! so a fingerprint collision can never drop a real measurement. What it
//! costs per remembered uid is one map entry: 8 + 4 bytes, padded to 16, at
//! the map's load factor (see `make bench` for the measured figure).
//!
//! The index is rebuilt at start by replaying the markers on `uidx.>` (they
//! live as long as the measurements, at least 35 days) and kept current by
//! the same replay, which also brings in other replicas' commits.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::RwLock;

use tokio::sync::Notify;

/// How long a uid is remembered, in days.
pub const WINDOW_DAYS: u32 = 35;

/// A 64-bit fingerprint of (org, uid). Fingerprints are never stored: every
/// replica computes them from the uids in the markers when it replays them,
/// so the hash only has to be fast, well spread and the same within one
/// process (the standard library's SipHash with its fixed keys).
pub fn fingerprint(org: &str, uid: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    org.hash(&mut h);
    uid.hash(&mut h);
    h.finish()
}

/// The hasher of fingerprint keys: a fingerprint is its own hash.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Debug, Clone, Copy)]
struct MarkerRef {
    seq: u64,
    day: u32,
}

#[derive(Default)]
struct OrgIndex {
    /// The last `uidx.<org>.<partition>` sequence: the expected last subject sequence of
    /// the next commit.
    last_seq: u64,
    markers: Vec<MarkerRef>,
    by_seq: HashMap<u64, u32>,
    /// Keyed by fingerprint: already a well-spread hash, so it is used as
    /// its own hash.
    uids: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
}

/// Where an earlier acceptance of a uid may be recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub marker_seq: u64,
}

#[derive(Default)]
pub struct UidIndex {
    orgs: RwLock<HashMap<String, OrgIndex>>,
    changed: Notify,
}

impl UidIndex {
    /// Records a marker (idempotent: a marker seen twice is applied once).
    pub fn apply(&self, org: &str, seq: u64, day: u32, uids: impl IntoIterator<Item = u64>) {
        {
            let mut orgs = self.orgs.write().unwrap_or_else(|e| e.into_inner());
            let ix = orgs.entry(org.to_owned()).or_default();
            if !ix.by_seq.contains_key(&seq) {
                let slot = ix.markers.len() as u32;
                ix.markers.push(MarkerRef { seq, day });
                ix.by_seq.insert(seq, slot);
                for fp in uids {
                    ix.uids.insert(fp, slot);
                }
            }
            ix.last_seq = ix.last_seq.max(seq);
        }
        self.changed.notify_waiters();
    }

    /// Whether the marker at `seq` is already applied.
    pub fn has_marker(&self, org: &str, seq: u64) -> bool {
        self.orgs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(org)
            .is_some_and(|ix| ix.by_seq.contains_key(&seq))
    }

    /// For each fingerprint, the marker that may have accepted it within the
    /// window ending on `today`: one lock and one org lookup for a batch.
    pub fn candidates(&self, org: &str, fps: &[u64], today: u32) -> Vec<Option<Candidate>> {
        let orgs = self.orgs.read().unwrap_or_else(|e| e.into_inner());
        let Some(ix) = orgs.get(org) else {
            return vec![None; fps.len()];
        };
        fps.iter()
            .map(|fp| {
                let m = ix.markers.get(*ix.uids.get(fp)? as usize)?;
                (today.saturating_sub(m.day) < WINDOW_DAYS)
                    .then_some(Candidate { marker_seq: m.seq })
            })
            .collect()
    }

    /// The expected last subject sequence for the org's next commit.
    pub fn last_seq(&self, org: &str) -> u64 {
        self.orgs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(org)
            .map_or(0, |ix| ix.last_seq)
    }

    /// Waits until the org's markers up to `seq` are applied.
    pub async fn wait_for(&self, org: &str, seq: u64) {
        loop {
            let notified = self.changed.notified();
            if self.last_seq(org) >= seq {
                return;
            }
            notified.await;
        }
    }

    /// The marker that may have accepted this fingerprint within the window
    /// ending on `today`.
    pub fn candidate(&self, org: &str, fp: u64, today: u32) -> Option<Candidate> {
        self.candidates(org, &[fp], today).pop().flatten()
    }

    /// Forgets uids accepted more than the window ago. Returns how many.
    pub fn expire(&self, today: u32) -> usize {
        let mut orgs = self.orgs.write().unwrap_or_else(|e| e.into_inner());
        let mut dropped = 0;
        for ix in orgs.values_mut() {
            let markers = &ix.markers;
            let before = ix.uids.len();
            ix.uids
                .retain(|_, slot| today.saturating_sub(markers[*slot as usize].day) < WINDOW_DAYS);
            dropped += before - ix.uids.len();
        }
        dropped
    }

    /// Number of remembered uids across all orgs.
    pub fn len(&self) -> usize {
        self.orgs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|ix| ix.uids.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the index holds (maps at their capacity), for `make bench`.
    pub fn heap_bytes(&self) -> usize {
        let orgs = self.orgs.read().unwrap_or_else(|e| e.into_inner());
        orgs.values()
            .map(|ix| {
                // hashbrown: one control byte per bucket plus the entry.
                ix.uids.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
                    + ix.by_seq.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
                    + ix.markers.capacity() * std::mem::size_of::<MarkerRef>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_and_org_scoped() {
        assert_eq!(fingerprint("o", "u1"), fingerprint("o", "u1"));
        assert_ne!(fingerprint("o", "u1"), fingerprint("p", "u1"));
        assert_ne!(fingerprint("o", "u1"), fingerprint("o", "u2"));
    }

    #[test]
    fn markers_apply_once_and_expire_after_the_window() {
        let ix = UidIndex::default();
        ix.apply("o", 10, 100, [1, 2]);
        ix.apply("o", 10, 100, [1, 2]);
        ix.apply("o", 7, 100, [3]);
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.last_seq("o"), 10);
        assert_eq!(
            ix.candidate("o", 1, 100),
            Some(Candidate { marker_seq: 10 })
        );
        assert_eq!(ix.candidate("o", 3, 134), Some(Candidate { marker_seq: 7 }));
        assert_eq!(
            ix.candidate("o", 3, 135),
            None,
            "35 days later it is forgotten"
        );
        assert_eq!(ix.candidate("p", 1, 100), None);
        assert_eq!(ix.expire(135), 3);
        assert!(ix.is_empty());
    }
}
