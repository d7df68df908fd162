//! vmm crate
