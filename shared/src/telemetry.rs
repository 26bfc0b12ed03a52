//! Logging, set up once per process.
//!
//! `RUST_LOG` filters (default `info`); `METERLINE_LOG_FORMAT=json` gives
//! JSON lines for production log shippers. Tests stay quiet unless
//! `TEST_LOG` is set (see [`init_for_tests`]).

use tracing_subscriber::{fmt, EnvFilter};

pub fn init(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("METERLINE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let result = if json {
        fmt()
            .with_env_filter(filter)
            .json()
            .with_current_span(false)
            .try_init()
    } else {
        fmt().with_env_filter(filter).with_target(false).try_init()
    };
    if result.is_ok() {
        tracing::debug!(service, "telemetry initialised");
    }
}

/// Logging for tests: silent unless `TEST_LOG` is set. Safe to call often.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug"));
        let _ = fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}
