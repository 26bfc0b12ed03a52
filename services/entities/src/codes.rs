//! Unique codes, enforced across replicas.
//!
//! A code is reserved for an entity by creating a key in the `entity_codes`
//! KV bucket (an atomic create) before the entity is appended. A reservation
//! whose holder no longer has that code (deleted, renamed, or a write that
//! never landed after a crash) is taken over with a revision-checked update,
//! so a stale reservation never blocks a code for longer than
//! [`CLAIM_GRACE`]: within that grace a reservation without an entity is
//! treated as a write in flight, and the second writer gets 409.

use async_nats::jetstream::kv::{self, CreateErrorKind};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use meterline_shared::ServiceError;

use crate::store::Store;

pub const BUCKET: &str = "entity_codes";
/// How long a reservation without its entity counts as a write in flight.
pub const CLAIM_GRACE_MS: i64 = 30_000;

#[derive(Clone)]
pub struct Codes {
    kv: kv::Store,
}

#[derive(Serialize, Deserialize)]
struct Claim {
    id: String,
    /// Unix milliseconds of the claim.
    at: i64,
}

pub fn bucket_config() -> kv::Config {
    kv::Config {
        bucket: BUCKET.into(),
        description: "Meterline unique-code reservations: hash(org, type, code) -> entity id"
            .into(),
        history: 1,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

fn key(org: &str, ty: &str, code: &str) -> String {
    let mut h = Sha256::new();
    for part in [org, ty, code] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn claim(id: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&Claim {
            id: id.to_owned(),
            at: chrono::Utc::now().timestamp_millis(),
        })
        .unwrap_or_default(),
    )
}

fn taken(ty: &str, code: &str, holder: &str) -> ServiceError {
    ServiceError::conflict(format!("code {code:?} is already used by {ty} {holder:?}"))
}

impl Codes {
    pub fn new(kv: kv::Store) -> Self {
        Codes { kv }
    }

    /// Reserves `code` for entity `id`, or fails with 409 naming the holder.
    pub async fn reserve(
        &self,
        store: &Store,
        org: &str,
        ty: &str,
        code: &str,
        id: &str,
    ) -> Result<(), ServiceError> {
        let k = key(org, ty, code);
        for _ in 0..5 {
            match self.kv.create(&k, claim(id)).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(ServiceError::unavailable(format!(
                        "reserving a code failed: {e}"
                    )))
                }
            }
            let Some(entry) = self
                .kv
                .entry(&k)
                .await
                .map_err(|e| ServiceError::unavailable(e.to_string()))?
            else {
                continue;
            };
            let Ok(held) = serde_json::from_slice::<Claim>(&entry.value) else {
                // A delete marker or foreign value: claim it.
                if self.kv.update(&k, claim(id), entry.revision).await.is_ok() {
                    return Ok(());
                }
                continue;
            };
            if held.id == id {
                return Ok(());
            }
            match store.live(org, ty, &held.id).await? {
                Some(v)
                    if v.live()
                        .and_then(|s| s.get("code"))
                        .and_then(|c| c.as_str())
                        == Some(code) =>
                {
                    return Err(taken(ty, code, &held.id));
                }
                Some(_) => {}
                None if chrono::Utc::now().timestamp_millis() - held.at < CLAIM_GRACE_MS => {
                    return Err(ServiceError::conflict(format!(
                        "code {code:?} is being claimed by another request for {ty} {:?}",
                        held.id
                    )));
                }
                None => {}
            }
            if self.kv.update(&k, claim(id), entry.revision).await.is_ok() {
                return Ok(());
            }
        }
        Err(ServiceError::conflict(format!(
            "code {code:?} is contended; retry"
        )))
    }

    /// Gives up `id`'s reservation of `code`. Failures only leave a stale
    /// reservation, which the next claimant takes over.
    pub async fn release(&self, org: &str, ty: &str, code: &str, id: &str) {
        let k = key(org, ty, code);
        if let Ok(Some(entry)) = self.kv.entry(&k).await {
            if serde_json::from_slice::<Claim>(&entry.value).is_ok_and(|c| c.id == id) {
                if let Err(e) = self
                    .kv
                    .delete_expect_revision(&k, Some(entry.revision))
                    .await
                {
                    tracing::debug!(error = %e, "code release lost a race; left for takeover");
                }
            }
        }
    }
}
