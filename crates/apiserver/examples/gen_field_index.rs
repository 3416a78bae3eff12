//! Regenerates `crates/apiserver/src/field_index.rs`, the static table of known fields per kind
//! that unknown-field checks walk, from the k8s-openapi schemas. Run
//! `cargo run -p skiff-apiserver --example gen_field_index` after upgrading k8s-openapi; the unit
//! test `generated_field_index_is_current` fails until then.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/field_index.rs");
    match std::fs::write(&out, skiff_apiserver::field_index_source()) {
        Ok(()) => {
            eprintln!("gen_field_index: wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen_field_index: writing {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
