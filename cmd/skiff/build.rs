//! Links `skiff` as a non-PIE executable on Linux.
//!
//! Every container runs under a `skiff shim` process, a re-execution of this same binary. As a
//! position-independent executable it carries ~100,000 dynamic relocations: the loader rewrites
//! ~2.4 MiB of `.data.rel.ro` (vtables and the like) at every exec, which costs start-up time and
//! leaves those pages private and dirty in every shim (3 MiB of each shim's RSS). Linked at a
//! fixed address, the linker resolves them once and the pages stay clean and shared by all
//! shims. Go programs (k3s included) are built non-PIE by default on Linux too. The code itself
//! stays position-independent; only the final link changes.
fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
