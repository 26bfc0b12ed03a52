//! Codecs of the bus, told apart by the `Content-Type` header: JSON on public
//! subjects (`ENTITIES`, `EVENTS`, `EXPORTS`, requests) and MessagePack on
//! internal high-volume ones.

use async_nats::HeaderMap;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::ServiceError;

pub const CONTENT_TYPE: &str = "Content-Type";
pub const JSON: &str = "application/json";
pub const MSGPACK: &str = "application/msgpack";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Json,
    MsgPack,
}

impl Codec {
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Json => JSON,
            Codec::MsgPack => MSGPACK,
        }
    }

    /// The codec named by a message's headers; JSON when none is named.
    pub fn of(headers: Option<&HeaderMap>) -> Codec {
        match headers
            .and_then(|h| h.get(CONTENT_TYPE))
            .map(|v| v.as_str())
        {
            Some(MSGPACK) => Codec::MsgPack,
            _ => Codec::Json,
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, ServiceError> {
        match self {
            Codec::Json => serde_json::to_vec(value).map_err(ServiceError::internal),
            Codec::MsgPack => rmp_serde::to_vec_named(value).map_err(ServiceError::internal),
        }
    }

    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, ServiceError> {
        match self {
            Codec::Json => serde_json::from_slice(bytes)
                .map_err(|e| ServiceError::bad_request(format!("malformed JSON: {e}"))),
            Codec::MsgPack => rmp_serde::from_slice(bytes)
                .map_err(|e| ServiceError::bad_request(format!("malformed MessagePack: {e}"))),
        }
    }

    /// Headers with this codec's `Content-Type`.
    pub fn headers(self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, self.content_type());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_codecs_round_trip_and_are_told_apart_by_header() {
        let v = json!({"uid": "u1", "measure": {"gb": 1.5}});
        for c in [Codec::Json, Codec::MsgPack] {
            let bytes = c.encode(&v).unwrap();
            let h = c.headers();
            assert_eq!(Codec::of(Some(&h)), c);
            let back: serde_json::Value = Codec::of(Some(&h)).decode(&bytes).unwrap();
            assert_eq!(back, v);
        }
        assert_eq!(Codec::of(None), Codec::Json);
    }
}
