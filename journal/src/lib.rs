//! journal crate
