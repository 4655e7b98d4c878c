//! Send policy checked before rendering: the suppression list (and, later, frequency caps).

pub mod suppression;
