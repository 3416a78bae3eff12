//! Wiring of skiff's processes: server configuration, start-up order, serving and shutdown.

pub mod client;
pub mod control_plane;
mod memory;
pub mod node;
mod node_net;
pub mod server;

pub use server::{AppError, ServerConfig};
