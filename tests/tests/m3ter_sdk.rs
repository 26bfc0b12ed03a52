//! m3ter's official Python SDK, pointed at Meterline by its base URL, does
//! what a customer's code would do: create, read, update, list and delete
//! entities, get the errors m3ter gives (404, 409, 400, 401), submit
//! measurements and upload a file of them, and export accounts ad hoc and
//! download the file.
//!
//! The whole system runs in this process against one real nats-server; the
//! SDK runs as a child process (`tests/sdk/m3ter_sdk_check.py`) with the
//! Python installed by `make tools`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

mod common;

use common::{Service, System};

const HOW_TO_INSTALL: &str = "run `make test` (installs the SDK into .tools/)";
/// The SDK check makes a few dozen calls; allow for a slow debug build.
const SDK_CHECK_TIMEOUT: Duration = Duration::from_secs(300);

fn workspace_root() -> PathBuf {
    // This crate lives in `tests/`, one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The project's Python with the m3ter SDK, or a panic saying how to get it.
fn sdk_python() -> PathBuf {
    let python = workspace_root().join(".tools/venv/bin/python");
    if !python.exists() {
        panic!("{} is missing: {HOW_TO_INSTALL}", python.display());
    }
    let probe = std::process::Command::new(&python)
        .args(["-c", "import m3ter"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(s) if s.success() => python,
        _ => panic!(
            "the m3ter package is not installed in {}: {HOW_TO_INSTALL}",
            python.display()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_m3ter_python_sdk_works_against_meterline() {
    let python = sdk_python();
    let script = workspace_root().join("tests/sdk/m3ter_sdk_check.py");

    let system = System::start(
        &[Service::Ingest, Service::Exporter, Service::Notifier],
        "sdk-check-org",
        "SDK check organization",
        "sdk-check",
    )
    .await;
    let (base_url, creds) = (&system.base, &system.creds);

    let mut command = tokio::process::Command::new(&python);
    command
        .arg(&script)
        .env("METERLINE_URL", base_url)
        .env("METERLINE_ORG", &creds.org_id)
        .env("METERLINE_KEY", &creds.access_key)
        .env("METERLINE_SECRET", &creds.secret)
        // The SDK reads these if set; make sure a developer's own do not leak in.
        .env_remove("M3TER_API_KEY")
        .env_remove("M3TER_API_SECRET")
        .env_remove("M3TER_API_TOKEN")
        .env_remove("M3TER_ORG_ID")
        .env_remove("M3TER_BASE_URL")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SDK_CHECK_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("the SDK check did not finish within {SDK_CHECK_TIMEOUT:?}"))
        .expect("run the SDK check");

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the m3ter SDK check failed ({}).\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("passed, 0 failed"),
        "the m3ter SDK check printed no summary.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );

    system.stop().await;
}
