//! A stand-alone container shim for the kubelet server's integration tests (the product runs
//! `skiff shim`): they start the built-in runtime, which needs a shim binary to spawn.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(skiff_runtime::shim::main(args));
}
