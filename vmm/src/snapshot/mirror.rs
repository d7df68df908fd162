//! `From` both ways between a snapshot struct and the library struct it mirrors, from one
//! list of fields (so the two directions cannot disagree on a field).

/// `mirror_fields!(Ours, Theirs, { a, b, c })` implements `From<&Theirs> for Ours` and
/// `From<&Ours> for Theirs`, copying (cloning) each listed field. With
/// `{ a, b, ..Default::default() }` the fields of `Theirs` that `Ours` does not keep (padding)
/// take that value.
macro_rules! mirror_fields {
    ($ours:ty, $theirs:ty, { $($field:ident),+ $(, ..$rest:expr)? $(,)? }) => {
        impl From<&$theirs> for $ours {
            #[allow(clippy::clone_on_copy)]
            fn from(s: &$theirs) -> Self {
                Self {
                    $($field: s.$field.clone()),+
                }
            }
        }

        impl From<&$ours> for $theirs {
            #[allow(clippy::clone_on_copy)]
            fn from(s: &$ours) -> Self {
                Self {
                    $($field: s.$field.clone()),+
                    $(, ..$rest)?
                }
            }
        }
    };
}

pub(crate) use mirror_fields;
