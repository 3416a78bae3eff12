//! End-to-end tests for skiff: they start the real binary and drive it with real kubectl.
