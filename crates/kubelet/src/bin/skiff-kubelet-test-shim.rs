//! A stand-alone shim binary for this crate's integration tests (the product uses `skiff shim`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(skiff_runtime::shim::main(args));
}
