//! Crash-test helper (placeholder until the redb backend lands).
fn main() {}
