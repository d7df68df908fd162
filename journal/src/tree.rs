//! tree
pub fn validate_name(name: &str) -> crate::Result<()> { todo!() }
