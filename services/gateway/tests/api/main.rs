//! Integration tests of the gateway: real nats-server, real sockets, a real
//! HTTP client.
//!
//! Every test that needs the entities service runs the real one in process
//! (see `helpers::World`).
//!
//! - `edge`: what the gateway itself decides: token issuing, the mapping of
//!   routes onto entity requests, refusals before the bus, the entities
//!   service being down, shutdown.
//! - `entities`: entity behaviour driven over HTTP: CRUD, paging, child
//!   collections, and what the entities service refuses.
//! - `measurements`: `POST /organizations/{orgId}/measurements` in front of
//!   the real ingest service: batches, the body limit, rate limits.
//! - `notifications`: the notifier's routes (events, evaluate, webhook
//!   activation, dead letters) in front of the real notifier service.
//! - `uploads`: measurement file uploads: signed URLs, streaming, jobs
//!   processed by the real ingest service, and what is refused.

mod edge;
mod entities;
mod helpers;
mod measurements;
mod notifications;
mod uploads;
