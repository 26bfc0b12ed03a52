//! Integration tests of the gateway: real nats-server, real sockets, a real
//! HTTP client.
//!
//! - `edge`: the gateway alone, with a stand-in responder on the bus that
//!   records what reached it.
//! - `entities`: the gateway in front of the real entities service.

mod edge;
mod entities;
mod helpers;
