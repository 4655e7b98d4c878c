//! Send policy checked before rendering: the suppression list and frequency caps.

pub mod caps;
pub mod suppression;
