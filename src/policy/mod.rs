//! Send policy checked before rendering: the suppression list and frequency caps; and
//! contact pressure (touches), read in the same round trip.

pub mod caps;
pub mod suppression;
pub mod touches;
