//! Access to the `ENTITIES` stream: the latest version of one entity by a
//! direct get on its subject, versions by sequence, and appends guarded by
//! `Nats-Expected-Last-Subject-Sequence` so that of two concurrent writers
//! of one entity exactly one wins.

use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use bytes::Bytes;

use meterline_shared::codec::Codec;
use meterline_shared::envelope::EntityEvent;
use meterline_shared::{subjects, ServiceError};

#[derive(Clone)]
pub struct Store {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
}

/// One stored version: its stream sequence and its event.
#[derive(Debug, Clone)]
pub struct Version {
    pub seq: u64,
    pub event: EntityEvent,
}

impl Version {
    /// The entity's state, unless this version is a tombstone.
    pub fn live(&self) -> Option<&serde_json::Value> {
        if self.event.is_tombstone() {
            None
        } else {
            self.event.new.as_ref()
        }
    }
}

fn decode(payload: &[u8]) -> Result<EntityEvent, ServiceError> {
    serde_json::from_slice(payload)
        .map_err(|e| ServiceError::internal(format!("undecodable ENTITIES message: {e}")))
}

impl Store {
    pub async fn open(js: jetstream::Context) -> anyhow::Result<Store> {
        let stream = js.get_stream(subjects::ENTITIES_STREAM).await?;
        Ok(Store { js, stream })
    }

    pub fn stream(&self) -> &jetstream::stream::Stream {
        &self.stream
    }

    /// The latest version of an entity, tombstone included; `None` if it
    /// never existed.
    pub async fn last(
        &self,
        org: &str,
        ty: &str,
        id: &str,
    ) -> Result<Option<Version>, ServiceError> {
        match self
            .stream
            .direct_get_last_for_subject(subjects::entity(org, ty, id))
            .await
        {
            Ok(m) => Ok(Some(Version {
                seq: m.sequence,
                event: decode(&m.payload)?,
            })),
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(ServiceError::unavailable(format!(
                "reading ENTITIES failed: {e}"
            ))),
        }
    }

    /// The live state of an entity, or `None` if missing or deleted.
    pub async fn live(
        &self,
        org: &str,
        ty: &str,
        id: &str,
    ) -> Result<Option<Version>, ServiceError> {
        Ok(self.last(org, ty, id).await?.filter(|v| v.live().is_some()))
    }

    pub async fn by_seq(&self, seq: u64) -> Result<Version, ServiceError> {
        let m = self.stream.direct_get(seq).await.map_err(|e| {
            ServiceError::unavailable(format!("reading ENTITIES #{seq} failed: {e}"))
        })?;
        Ok(Version {
            seq: m.sequence,
            event: decode(&m.payload)?,
        })
    }

    /// The sequence of the last message in `ENTITIES`.
    pub async fn last_seq(&self) -> Result<u64, ServiceError> {
        let info = self.stream.get_info().await.map_err(|e| {
            ServiceError::unavailable(format!("reading ENTITIES state failed: {e}"))
        })?;
        Ok(info.state.last_sequence)
    }

    /// Appends `event` as the next version of its entity, if the entity's
    /// last version is still `expected` (0: the entity must not exist yet).
    /// Returns the new version's sequence. The event id is the message id,
    /// so a retried append is de-duplicated by the stream.
    pub async fn append(&self, event: &EntityEvent, expected: u64) -> Result<u64, ServiceError> {
        let subject = subjects::entity(&event.org_id, &event.entity_type, &event.entity_id);
        let payload = Bytes::from(Codec::Json.encode(event)?);
        let headers = event.headers();
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(&event.id)
            .expected_last_subject_sequence(expected);
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| publish_error(e.kind(), &e))?
            .await
            .map_err(|e| publish_error(e.kind(), &e))?;
        if ack.duplicate {
            tracing::debug!(event = %event.id, "append was a retry of a stored write");
        }
        Ok(ack.sequence)
    }
}

fn publish_error(kind: PublishErrorKind, e: &dyn std::fmt::Display) -> ServiceError {
    match kind {
        PublishErrorKind::WrongLastSequence => {
            ServiceError::conflict("the entity was changed by another request; read it again and retry with its current version")
        }
        _ => ServiceError::unavailable(format!("writing ENTITIES failed: {e}")),
    }
}
