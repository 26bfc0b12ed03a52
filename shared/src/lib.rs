//! Server-common crate of Meterline.
//!
//! Owns what every service needs to agree on: the subject grammar and the
//! validation of user-supplied subject tokens ([`subjects`]), the entity event
//! envelope ([`envelope`]), the entity registry and the schemas it validates
//! against ([`registry`], [`schema`]), codecs ([`codec`]), stream and bucket
//! provisioning ([`provision`]), the sealing of secrets at rest ([`seal`]),
//! the export job contract between scheduler, exporter and gateway
//! ([`exportjob`]), export schedule arithmetic and limits, shared by the
//! entities service and the scheduler ([`schedule`]), where webhooks may
//! connect ([`egress`]), settings, telemetry, graceful shutdown, the admin
//! HTTP port, the error-code enum ([`error`]) and, behind the `testkit`
//! feature, helpers that start real servers for tests.
//!
//! It owns no domain logic: what an entity write means lives in
//! `meterline-entities`, what a route means lives in `meterline-gateway`.

pub mod admin;
pub mod bus;
pub mod codec;
pub mod egress;
pub mod envelope;
pub mod error;
pub mod exportjob;
pub mod protocol;
pub mod provision;
pub mod registry;
pub mod schedule;
pub mod schema;
pub mod seal;
pub mod serve;
pub mod settings;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use error::{ErrorCode, ServiceError};
