//! The official Python client (`pip install kubernetes`) drives a real `skiff server`.

use std::process::Command;

use skiff_e2e::Server;

/// The Python interpreter with the `kubernetes` package: `make deps` puts it in a venv and names
/// it in `SKIFF_E2E_PYTHON`; without that, `python3` from PATH.
fn python() -> String {
    std::env::var("SKIFF_E2E_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[test]
fn python_client_creates_lists_patches_and_watches() {
    let probe = Command::new(python())
        .args(["-c", "import kubernetes"])
        .output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "python with the `kubernetes` package is needed: run `make deps` (or pip install kubernetes)"
    );
    let server = Server::start();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/configmap_client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(&server.kubeconfig)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python client failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("python client ok"));
}
