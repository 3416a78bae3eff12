//! SPDY/3.1 as kubectl speaks it for exec, attach and port-forward: the frame codec and a
//! session multiplexer usable as server (the kubelet) and as client (tests, tools).

pub mod frame;
pub mod session;

pub use frame::{Frame, Headers, SpdyError};
pub use session::{Session, Stream, StreamReader, StreamWriter};
