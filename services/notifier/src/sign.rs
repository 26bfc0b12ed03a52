//! Standard Webhooks signatures (<https://www.standardwebhooks.com>).
//!
//! Each request carries `webhook-id` (the notification id, the same on every
//! retry), `webhook-timestamp` (Unix seconds of this attempt) and
//! `webhook-signature: v1,<base64 of HMAC-SHA256 over "id.timestamp.body">`.
//! The key is the webhook's secret: a secret of the form `whsec_<base64>` is
//! the base64-decoded bytes after the prefix, as the specification defines;
//! any other secret (m3ter's API secrets) is used as its UTF-8 bytes.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The webhook's API key, as m3ter's signed requests carry it.
pub const HEADER_API_KEY: &str = "x-m3ter-apikey";

/// The signing key of a secret.
pub fn key_of(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD
            .decode(b64)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

/// `v1,<base64 signature>` of one attempt.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specification_example_signs_as_published() {
        // The example of the Standard Webhooks specification's reference
        // libraries (secret, id, timestamp, body and expected signature).
        let key = key_of("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let sig = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(key_of("plain secret"), b"plain secret");
    }
}
