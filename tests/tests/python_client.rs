//! The official Python client (`pip install kubernetes`) drives a real `skiff server`.

use std::process::Command;

use skiff_e2e::Server;

#[test]
fn python_client_creates_lists_patches_and_watches() {
    let probe = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "python3 with the `kubernetes` package is needed: pip install kubernetes"
    );
    let server = Server::start();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/configmap_client.py");
    let out = Command::new("python3")
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
