//! Sealing of secrets at rest.
//!
//! Secret fields (webhook signing secrets, integration credentials) are
//! encrypted with XChaCha20-Poly1305 under the operator's sealing key before
//! an entity is appended to `ENTITIES`, so neither the log of record nor
//! `EVENTS` nor exports ever hold them in clear text. Services that need the
//! clear value (the notifier, to sign webhooks) hold the same key. Reads
//! return [`MASK`] in their place; sending [`MASK`] back on an update keeps
//! the stored value.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde_json::Value;

use crate::ServiceError;

pub const PREFIX: &str = "sealed:v1:";
/// What reads show in place of a secret.
pub const MASK: &str = "********";

#[derive(Clone)]
pub struct Sealer {
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("configured", &self.cipher.is_some())
            .finish()
    }
}

impl Sealer {
    /// From the base64 of a 32-byte key; an empty string gives a sealer that
    /// refuses to seal (writes carrying secrets then fail clearly).
    pub fn from_base64(key: &str) -> anyhow::Result<Sealer> {
        if key.is_empty() {
            return Ok(Sealer { cipher: None });
        }
        let bytes = STANDARD
            .decode(key.trim())
            .map_err(|e| anyhow::anyhow!("sealing key is not base64: {e}"))?;
        anyhow::ensure!(
            bytes.len() == 32,
            "sealing key must be 32 bytes, got {}",
            bytes.len()
        );
        Ok(Sealer {
            cipher: Some(XChaCha20Poly1305::new(Key::from_slice(&bytes))),
        })
    }

    pub fn seal(&self, clear: &str) -> Result<String, ServiceError> {
        let cipher = self.cipher.as_ref().ok_or_else(|| {
            ServiceError::unavailable("this entity holds a secret, but no sealing key is configured on the entities service")
        })?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = cipher
            .encrypt(&nonce, clear.as_bytes())
            .map_err(ServiceError::internal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(format!("{PREFIX}{}", STANDARD.encode(out)))
    }

    pub fn open(&self, sealed: &str) -> Result<String, ServiceError> {
        let cipher = self
            .cipher
            .as_ref()
            .ok_or_else(|| ServiceError::unavailable("no sealing key configured"))?;
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| STANDARD.decode(b).ok())
            .filter(|r| r.len() > 24)
            .ok_or_else(|| ServiceError::internal("sealed value is malformed"))?;
        let (nonce, ct) = raw.split_at(24);
        let clear = cipher
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| ServiceError::internal("sealed value does not open with this key"))?;
        String::from_utf8(clear).map_err(ServiceError::internal)
    }
}

/// The value at a dotted path, mutably.
fn at_mut<'a>(v: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.').try_fold(v, |v, k| v.get_mut(k))
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// Seals the secret fields of `new` in place. A field holding [`MASK`] (or
/// absent while the old state had it) keeps the old sealed value.
pub fn seal_fields(
    sealer: &Sealer,
    paths: &[&str],
    new: &mut Value,
    old: Option<&Value>,
) -> Result<(), ServiceError> {
    for path in paths {
        let previous = old.and_then(|o| at(o, path)).cloned();
        let Some(slot) = at_mut(new, path) else {
            continue;
        };
        match slot {
            Value::String(s) if s == MASK => match previous {
                Some(p) => *slot = p,
                None => {
                    return Err(ServiceError::bad_request(format!(
                        "{path}: a secret is required"
                    )))
                }
            },
            // Only a value this store sealed before may be sent back sealed.
            Value::String(s)
                if s.starts_with(PREFIX)
                    && previous.as_ref().and_then(Value::as_str) != Some(s.as_str()) =>
            {
                return Err(ServiceError::bad_request(format!(
                    "{path}: must be the secret itself"
                )));
            }
            Value::String(s) if s.starts_with(PREFIX) => {}
            Value::String(s) => *slot = Value::String(sealer.seal(s)?),
            _ => {}
        }
    }
    Ok(())
}

/// Replaces sealed secrets with [`MASK`] for a reader.
pub fn mask_fields(paths: &[&str], v: &mut Value) {
    for path in paths {
        if let Some(slot) = at_mut(v, path) {
            if slot.is_string() {
                *slot = Value::String(MASK.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sealer() -> Sealer {
        Sealer::from_base64(&STANDARD.encode([7u8; 32])).unwrap()
    }

    #[test]
    fn secrets_are_sealed_masked_and_kept_on_masked_update() {
        let s = sealer();
        let mut v = json!({"credentials": {"apiKey": "k", "secret": "hunter2"}});
        seal_fields(&s, &["credentials.secret"], &mut v, None).unwrap();
        let sealed = v["credentials"]["secret"].as_str().unwrap().to_owned();
        assert!(sealed.starts_with(PREFIX));
        assert!(!v.to_string().contains("hunter2"));
        assert_eq!(s.open(&sealed).unwrap(), "hunter2");

        let mut shown = v.clone();
        mask_fields(&["credentials.secret"], &mut shown);
        assert_eq!(shown["credentials"]["secret"], MASK);

        let mut update = json!({"credentials": {"apiKey": "k", "secret": MASK}});
        seal_fields(&s, &["credentials.secret"], &mut update, Some(&v)).unwrap();
        assert_eq!(update["credentials"]["secret"], sealed.as_str());
    }

    #[test]
    fn no_key_refuses_to_store_a_secret() {
        let s = Sealer::from_base64("").unwrap();
        let mut v = json!({"credentials": {"secret": "x"}});
        assert!(seal_fields(&s, &["credentials.secret"], &mut v, None).is_err());
    }
}
