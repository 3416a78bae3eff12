//! Wiring of skiff's processes: server and agent configuration, start-up order, serving and
//! shutdown.

pub mod agent;
mod bootstrap;
pub mod client;
pub mod control_plane;
pub mod join;
mod memory;
pub mod node;
mod node_net;
pub mod overlay;
pub mod server;

pub use server::{AppError, ServerConfig};
