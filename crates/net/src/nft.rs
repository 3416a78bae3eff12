//! nftables model (in progress).
