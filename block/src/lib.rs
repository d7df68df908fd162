//! block crate
