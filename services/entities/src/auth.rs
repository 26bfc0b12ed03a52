//! Service-user credentials: access keys whose secrets are kept only as
//! argon2 hashes, in the `credentials` KV bucket (never in `ENTITIES`, so
//! never in `EVENTS` or exports).

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use async_nats::jetstream::kv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meterline_shared::protocol::{Credentials, Principal, VerifyRequest};
use meterline_shared::{subjects::validate_token, ServiceError};

use crate::store::Store;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    org_id: String,
    service_user_id: String,
    /// argon2id PHC string of the secret.
    secret_hash: String,
    created_at: String,
}

/// How long a successful argon2 check is remembered. Clients such as the
/// m3ter SDKs fetch a token before nearly every call; remembering a recent
/// check spares a deliberately slow hash each time. Revocation stays
/// immediate: the service user is looked up on every verify.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
const VERIFIED_MAX: usize = 10_000;

#[derive(Clone)]
pub struct Auth {
    kv: kv::Store,
    store: Store,
    /// SHA-256 of (access key, secret, stored hash) → when it last verified.
    verified: Arc<Mutex<HashMap<[u8; 32], Instant>>>,
}

fn fingerprint(access_key: &str, secret: &str, stored_hash: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [access_key, secret, stored_hash] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

fn valid_access_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric())
}

impl Auth {
    pub fn new(kv: kv::Store, store: Store) -> Self {
        Auth {
            kv,
            store,
            verified: Arc::default(),
        }
    }

    /// Issues a new access key for a live service user. The secret is in the
    /// reply only.
    pub async fn issue(
        &self,
        org: &str,
        service_user_id: &str,
    ) -> Result<Credentials, ServiceError> {
        validate_token("orgId", org)?;
        validate_token("id", service_user_id)?;
        if self
            .store
            .live(org, "serviceuser", service_user_id)
            .await?
            .is_none()
        {
            return Err(ServiceError::not_found(format!(
                "service user {service_user_id:?} does not exist"
            )));
        }
        let access_key = format!("mlk{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let secret = URL_SAFE_NO_PAD.encode(raw);
        let hash = {
            let secret = secret.clone();
            tokio::task::spawn_blocking(move || {
                let salt = SaltString::generate(&mut OsRng);
                Argon2::default()
                    .hash_password(secret.as_bytes(), &salt)
                    .map(|h| h.to_string())
            })
            .await
            .map_err(ServiceError::internal)?
            .map_err(ServiceError::internal)?
        };
        let stored = StoredKey {
            org_id: org.to_owned(),
            service_user_id: service_user_id.to_owned(),
            secret_hash: hash,
            created_at: chrono::Utc::now().to_rfc3339(),
        };
        let value = Bytes::from(serde_json::to_vec(&stored).map_err(ServiceError::internal)?);
        self.kv.create(&access_key, value).await.map_err(|e| {
            ServiceError::unavailable(format!("storing the access key failed: {e}"))
        })?;
        Ok(Credentials {
            org_id: org.to_owned(),
            service_user_id: service_user_id.to_owned(),
            access_key,
            secret,
        })
    }

    /// Checks an access key and secret; 401 for anything wrong, without
    /// saying which part.
    pub async fn verify(&self, req: VerifyRequest) -> Result<Principal, ServiceError> {
        let denied = || ServiceError::unauthorized("invalid access key or secret");
        if !valid_access_key(&req.access_key) || req.secret.is_empty() || req.secret.len() > 256 {
            return Err(denied());
        }
        let Some(bytes) = self
            .kv
            .get(&req.access_key)
            .await
            .map_err(|e| ServiceError::unavailable(e.to_string()))?
        else {
            return Err(denied());
        };
        let stored: StoredKey = serde_json::from_slice(&bytes).map_err(ServiceError::internal)?;
        let hash = stored.secret_hash.clone();
        let print = fingerprint(&req.access_key, &req.secret, &hash);
        let remembered = {
            let v = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            v.get(&print).is_some_and(|at| at.elapsed() < VERIFIED_TTL)
        };
        let ok = remembered
            || tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|h| {
                    Argon2::default()
                        .verify_password(req.secret.as_bytes(), &h)
                        .is_ok()
                })
            })
            .await
            .map_err(ServiceError::internal)?;
        if ok && !remembered {
            let mut v = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if v.len() >= VERIFIED_MAX {
                v.retain(|_, at| at.elapsed() < VERIFIED_TTL);
                if v.len() >= VERIFIED_MAX {
                    v.clear();
                }
            }
            v.insert(print, Instant::now());
        }
        if !ok {
            return Err(denied());
        }
        if self
            .store
            .live(&stored.org_id, "serviceuser", &stored.service_user_id)
            .await?
            .is_none()
        {
            return Err(denied());
        }
        Ok(Principal {
            org_id: stored.org_id,
            service_user_id: stored.service_user_id,
        })
    }
}
